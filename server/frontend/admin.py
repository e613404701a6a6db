"""The PeregrineAdmin servicer: routing tables at run time (translate only)."""

from __future__ import annotations

import grpc

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.frontend.status import mapped
from server.routing.router import Router

#: Metadata key naming the operator in audit lines (else the peer address is used).
USER_HEADER = "x-peregrine-user"


def _who(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == USER_HEADER:
            return str(value)
    return str(context.peer())


class AdminServicer(admin_grpc.PeregrineAdminServicer):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self._router = router

    @mapped
    async def SetRoute(
        self, request: admin.SetRouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return self._router.set_table(request.table, _who(context))

    @mapped
    async def ClearRoute(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return self._router.clear(request.model, _who(context))

    @mapped
    async def GetRoute(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return self._router.status(request.model)

    @mapped
    async def ListRoutes(
        self, request: admin.ListRoutesRequest, context: grpc.aio.ServicerContext
    ) -> admin.ListRoutesResponse:
        return admin.ListRoutesResponse(
            routes=[self._router.status(model) for model in self._router.routes()]
        )

    @mapped
    async def Promote(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return self._router.promote(request.model, _who(context))

    @mapped
    async def Rollback(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return self._router.rollback(request.model, _who(context))
