"""The PeregrineAdmin servicer: routing tables at run time (translate only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.errors import NotAllowed
from server.frontend.status import mapped
from server.routing.router import Router

if TYPE_CHECKING:
    from server.drift.detect import FeatureResult, WindowReport

#: Metadata key naming the operator in audit lines (else the peer address is used).
USER_HEADER = "x-peregrine-user"


def _who(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == USER_HEADER:
            return str(value)
    return str(context.peer())


def _feature(result: FeatureResult) -> admin.FeatureDrift:
    return admin.FeatureDrift(
        tensor=result.tensor, role=result.role.value, feature=result.feature,
        kind=result.kind.value, rows=result.rows, psi=result.psi, pvalue=result.pvalue,
        statistic=result.statistic, js=result.js, missing_rate=result.missing_rate,
        out_of_range=result.out_of_range, level=result.level.label, reasons=result.reasons,
    )


class AdminServicer(admin_grpc.PeregrineAdminServicer):  # type: ignore[misc]
    def __init__(
        self, router: Router, drift_reports: Callable[[], list[WindowReport]] | None = None
    ) -> None:
        self._router = router
        self._drift_reports = drift_reports

    @mapped
    async def GetDrift(
        self, request: admin.DriftRequest, context: grpc.aio.ServicerContext
    ) -> admin.DriftResponse:
        if self._drift_reports is None:
            raise NotAllowed("drift monitoring is not running: no model loaded at start sets "
                             "drift_sample_rate")
        reports = [
            r for r in self._drift_reports()
            if (not request.model or r.model == request.model)
            and (not request.version or r.version == request.version)
        ]
        reports.sort(key=lambda r: (r.model, int(r.version), r.window))
        return admin.DriftResponse(reports=[
            admin.DriftReport(
                model=r.model, version=r.version, window=r.window, sequence=r.sequence,
                rows=r.rows, score=r.score, level=r.level.label,
                features=[_feature(f) for f in r.worst()],
            )
            for r in reports
        ])

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
