"""Triton's TraceSetting and LogSettings RPCs of GRPCInferenceService.

A mixin of the inference servicer that translates only: the trace settings belong to the
control plane (``ControlPlane.trace_settings``, over server/tracing's settings), the log
settings to ``logs.LogSettings``. Both answer every setting with its current value, after
applying the request's changes (an empty request only reads them).
"""

from __future__ import annotations

import grpc

from server._pb import grpc_service_pb2 as pb
from server.control import ControlPlane
from server.errors import InvalidInput
from server.frontend.status import mapped
from server.logs import LogSettings


class ServerSettingsRpcs:
    _control: ControlPlane
    _logging: LogSettings

    @mapped
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        now = self._control.trace_settings(
            request.model_name,
            {key: list(value.value) for key, value in request.settings.items()})
        value = pb.TraceSettingResponse.SettingValue
        return pb.TraceSettingResponse(
            settings={key: value(value=values) for key, values in now.items()})

    @mapped
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        changes = {key: _value(value) for key, value in request.settings.items()}
        try:
            now = self._logging.update(changes) if changes else self._logging.current()
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        value = pb.LogSettingsResponse.SettingValue
        return pb.LogSettingsResponse(settings={
            key: value(bool_param=v) if isinstance(v, bool)
            else value(uint32_param=v) if isinstance(v, int) else value(string_param=v)
            for key, v in now.items()})


def _value(setting: pb.LogSettingsRequest.SettingValue) -> bool | int | str | None:
    """A setting's value; None when the request carries none (back to the start value)."""
    member = setting.WhichOneof("parameter_choice")
    return None if member is None else getattr(setting, member)
