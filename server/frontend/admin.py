"""The PeregrineAdmin servicer: routing tables at run time (translate only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.control import ControlPlane
from server.frontend.status import mapped
from server.routing.router import RouteStatus
from server.routing.table import Canary, RouteTable, Shadow, Variant
from server.security.identity import ANONYMOUS, caller

if TYPE_CHECKING:
    from server.drift.detect import FeatureResult

#: Metadata key naming the operator in the routing history of a server without an auth file
#: (else the peer address is used); with one, the authenticated identity is named instead.
USER_HEADER = "x-peregrine-user"


def _who(context: grpc.aio.ServicerContext) -> str:
    identity = caller()
    if identity is not ANONYMOUS:
        return identity.name
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


def _variant_of(message: admin.Variant) -> Variant:
    return Variant(name=message.name, model=message.model, version=message.version,
                   weight=message.weight)


def table_of(message: admin.RouteTable) -> RouteTable:
    """The admin API's RouteTable as the router takes it."""
    shadow = canary = None
    if message.HasField("shadow"):
        shadow = Shadow(target=_variant_of(message.shadow.target),
                        fraction=message.shadow.fraction, max_pending=message.shadow.max_pending,
                        max_pending_bytes=message.shadow.max_pending_bytes)
    if message.HasField("canary"):
        plan = message.canary
        canary = Canary(
            baseline=plan.baseline, candidate=plan.candidate, steps=tuple(plan.steps),
            step_interval_secs=plan.step_interval_secs,
            max_error_rate_increase=plan.max_error_rate_increase,
            max_p99_ratio=plan.max_p99_ratio, min_requests=plan.min_requests,
        )
    return RouteTable(model=message.model,
                      variants=tuple(_variant_of(v) for v in message.variants),
                      shadow=shadow, canary=canary, sticky_parameter=message.sticky_parameter)


def _variant_message(variant: Variant) -> admin.Variant:
    return admin.Variant(name=variant.name, model=variant.model, version=variant.version,
                         weight=variant.weight)


def table_message(table: RouteTable) -> admin.RouteTable:
    message = admin.RouteTable(
        model=table.model, variants=[_variant_message(v) for v in table.variants],
        sticky_parameter=table.sticky_parameter,
    )
    if table.shadow is not None:
        message.shadow.CopyFrom(admin.Shadow(
            target=_variant_message(table.shadow.target), fraction=table.shadow.fraction,
            max_pending=table.shadow.max_pending,
            max_pending_bytes=table.shadow.max_pending_bytes))
    if table.canary is not None:
        plan = table.canary
        message.canary.CopyFrom(admin.Canary(
            baseline=plan.baseline, candidate=plan.candidate, steps=plan.steps,
            step_interval_secs=plan.step_interval_secs,
            max_error_rate_increase=plan.max_error_rate_increase,
            max_p99_ratio=plan.max_p99_ratio, min_requests=plan.min_requests))
    return message


def status_message(status: RouteStatus) -> admin.RouteStatus:
    message = admin.RouteStatus(
        table=table_message(status.table),
        variants=[admin.VariantStatus(
            name=v.name, model=v.model, version=v.version, weight=v.weight,
            requests=v.requests, errors=v.errors, p99_ms=v.p99_ms,
        ) for v in status.variants],
        canary_state=status.canary_state, canary_step=status.canary_step,
        canary_reason=status.canary_reason, persist_error=status.persist_error,
    )
    figures = status.shadow
    if figures is not None:
        message.shadow.CopyFrom(admin.ShadowStatus(
            mirrored=figures.mirrored, dropped=figures.dropped, failed=figures.failed,
            compared=figures.compared, agreement=figures.agreement,
            max_abs_diff=figures.max_abs_diff, mean_abs_diff=figures.mean_abs_diff,
            max_rel_diff=figures.max_rel_diff,
        ))
    return message


class AdminServicer(admin_grpc.PeregrineAdminServicer):  # type: ignore[misc]
    """Translates the admin API to and from the control plane's plain types."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    @mapped
    async def GetDrift(
        self, request: admin.DriftRequest, context: grpc.aio.ServicerContext
    ) -> admin.DriftResponse:
        reports = self._control.drift_reports(request.model, request.version)
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
        return status_message(self._control.set_route(table_of(request.table), _who(context)))

    @mapped
    async def ClearRoute(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return status_message(self._control.clear_route(request.model, _who(context)))

    @mapped
    async def GetRoute(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return status_message(self._control.route(request.model))

    @mapped
    async def ListRoutes(
        self, request: admin.ListRoutesRequest, context: grpc.aio.ServicerContext
    ) -> admin.ListRoutesResponse:
        return admin.ListRoutesResponse(
            routes=[status_message(status) for status in self._control.routes()]
        )

    @mapped
    async def Promote(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return status_message(self._control.promote(request.model, _who(context)))

    @mapped
    async def Rollback(
        self, request: admin.RouteRequest, context: grpc.aio.ServicerContext
    ) -> admin.RouteStatus:
        return status_message(self._control.rollback(request.model, _who(context)))
