"""The GRPCInferenceService servicer (Open Inference Protocol + Triton's extensions)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable

import grpc

from server import __version__
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.admission import Admission
from server.codec.shared_memory import SharedMemoryScope
from server.codec.wire import ParsingCodec, WireCodec
from server.control import ControlPlane, TensorInfo
from server.dataplane import DataPlane
from server.errors import BoundExceeded, Cancelled, ModelNotReady
from server.frontend.handlers import method_handlers
from server.frontend.server_settings import ServerSettingsRpcs
from server.frontend.shared_memory import SystemSharedMemoryRpcs
from server.frontend.statistics import statistics_response
from server.frontend.status import mapped, refuse, status_of
from server.logs import LogSettings
from server.security.identity import caller
from server.shm import RegistrationGate, SharedMemoryRegistry
from server.types import InferRequest, InferResponse, ParsedRequest

log = logging.getLogger(__name__)

SERVER_NAME = "peregrine"
#: Protocol extensions this server implements, as ServerMetadata reports them.
EXTENSIONS = (
    "classification",
    "logging",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
    "parameters",
    "system_shared_memory",
    "trace",
)


class ServerState:
    """Liveness and readiness of the whole server, flipped by the app at start and stop."""

    def __init__(self, strict_readiness: bool = True) -> None:
        self.live = True
        self.accepting = False
        #: ServerReady needs every model ready (True) or only a serving server (False).
        self.strict_readiness = strict_readiness


#: A request parsed before the response cache was asked, and its miss there: its key and the
#: lookup's nanoseconds (None: it must be decoded to be looked up).
CacheLookup = tuple[ParsedRequest, tuple[Hashable, int] | None]


def _deadline_ns(context: grpc.aio.ServicerContext) -> int | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.perf_counter_ns() + int(remaining * 1e9)


class InferenceServicer(
    SystemSharedMemoryRpcs, ServerSettingsRpcs,
    pb_grpc.GRPCInferenceServiceServicer,  # type: ignore[misc]
):
    """Translates the protocol to and from the data plane (inference) and the control plane
    (everything else)."""

    def __init__(
        self,
        control: ControlPlane,
        dataplane: DataPlane,
        state: ServerState,
        codec: WireCodec,
        header_pattern: str = "",
        shared_memory: SharedMemoryRegistry | None = None,
        admit: Callable[[str], None] | None = None,
        shm_gate: RegistrationGate | None = None,
        *,
        admission: Admission,
        logging_settings: LogSettings | None = None,
        cache_codec: ParsingCodec | None = None,
    ) -> None:
        #: LogSettings (ServerSettingsRpcs): logging as --log-level / --log-format start it;
        #: TraceSetting asks the control plane.
        self._logging = LogSettings("info", "text") if logging_settings is None \
            else logging_settings
        #: System shared-memory regions (SystemSharedMemoryRpcs); CUDA ones cannot be
        #: registered. Without a registry and a gate, none can be registered.
        self._shm = SharedMemoryRegistry(0, 0) if shared_memory is None else shared_memory
        self._shm_gate = RegistrationGate() if shm_gate is None else shm_gate
        self._control = control
        self._dataplane = dataplane
        self._state = state
        self._codec = codec
        self._header_pattern = re.compile(header_pattern) if header_pattern else None
        #: The guard's per-request check of the caller against the model (model limits, rate
        #: limits); None when no security option asks for one.
        self._admit = admit
        #: The server-wide bounds on requests in flight, streams and queued bytes.
        self._admission = admission
        #: With a response cache: the codec (``codec`` itself, untraced) that parses a request
        #: first, so a hit is answered before decoding. Forwarded headers become parameters
        #: while decoding, so with them every request is decoded first.
        self._cache_codec = None if header_pattern else cache_codec

    def _forwarded(self, context: grpc.aio.ServicerContext) -> dict[str, str] | None:
        """Request headers to pass on as string parameters (--grpc-header-forward-pattern);
        None without the flag."""
        if self._header_pattern is None:
            return None
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
            ready=state.accepting
            and (not state.strict_readiness or self._control.all_models_ready())
        )

    @mapped
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        ready = self._state.accepting and self._control.model_ready(request.name, request.version)
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
        metadata = self._control.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=[_tensor_metadata(t) for t in metadata.inputs],
            outputs=[_tensor_metadata(t) for t in metadata.outputs],
            properties=metadata.properties,
        )

    @mapped
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._control.config(request.name, request.version))

    @mapped
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return statistics_response(self._control.statistics(request.name, request.version))

    @mapped
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in await self._control.index(ready_only=request.ready)
            ]
        )

    # -- model control (explicit mode) ---------------------------------------------------------

    @mapped
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._control.load(
            request.model_name,
            {key: value.string_param for key, value in request.parameters.items()},
        )
        return pb.RepositoryModelLoadResponse()

    @mapped
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version; ``unload_dependents`` is accepted (we serve no ensembles, so a
        model has no dependents)."""
        await self._control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -----------------------------------------------------------------------------
    # ModelInfer and ModelStreamInfer take and give the raw message bytes (see
    # RAW_RPCS): the wire codec parses and writes them, no protobuf object on the way.

    def _check_accepting(self) -> None:
        if not self._state.accepting:
            raise ModelNotReady("the server is not accepting requests")

    def _cached(self, data: bytes) -> tuple[CacheLookup | None, InferResponse | None]:
        """With a response cache: the request parsed and its miss, or its stored answer when
        it has one (the guard admits the caller as for any request; the server's bounds do
        not count a request answered at once). Without one: nothing, and ``_start`` parses."""
        codec = self._cache_codec
        if codec is None:
            return None, None
        self._check_accepting()
        try:
            parsed = codec.parse(data)
        except BoundExceeded as exc:  # past the entries a message may hold
            self._admission.refused(exc.bound)
            raise
        hit, missed = self._dataplane.cached(parsed)
        if hit is not None and self._admit is not None:
            self._admit(parsed[0])
        return (parsed, missed), hit

    def _start(
        self, data: bytes, deadline_ns: int | None, headers: dict[str, str] | None,
        lone: bool = False, looked_up: CacheLookup | None = None,
    ) -> tuple[InferRequest, asyncio.Future[InferResponse], SharedMemoryScope | None]:
        """Decode, admit and queue one request; ``headers`` (forwarded request headers, None
        when none are) become string parameters the request does not set itself; ``lone`` for
        a unary call (no other request comes with it). The caller encodes the answer with the
        returned shared-memory scope (leases on the regions the request uses, which are
        the caller's own) and then releases it, and releases the admission's counts of the
        request (``release_bytes`` once the answer is computed, ``release_requests`` once it
        is handed to gRPC). ``looked_up``: what ``_cached`` parsed of ``data``, and its miss."""
        self._check_accepting()
        admission = self._admission
        shm = SharedMemoryScope(self._shm, caller().name) if len(self._shm) else None
        try:
            admission.check_room()
            if looked_up is None:
                decoded = self._codec.decode_request_bytes(data, deadline_ns, shm)
            else:
                assert self._cache_codec is not None
                parsed, missed = looked_up
                decoded = self._cache_codec.decode(parsed, deadline_ns, shm)
                if missed is not None:
                    decoded.cache_miss = missed
            if self._admit is not None:
                self._admit(decoded.model_name)
            if headers:
                for key, value in headers.items():
                    decoded.parameters.setdefault(key, value)
            admission.admit(decoded.nbytes)
        except BaseException as exc:
            if shm is not None:
                shm.release()
            if isinstance(exc, BoundExceeded):
                admission.refused(exc.bound)
            raise
        try:
            return decoded, self._dataplane.submit(decoded, lone), shm
        except BaseException as exc:
            admission.release_requests(1)
            admission.release_bytes(decoded.nbytes)
            if shm is not None:
                shm.release()
            if isinstance(exc, BoundExceeded):  # a model's max_queue_size
                admission.refused(exc.bound)
            raise

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        shm: SharedMemoryScope | None = None
        request: InferRequest | None = None
        try:
            looked_up, hit = self._cached(data)
            if hit is not None:
                return self._codec.encode_response_bytes(hit, None, False)
            request, answer, shm = self._start(data, _deadline_ns(context),
                                               self._forwarded(context), lone=True,
                                               looked_up=looked_up)
            return self._codec.encode_response_bytes(await answer, shm, False)
        except Exception as exc:
            refuse(context, exc, "ModelInfer")
            return b""
        finally:
            if request is not None:
                self._admission.release_requests(1)
                self._admission.release_bytes(request.nbytes)
            if shm is not None:
                shm.release()

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Many requests in flight on one stream; responses go out as they complete.

        Each response carries its request's id, so clients match them. An error answers one
        request (error_message) and the stream goes on. No task per request: a reader task
        queues each request and hangs a callback on its answer, which encodes it for this
        generator to send.

        At most --max-inflight-per-stream requests are read and not yet answered to gRPC:
        past that the reader waits for answers to leave, so a client that sends faster than
        the server answers (or stops reading answers) is held back by HTTP/2 flow control,
        and the answers waiting here are bounded by the same count.
        """
        admission = self._admission
        try:
            admission.open_stream()
        except BoundExceeded as exc:
            admission.refused(exc.bound)
            refuse(context, exc, "ModelStreamInfer")
            return
        loop = asyncio.get_running_loop()
        codec = self._codec
        deadline = _deadline_ns(context)
        headers = self._forwarded(context)
        per_stream = admission.bounds.max_inflight_per_stream
        #: Answers of accepted requests, and of requests never admitted (refused, or answered
        #: from the response cache at once).
        ready: deque[bytes] = deque()
        unadmitted: deque[bytes] = deque()
        inflight: set[asyncio.Future[InferResponse]] = set()
        #: Requests read whose answers have not been handed to gRPC.
        unanswered = 0
        closed = False
        waiter: asyncio.Future[None] | None = None
        room: asyncio.Future[None] | None = None

        def wake() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        def failed(request: InferRequest | None, data: bytes, exc: Exception) -> bytes:
            """One request's failure, answered on the stream."""
            if request is not None:
                named = request.model_name, request.model_version, request.id
            else:
                named = codec.identify(data)
            code, text = status_of(exc, "ModelStreamInfer", named[2])
            return codec.encode_stream_error_bytes(*named, f"[{code.name}] {text}")

        def answered(
            request: InferRequest, shm: SharedMemoryScope | None,
            answer: asyncio.Future[InferResponse],
        ) -> None:
            inflight.discard(answer)
            admission.release_bytes(request.nbytes)
            try:
                if closed:
                    return  # its in-flight count was released with the stream
                if answer.cancelled():
                    ready.append(failed(request, b"", Cancelled("the request was cancelled")))
                else:
                    ready.append(codec.encode_response_bytes(answer.result(), shm, True))
            except Exception as exc:
                ready.append(failed(request, b"", exc))
            finally:
                if shm is not None:
                    shm.release()
            wake()

        async def read() -> None:
            nonlocal unanswered, room
            async for data in request_iterator:
                unanswered += 1
                try:
                    looked_up, hit = self._cached(data)
                    if hit is not None:
                        unadmitted.append(codec.encode_response_bytes(hit, None, True))
                        wake()
                    else:
                        request, answer, shm = self._start(data, deadline, headers,
                                                           looked_up=looked_up)
                        inflight.add(answer)
                        answer.add_done_callback(functools.partial(answered, request, shm))
                except Exception as exc:
                    unadmitted.append(failed(None, data, exc))
                    wake()
                if unanswered >= per_stream:
                    room = loop.create_future()
                    await room
                    room = None

        def sent() -> None:
            nonlocal unanswered
            unanswered -= 1
            if room is not None and not room.done():
                room.set_result(None)

        reader = loop.create_task(read())
        reader.add_done_callback(lambda _task: wake())
        try:
            while True:
                while ready or unadmitted:
                    sent()
                    if ready:
                        admission.release_requests(1)
                        yield ready.popleft()
                    else:
                        yield unadmitted.popleft()
                if reader.done() and not inflight:
                    break
                waiter = loop.create_future()
                await waiter
                waiter = None
            reader.result()  # a failed read ends the call with its error
        finally:
            closed = True
            reader.cancel()
            admission.release_requests(len(inflight) + len(ready))
            admission.close_stream()
            for answer in list(inflight):
                answer.cancel()


#: The RPCs whose handlers take and give raw message bytes: the wire codec is the only parser
#: on the inference path.
RAW_RPCS = frozenset({"ModelInfer", "ModelStreamInfer"})
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def inference_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    return method_handlers(servicer, SERVICE, pb, RAW_RPCS)


def _tensor_metadata(tensor: TensorInfo) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype.wire, shape=tensor.shape)
