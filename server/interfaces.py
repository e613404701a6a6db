"""The boundaries between rooms, as Protocols. No implementations live here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from server.errors import PeregrineError
from server.parameters import Key
from server.spec import ModelSpec
from server.types import (
    Array,
    Execution,
    InferRequest,
    InferResponse,
    OutputTensor,
    ParsedRequest,
    RouteDecision,
)


class Backend(Protocol):
    """One loaded model instance.

    Owned by the scheduler of one model version. ``execute`` is synchronous and blocking; the
    scheduler calls it from a worker thread, never concurrently for the same instance. It knows
    nothing of gRPC, queues or routing.
    """

    @property
    def description(self) -> str:
        """Which runtime and device runs this instance, for logs and ModelConfig."""
        ...

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        """Run ``inputs`` once and discard the result. Blocking."""
        ...

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run one batch; returns every output of the model by name. Blocking."""
        ...

    def close(self) -> None:
        """Release the instance's memory. Called once, after the last execute."""
        ...


@runtime_checkable
class DeviceBackend(Protocol):
    """A Backend that copies each batch to a device: the version's batch buffers come from
    its ``host_allocator`` (page-locked host memory), so they need no staging copy and no
    per-batch question of where they live."""

    def host_allocator(self, nbytes: int) -> Array:
        ...


@runtime_checkable
class CancellableBackend(Protocol):
    """A Backend whose running ``execute`` can be interrupted (ONNX Runtime's terminate
    flag): the scheduler calls it when a batch overruns its execution timeout."""

    def cancel(self) -> None:
        """Ask the ``execute`` running now on another thread to stop soon; it then raises.
        Thread-safe; does nothing when no ``execute`` runs. The next one is unaffected."""
        ...


@runtime_checkable
class RequestBackend(Protocol):
    """A Backend that takes a batch as its requests, one per client request, not as packed
    batch tensors (Triton's Python backend: ``execute`` gets a list of requests). Its batches
    never run on the event loop (it waits on a model process)."""

    def execute_requests(
        self, requests: Sequence[InferRequest]
    ) -> list[dict[str, OutputTensor] | PeregrineError]:
        """Per request, in order: the outputs it produced (declared outputs only, each as the
        config types it), or the error that request alone failed with. Raises for a failure of
        the whole batch. Blocking."""
        ...


class BackendFactory(Protocol):
    """Loads instances of one backend kind. Blocking; called from a loader thread."""

    @property
    def parameter_keys(self) -> Sequence[Key[object]]:
        """The config.pbtxt ``parameters`` keys this backend owns; the repository checks a
        model's keys against them (and the other components') when it loads."""
        ...

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> Backend: ...

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        """Fill inputs/outputs the config left out from the model file (auto-complete)."""
        ...


