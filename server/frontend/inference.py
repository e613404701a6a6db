"""The GRPCInferenceService servicer (Open Inference Protocol + Triton's extensions)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from server import __version__
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.codec.decode import decode_request
from server.codec.encode import encode_response
from server.codec.shared_memory import SharedMemoryScope
from server.dataplane import DataPlane
from server.errors import (
    InvalidInput,
    LoadFailed,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    NotAllowed,
)
from server.frontend.shared_memory import SystemSharedMemoryRpcs
from server.frontend.statistics import model_statistics
from server.frontend.status import log_unexpected, mapped, status_of
from server.repository.cards import RUNTIME
from server.repository.manager import ControlMode, ModelRecord, ModelRepository
from server.shm import SharedMemoryRegistry
from server.types import InferResponse

log = logging.getLogger(__name__)

SERVER_NAME = "peregrine"
#: Protocol extensions this server implements, as ServerMetadata reports them.
EXTENSIONS = (
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
    "parameters",
    "system_shared_memory",
)


class ServerState:
    """Liveness and readiness of the whole server, flipped by the app at start and stop."""

    def __init__(self, strict_readiness: bool = True) -> None:
        self.live = True
        self.accepting = False
        #: ServerReady needs every model ready (True) or only a serving server (False).
        self.strict_readiness = strict_readiness


def _deadline_ns(context: grpc.aio.ServicerContext) -> int | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.perf_counter_ns() + int(remaining * 1e9)


class InferenceServicer(
    SystemSharedMemoryRpcs, pb_grpc.GRPCInferenceServiceServicer  # type: ignore[misc]
):
    def __init__(
        self,
        repository: ModelRepository,
        dataplane: DataPlane,
        state: ServerState,
        mode: ControlMode = ControlMode.NONE,
        header_pattern: str = "",
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        #: System shared-memory regions (SystemSharedMemoryRpcs); CUDA ones are UNIMPLEMENTED.
        self._shm = SharedMemoryRegistry() if shared_memory is None else shared_memory
        self._repository = repository
        self._dataplane = dataplane
        self._state = state
        self._mode = mode
        self._header_pattern = re.compile(header_pattern) if header_pattern else None

    def _forwarded(self, context: grpc.aio.ServicerContext) -> dict[str, str]:
        """Request headers to pass on as string parameters (--grpc-header-forward-pattern)."""
        if self._header_pattern is None:
            return {}
        return {
            key: value for key, value in context.invocation_metadata() or ()
            if isinstance(value, str) and self._header_pattern.search(key)
        }

    # -- health and metadata -----------------------------------------------------------------

    @mapped
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._state.live)

    @mapped
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        state = self._state
        return pb.ServerReadyResponse(
            ready=state.accepting and (not state.strict_readiness or self._repository.all_ready())
        )

    @mapped
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        ready = self._state.accepting and self._repository.is_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @mapped
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    @mapped
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        record = self._repository.record(request.name)
        _check_version(record, request.version)
        spec = record.spec
        if spec is None:
            raise ModelNotFound(f"model '{request.name}' failed to load: {record.reason}")
        batch = [-1] if spec.batches else []
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=sorted(record.versions, key=int),
            platform=spec.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype.wire, shape=[*batch, *t.dims])
                    for t in spec.client_inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype.wire, shape=[*batch, *t.dims])
                     for t in spec.outputs],
            properties=_card(record, request.version),
        )

    @mapped
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        record = self._repository.record(request.name)
        _check_version(record, request.version)
        if record.config is None:
            raise ModelNotFound(f"model '{request.name}' failed to load: {record.reason}")
        card = _card(record, request.version)
        # Which backend, provider and device serve this version (Backend.description).
        runtime = _runtime(record, request.version)
        if runtime:
            card[RUNTIME.name] = runtime
        if not card:
            return pb.ModelConfigResponse(config=record.config)
        config = type(record.config)()
        config.CopyFrom(record.config)
        for key, value in card.items():
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    @mapped
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return model_statistics(self._repository, request.name, request.version)

    @mapped
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self._repository.index(ready_only=request.ready)
            ]
        )

    # -- model control (explicit mode) ---------------------------------------------------------

    def _check_explicit(self, rpc: str) -> None:
        if self._mode is not ControlMode.EXPLICIT:
            raise NotAllowed(
                f"{rpc} needs --model-control-mode explicit; this server runs in "
                f"'{self._mode.value}' mode"
            )

    @mapped
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_explicit("RepositoryModelLoad")
        override: str | None = None
        for key, value in request.parameters.items():
            if key == "config":
                override = value.string_param
            else:
                raise InvalidInput(
                    f"load parameter '{key}' is not supported (only 'config', a ModelConfig "
                    "as JSON)"
                )
        try:
            await self._repository.load_model(request.model_name, config_override=override)
        except ModelLoadError as exc:
            raise LoadFailed(str(exc)) from None
        finally:
            self._repository.remember_explicit(
                request.model_name, self._repository.is_ready(request.model_name, "")
            )
        return pb.RepositoryModelLoadResponse()

    @mapped
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version; ``unload_dependents`` is accepted (we serve no ensembles, so a
        model has no dependents)."""
        self._check_explicit("RepositoryModelUnload")
        await self._repository.unload_model(request.model_name)
        self._repository.remember_explicit(request.model_name, False)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -----------------------------------------------------------------------------

    def _start(
        self, request: pb.ModelInferRequest, deadline_ns: int | None, headers: dict[str, str]
    ) -> tuple[asyncio.Future[InferResponse], SharedMemoryScope | None]:
        """Decode and queue one request. The caller encodes the answer with the returned
        shared-memory scope (leases on the regions the request uses) and then releases it."""
        if not self._state.accepting:
            raise ModelNotReady("the server is not accepting requests")
        shm = SharedMemoryScope(self._shm) if len(self._shm) else None
        try:
            decoded = decode_request(request, deadline_ns, shm)
            for key, value in headers.items():
                decoded.parameters.setdefault(key, value)
            return self._dataplane.submit(decoded), shm
        except BaseException:
            if shm is not None:
                shm.release()
            raise

    @mapped
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        answer, shm = self._start(request, _deadline_ns(context), self._forwarded(context))
        try:
            return encode_response(await answer, shm)
        finally:
            if shm is not None:
                shm.release()

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests in flight on one stream; responses go out as they complete.

        Each response carries its request's id, so clients match them. An error answers one
        request (error_message) and the stream goes on. No task per request: a reader task
        queues each request and hangs a callback on its answer, which encodes it for this
        generator to send.
        """
        loop = asyncio.get_running_loop()
        deadline = _deadline_ns(context)
        headers = self._forwarded(context)
        ready: deque[pb.ModelStreamInferResponse] = deque()
        inflight: set[asyncio.Future[InferResponse]] = set()
        waiter: asyncio.Future[None] | None = None

        def wake() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        def push(item: pb.ModelStreamInferResponse) -> None:
            ready.append(item)
            wake()

        def answered(
            message: pb.ModelInferRequest, shm: SharedMemoryScope | None,
            answer: asyncio.Future[InferResponse],
        ) -> None:
            inflight.discard(answer)
            try:
                if answer.cancelled():
                    return  # the stream is closing
                push(pb.ModelStreamInferResponse(
                    infer_response=encode_response(answer.result(), shm)))
            except Exception as exc:
                push(_stream_error(message, exc))
            finally:
                if shm is not None:
                    shm.release()

        async def read() -> None:
            async for message in request_iterator:
                try:
                    answer, shm = self._start(message, deadline, headers)
                except Exception as exc:
                    push(_stream_error(message, exc))
                    continue
                inflight.add(answer)
                answer.add_done_callback(functools.partial(answered, message, shm))

        reader = loop.create_task(read())
        reader.add_done_callback(lambda _task: wake())
        try:
            while True:
                while ready:
                    yield ready.popleft()
                if reader.done() and not inflight:
                    break
                waiter = loop.create_future()
                await waiter
                waiter = None
            reader.result()  # a failed read ends the call with its error
        finally:
            reader.cancel()
            for answer in list(inflight):
                answer.cancel()


def _stream_error(message: pb.ModelInferRequest, exc: Exception) -> pb.ModelStreamInferResponse:
    """One request's failure, answered on the stream."""
    log_unexpected(exc, "ModelStreamInfer", message.id)
    code, text = status_of(exc)
    return pb.ModelStreamInferResponse(
        error_message=f"[{code.name}] {text}",
        infer_response=pb.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id,
        ),
    )


def _check_version(record: ModelRecord, version: str) -> None:
    if version and version not in record.versions:
        raise ModelNotFound(f"unknown version '{version}' of model '{record.name}'")


def _runtime(record: ModelRecord, version: str) -> str:
    """The runtime description of the requested version, or of the one an empty request gets."""
    chosen = version or (record.ready_order[0] if record.ready_order else "")
    entry = record.versions.get(chosen)
    return "" if entry is None or entry.served is None else entry.served.description


def _card(record: ModelRecord, version: str) -> dict[str, str]:
    """The model card of the requested version, or of the version an empty request gets."""
    chosen = version or (record.ready_order[0] if record.ready_order else "")
    entry = record.versions.get(chosen)
    if entry is None or entry.served is None:
        return {}
    return dict(entry.served.card)