class Scheduler(Protocol):
    """Per model version: queues requests, forms batches, runs them on the backend instances.

    Lives on the event loop. ``submit`` queues the request, or raises at once (not ready, queue
    full, bad priority); the future resolves with the response, and cancelling it withdraws the
    request. A future, not a coroutine: a caller can wait without a task of its own per
    request (a stream hangs a callback on it). Knows nothing of protobuf.
    """

    def submit(self, request: InferRequest, lone: bool = False) -> asyncio.Future[InferResponse]:
        """``lone``: no other request is expected to come with this one (a unary call, as
        opposed to a stream's message): an idle scheduler may dispatch it at once."""
        ...

    @property
    def healthy(self) -> bool:
        """False once the scheduler failed or closed: its model then reports not ready."""
        ...

    @property
    def problem(self) -> str:
        """Why the scheduler is not healthy (its instances quarantined, say); "" while it is.
        Shown as the version's reason in the repository index."""
        ...

    def inflight(self) -> int:
        """Requests queued or executing."""
        ...

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait for the accepted ones; True if all finished."""
        ...

    async def close(self) -> None: ...


class ModelMetrics(Protocol):
    """The figures one model version keeps (statistics, histograms).

    Called on the event loop thread only; never blocks. The scheduler reports each batch once
    (its requests' queue times and, for those answered, their durations) and each request
    that fails; the data plane only the requests refused before they were queued.
    """

    def request_failed(self, reason: str, ns: int) -> None:
        """``reason`` as Triton's failure metric labels it (PeregrineError.reason)."""
        ...

    def count_pending(self, count: Callable[[], int]) -> None:
        """Where to read the number of queued requests when the figures are read."""
        ...

    def unavailable(self) -> None:
        """The version can no longer serve (every instance quarantined): not ready."""
        ...

    def batch_done(self, started_ns: int, finished_ns: int, enqueued_ns: Sequence[int],
                   answered_ns: Sequence[int], executions: Sequence[Execution]) -> None:
        """One batch ran from ``started_ns`` to ``finished_ns``: when each of its requests was
        queued (``enqueued_ns``), the same for those it answered (``answered_ns``), and its
        backend calls."""
        ...

    def cache_hit(self, lookup_ns: int, total_ns: int) -> None:
        """A request answered from the response cache: ``lookup_ns`` to find and copy out
        its answer, ``total_ns`` since the data plane took it (a success, as Triton counts
        hits; never an inference or an execution)."""
        ...

    def cache_miss(self, ns: int) -> None:
        """A request the response cache could not answer, once it is done: ``ns`` spent
        looking it up and storing its answer (when it succeeded)."""
        ...


class QueuedRequest(Protocol):
    """What a batch tracer reads of a request the batch answered (the batcher's entry)."""

    @property
    def request(self) -> InferRequest: ...

    @property
    def enqueue_ns(self) -> int: ...

    @property
    def rows(self) -> int: ...


class BatchTracer(Protocol):
    """Tells tracing of every batch (server/tracing's Tracer). Given to the batchers only
    when tracing is configured; called once per batch on the event loop thread, after the
    batch's requests were answered; never blocks."""

    def batch_done(self, entries: Sequence[QueuedRequest], start_ns: int, end_ns: int,
                   executions: Sequence[Execution]) -> None: ...


#: Makes the scheduler of one loaded model version (injected by the composition root, so the
#: repository never builds batchers itself). Called on the event loop thread.
SchedulerFactory = Callable[[ModelSpec, str, Sequence["Backend"], ModelMetrics], Scheduler]


class ModelPacker(Protocol):
    """One model version's packing: gathers per-request tensors into batch tensors and scatters
    batch outputs back by rows.

    Called from the version's executor threads (several at once when it has several backend
    instances), never from the event loop; blocking. The compiled and the reference
    implementations are interchangeable behind it and produce identical bytes.
    """

    def pack(
        self, requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> AbstractContextManager[Mapping[str, Array]]:
        """The batch inputs (per-request rows ``rows``), valid until the context exits.

        Buffers may come from a pool and be reused once the context exits: read the outputs
        (``unpack``) inside it. Preprocessing declared by the model runs here.
        """
        ...

    def pack_rows(self, inputs: Mapping[str, Array]) -> AbstractContextManager[Mapping[str, Array]]:
        """One batch given as whole arrays (what ``pack`` does with a single request: the
        arrays themselves, or the declared preprocessing into a pooled buffer), valid until
        the context exits. For offline scoring, which cuts a file's rows into batches."""
        ...

    def unpack(
        self, outputs: Mapping[str, Array], requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> list[dict[str, OutputTensor]]:
        """Per request, its rows of every declared output (outputs the spec does not declare
        are dropped), an output scattered like a ragged input cut back to that request's
        extents of it. The tensors own their data (copies or ``raw`` bytes) or view the
        backend's output arrays, never a pooled input buffer."""
        ...


class Packer(Protocol):
    """Makes the packing of each model version; shared by the repository. Thread-safe."""

    def for_model(self, spec: ModelSpec, version: str,
                  allocator: Callable[[int], Array] | None = None) -> ModelPacker:
        """Called once per loaded version, by its scheduler's constructor; ``allocator``
        (its backend's, when it has one) makes the version's batch buffers."""
        ...


class ModelCatalog(Protocol):
    """An immutable snapshot of the loaded models, as the dataplane reads it. The repository
    manager (the write side) publishes a new one on every change."""

    def get(self, name: str, version: str) -> LoadedModel:
        """The ready version, the policy's latest for an empty ``version``.

        Raises ModelNotFound for an unknown model or version, ModelNotReady for one not ready.
        """
        ...


class ModelSource(Protocol):
    """Where model directories come from: the filesystem (default) or a registry.

    ``fetch`` returns a local directory in Triton's layout (``config.pbtxt`` optional,
    ``<version>/model.onnx``), materialising it first when the source is remote. Blocking; the
    repository calls it from a worker thread.
    """

    def list(self) -> list[str]:
        """Names of the models the source offers. Raises ModelLoadError when unreachable."""
        ...

    def fetch(self, name: str) -> Path: ...

    def fingerprint(self, name: str) -> str:
        """A value that changes whenever what ``fetch`` would return changes (for polling)."""
        ...


@runtime_checkable
class WatchableSource(Protocol):
    """A ModelSource that can also announce changes, so polling reacts at once."""

    def watch(self) -> AsyncIterator[None]:
        """Yields whenever something under the source may have changed. Runs on the loop."""
        ...


class Router(Protocol):
    """Picks the variant of each request from the model's routing table. On the event loop;
    never blocks. The table is swapped atomically by the router's own control methods."""

    def route(self, request: InferRequest) -> RouteDecision | None:
        """None when the model has no table or the request names a version."""
        ...

    def has_route(self, model: str) -> bool:
        """Whether ``model`` has a routing table (its requests naming no version are routed)."""
        ...

    def finish(
        self,
        decision: RouteDecision,
        request: InferRequest,
        result: InferResponse | BaseException,
        seconds: float,
    ) -> None:
        """Count the outcome for the variant (the response, or the error it failed with:
        only the server's faults count against it); mirror a served request to the shadow."""
        ...


class ResponseCache(Protocol):
    """One loaded version's share of the server's response cache (--cache-config), for a
    model with ``response_cache { enable: true }``.

    On the event loop thread only, no lock. A reload of the same version number gets a
    share of its own, so an answer of one load is never served by another.
    """

    def key(self, request: InferRequest) -> Hashable:
        """What identifies ``request``'s answer: its inputs (names, datatypes, shapes and
        bytes), requested outputs and the parameters that may change the answer."""
        ...

    def parsed_key(self, parsed: ParsedRequest) -> Hashable | None:
        """The key of the request ``parsed`` decodes to, taken before decoding; None when the
        request must be decoded and validated to be sure of it (cache/key.py)."""
        ...

    def get(self, key: Hashable, request_id: str) -> InferResponse | None:
        """The stored answer under ``key`` as a response to request ``request_id``, or None."""
        ...

    def put(self, key: Hashable, response: InferResponse) -> None:
        """Store a successful answer (nothing once the share is dropped)."""
        ...

    def drop(self) -> None:
        """Forget every answer of this share and store no more: its version is unloaded."""
        ...


class ResponseCacheFactory(Protocol):
    """The server's response cache, handing each loaded version its share (injected into the
    repository manager by the composition root)."""

    def for_version(self, spec: ModelSpec, version: str) -> ResponseCache: ...


class LoadedModel(Protocol):
    @property
    def spec(self) -> ModelSpec: ...

    @property
    def version(self) -> str: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def metrics(self) -> ModelMetrics: ...

    @property
    def cache(self) -> ResponseCache | None:
        """The version's response cache; None when its model does not use one."""
        ...


class DriftSample(NamedTuple):
    """One successful request as the dataplane hands it to drift monitoring."""

    model: LoadedModel
    request: InferRequest
    response: InferResponse


class DriftSink(Protocol):
    """Takes samples of live traffic for drift analysis against each version's reference.

    Called by the dataplane on the event loop thread after every successful response when drift
    monitoring is wired (the dataplane holds None otherwise: one attribute check per request).
    ``offer`` never blocks, never raises for a full buffer, and does no I/O: it decides whether
    to sample, copies what it keeps and returns False when it drops or skips the sample. The
    analysis runs elsewhere (a background thread owned by the sink's implementation).
    """

    def offer(self, sample: DriftSample) -> bool: ...
