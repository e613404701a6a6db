"""The soak's clients: each kind of traffic in its own thread, every outcome counted by kind
and status, checked against the statuses that kind expects.

- :class:`Unary` and :class:`Streamed`: valid requests to the example models (answers checked:
  the CNN against ONNX Runtime in-process, the text encoder's echo, the MLPs' label against
  their probabilities); a stream is closed and a new one opened every ``STREAM_ROUNDS``
  rounds.
- :class:`SharedMemory`: create two POSIX regions, register them, run requests whose input
  and output live there, unregister, destroy; a new pair (new keys) every cycle.
- :class:`Errors`: requests that must fail, each with its status: a wrong shape
  (INVALID_ARGUMENT), an unknown model (NOT_FOUND), an input past ``--max-request-bytes``
  (RESOURCE_EXHAUSTED).
- :class:`Swapper`: publishes a new version of the swapped model every ``every_s`` seconds
  (alternating between two model files), waits until it serves and its predecessor is
  gone, then removes the predecessor's directory.
- :class:`Router`: SetRoute / ClearRoute on the routed model every ``every_s`` seconds.

Every other status, an UNAVAILABLE during a swap included, is unexpected.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc

#: The statuses each kind of request may end with; any other is an unexpected error.
EXPECTED: dict[str, frozenset[str]] = {
    "bad_shape": frozenset({"INVALID_ARGUMENT"}),
    "unknown_model": frozenset({"NOT_FOUND"}),
    "oversize": frozenset({"RESOURCE_EXHAUSTED"}),
}
OK = "OK"
WRONG = "WRONG_ANSWER"
TIMEOUT_S = 10.0
STREAM_ROUNDS = 50
STREAM_BATCH = 16
SHM_REQUESTS = 10
KEPT_MESSAGES = 20
SWAP_TIMEOUT_S = 60.0


def expected(kind: str) -> frozenset[str]:
    """``kind`` is ``family/detail`` (``unary/cnn``, ``error/oversize``); errors by detail."""
    return EXPECTED.get(kind.rsplit("/", 1)[-1], frozenset({OK}))


def status_of(error: InferenceServerException) -> str:
    status = error.status()
    return str(status).removeprefix("StatusCode.") if status else "STREAM_ERROR"


@dataclass
class Tally:
    """Outcomes by kind and status, shared by every thread; unexpected ones keep a message."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    unexpected_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str, status: str, message: str = "") -> None:
        with self._lock:
            self.counts[(kind, status)] += 1
            if status not in expected(kind):
                self.unexpected_count += 1
                if len(self.unexpected) < KEPT_MESSAGES:
                    self.unexpected.append({
                        "at_s": round(time.monotonic() - self.started, 1), "kind": kind,
                        "status": status, "message": message[:300],
                    })

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self.counts)


# -- requests and their checks ----------------------------------------------------------------

#: An answer's outputs by name (``InferResult.as_numpy``, or a shared-memory region's).
Outputs = Callable[[str], "np.ndarray[Any, Any] | None"]


@dataclass(frozen=True)
class Request:
    """One valid request of a model and the check of its answer."""

    model: str
    inputs: Callable[[], list[grpcclient.InferInput]]
    check: Callable[[Outputs], bool]


def _tensor(name: str, array: np.ndarray[Any, Any], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _mlp_ok(outputs: Outputs) -> bool:
    probabilities, label = outputs("probabilities"), outputs("label")
    return (probabilities is not None and label is not None
            and bool(np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4))
            and np.array_equal(label[:, 0], probabilities.argmax(axis=1)))


def requests(cnn_answer: np.ndarray[Any, Any], image: np.ndarray[Any, Any],
             swapped: str, routed: str) -> dict[str, Request]:
    """One valid request per example model, by model; ``cnn_answer`` is what ONNX Runtime
    in-process answers for ``image`` ([1, 3, 32, 32] FP32)."""
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 17, size=(1, 64)).astype(np.float32)
    raw_image = rng.integers(0, 256, size=(1, 40, 48, 3), dtype=np.uint8)
    text = np.array([[b"hello"]], dtype=np.object_)

    def cnn_ok(outputs: Outputs) -> bool:
        scores = outputs("scores")
        return scores is not None and bool(np.allclose(scores, cnn_answer, rtol=1e-4,
                                                       atol=1e-6))

    def softmax_ok(outputs: Outputs) -> bool:
        scores = outputs("scores")
        return scores is not None and scores.shape == (1, 10) and abs(
            float(scores.sum()) - 1) < 1e-4

    def echo_ok(outputs: Outputs) -> bool:
        echoed = outputs("text_out")
        return echoed is not None and echoed.tolist() == text.tolist()

    mix = [
        Request(swapped, lambda: [_tensor("input", digits, "FP32")], _mlp_ok),
        Request(routed, lambda: [_tensor("input", digits, "FP32")], _mlp_ok),
        Request("cnn", lambda: [_tensor("image", image, "FP32")], cnn_ok),
        Request("image_classifier", lambda: [_tensor("image", raw_image, "UINT8")], softmax_ok),
        Request("text_encoder", lambda: [_tensor("text", text, "BYTES")], echo_ok),
    ]
    return {r.model: r for r in mix}


# -- the workers ------------------------------------------------------------------------------


class Worker(threading.Thread):
    """A daemon thread calling ``round()`` until ``stop`` is set. An exception ends it and
    counts as an unexpected ``crash/<name>``: a dead worker fails the soak."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.tally, self.stop = url, tally, stop

    def run(self) -> None:
        try:
            with grpcclient.InferenceServerClient(self.url) as client:
                while not self.stop.is_set():
                    self.round(client)
        except Exception as exc:
            self.tally.count(f"crash/{self.name}", "CRASHED", f"{type(exc).__name__}: {exc}")

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        raise NotImplementedError

    def call(self, kind: str, action: Callable[[], bool],
             failed: str = "answer failed its check") -> bool:
        """Run one request; count OK, a failed check (``failed``), or the error's status.
        True when it was OK."""
        try:
            ok = action()
        except InferenceServerException as exc:
            self.tally.count(kind, status_of(exc), exc.message() or str(exc))
            return False
        self.tally.count(kind, OK if ok else WRONG, "" if ok else failed)
        return ok


class Unary(Worker):
    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 mix: dict[str, Request]) -> None:
        super().__init__(name, url, tally, stop)
        self._cycle = itertools.cycle(mix.values())

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        request = next(self._cycle)
        self.call(f"unary/{request.model}", lambda: request.check(
            client.infer(request.model, request.inputs(), client_timeout=TIMEOUT_S).as_numpy))


class Streamed(Worker):
    """Rounds of ``STREAM_BATCH`` requests on one stream, every answer awaited before the
    next round; the stream is closed and a new one opened every ``STREAM_ROUNDS`` rounds."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 mix: dict[str, Request]) -> None:
        super().__init__(name, url, tally, stop)
        self._mix = mix
        self._cycle = itertools.cycle(mix.values())
        self._answered = threading.Semaphore(0)

    def _on_answer(self, result: grpcclient.InferResult | None,
                   error: InferenceServerException | None) -> None:
        if error is not None or result is None:
            self.tally.count("stream/?", "STREAM_ERROR" if error is None else status_of(error),
                             "" if error is None else error.message() or str(error))
        else:
            model = result.get_response().model_name
            ok = self._mix[model].check(result.as_numpy)
            self.tally.count(f"stream/{model}", OK if ok else WRONG,
                             "" if ok else "answer failed its check")
        self._answered.release()

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        client.start_stream(callback=self._on_answer)
        try:
            for _ in range(STREAM_ROUNDS):
                batch = [next(self._cycle) for _ in range(STREAM_BATCH)]
                for request in batch:
                    client.async_stream_infer(request.model, request.inputs())
                for _ in batch:
                    if not self._answered.acquire(timeout=TIMEOUT_S):
                        self.tally.count("stream/?", "DEADLINE_EXCEEDED", "no answer in time")
                if self.stop.is_set():
                    break
        finally:
            client.stop_stream()


class SharedMemory(Worker):
    """One cycle: create an input and an output region (new keys), register both, run
    ``SHM_REQUESTS`` CNN requests reading the input from one and writing the scores into
    the other, unregister both, destroy them."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 shm: types.ModuleType, image: np.ndarray[Any, Any], cnn: Request) -> None:
        super().__init__(name, url, tally, stop)
        self._shm, self._image, self._cnn = shm, image, cnn
        self._cycles = itertools.count()

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        tag = f"soak-{os.getpid()}-{self.name}-{next(self._cycles)}"
        sizes = {"in": self._image.nbytes, "out": 10 * 4}
        shm = self._shm

        def register() -> bool:
            for side, size in sizes.items():
                client.register_system_shared_memory(f"{side}-{tag}", f"/{side}-{tag}", size)
            return True

        def infer() -> bool:
            image = grpcclient.InferInput("image", list(self._image.shape), "FP32")
            image.set_shared_memory(f"in-{tag}", sizes["in"])
            scores = grpcclient.InferRequestedOutput("scores")
            scores.set_shared_memory(f"out-{tag}", sizes["out"])
            client.infer("cnn", [image], outputs=[scores], client_timeout=TIMEOUT_S)
            answer = shm.get_contents_as_numpy(handles["out"], np.float32, [1, 10])
            return self._cnn.check(lambda name: answer if name == "scores" else None)

        def unregister() -> bool:
            for side in sizes:
                client.unregister_system_shared_memory(f"{side}-{tag}")
            return True

        handles = {side: shm.create_shared_memory_region(f"{side}-{tag}", f"/{side}-{tag}", size)
                   for side, size in sizes.items()}
        try:
            shm.set_shared_memory_region(handles["in"], [self._image])
            self.call("shm/register", register)
            for _ in range(SHM_REQUESTS):
                self.call("shm/infer", infer)
            self.call("shm/unregister", unregister)
        finally:
            for handle in handles.values():
                shm.destroy_shared_memory_region(handle)


class Errors(Worker):
    """Requests that must fail, in turn, each with its own expected status (EXPECTED)."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 model: str, oversize_bytes: int, pause_s: float = 0.02) -> None:
        super().__init__(name, url, tally, stop)
        width = oversize_bytes // 4 + 1
        self._cases = itertools.cycle([
            ("bad_shape", model, np.zeros((1, 63), dtype=np.float32)),
            ("unknown_model", "no_such_model", np.zeros((1, 64), dtype=np.float32)),
            ("oversize", model, np.zeros((1, width), dtype=np.float32)),
        ])
        self._pause_s = pause_s

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        kind, model, data = next(self._cases)
        self.call(f"error/{kind}", lambda: client.infer(
            model, [_tensor("input", data, "FP32")], client_timeout=TIMEOUT_S) is None)
        self.stop.wait(self._pause_s)


# -- control: swaps and routes ----------------------------------------------------------------


def publish(model_dir: Path, version: int, source: Path) -> None:
    """Copy ``source`` (a version directory) under a dot-prefixed name inside the model
    directory (a polling server ignores it), then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=model_dir))
    shutil.copytree(source, staging / "v")
    os.rename(staging / "v", model_dir / str(version))
    staging.rmdir()


def retire(model_dir: Path, version: int) -> None:
    """Remove a version directory the atomic way: rename it away, then delete it."""
    hidden = model_dir / f".retired-{version}"
    os.rename(model_dir / str(version), hidden)
    shutil.rmtree(hidden)


class Swapper(Worker):
    """Every ``every_s`` seconds: publish the next version of the swapped model (its files
    alternate between ``sources``), wait until it is READY and its predecessor has left
    RepositoryIndex, then delete the predecessor's directory. ``swaps`` records when each
    was published and done (seconds since the tally started)."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 model_dir: Path, first_version: int, sources: list[Path],
                 every_s: float) -> None:
        """Version ``v`` is a copy of ``sources[(v - 1) % len(sources)]``."""
        super().__init__(name, url, tally, stop)
        self._model_dir, self._version, self._sources = model_dir, first_version, sources
        self._every_s = every_s
        self.swaps: list[dict[str, float | int]] = []

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        if self.stop.wait(self._every_s):
            return
        old, new = self._version, self._version + 1
        published = time.monotonic()
        publish(self._model_dir, new, self._sources[(new - 1) % len(self._sources)])
        self._version = new
        if not self.call("swap/version", lambda: self._swapped(client, new),
                         f"version {new} not alone and READY within {SWAP_TIMEOUT_S:.0f} s"):
            return  # both stay on disk; the next swap goes on from the new one
        retire(self._model_dir, old)
        self.swaps.append({"version": new,
                           "published_s": round(published - self.tally.started, 2),
                           "done_s": round(time.monotonic() - self.tally.started, 2)})

    def _swapped(self, client: grpcclient.InferenceServerClient, new: int) -> bool:
        """True once RepositoryIndex shows ``new`` READY and no other version."""
        name = self._model_dir.name
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while time.monotonic() < deadline:
            versions = {m.version: m.state for m in client.get_model_repository_index().models
                        if m.name == name and m.version}
            if versions == {str(new): "READY"}:
                return True
            time.sleep(0.05)
        return False


class Router(Worker):
    """Every ``every_s`` seconds the next of: an A/B table, a skewed table with a shadow,
    no table (ClearRoute)."""

    def __init__(self, name: str, url: str, tally: Tally, stop: threading.Event,
                 model: str, every_s: float) -> None:
        super().__init__(name, url, tally, stop)
        variants = [admin.Variant(name="a", version="1"), admin.Variant(name="b", version="2")]
        ab = admin.RouteTable(model=model, variants=variants)
        ab.variants[0].weight, ab.variants[1].weight = 50, 50
        skewed = admin.RouteTable(model=model, variants=variants, shadow=admin.Shadow(
            target=admin.Variant(name="shadow", version="2"), fraction=0.2))
        skewed.variants[0].weight, skewed.variants[1].weight = 90, 10
        self._steps = itertools.cycle([ab, skewed, None])
        self._model, self._every_s = model, every_s

    def round(self, client: grpcclient.InferenceServerClient) -> None:
        """One change, on a connection of its own: connections come and go too."""
        if self.stop.wait(self._every_s):
            return
        table = next(self._steps)
        with grpc.insecure_channel(self.url) as channel:
            stub = admin_grpc.PeregrineAdminStub(channel)
            try:
                if table is None:
                    stub.ClearRoute(admin.RouteRequest(model=self._model), timeout=TIMEOUT_S)
                else:
                    stub.SetRoute(admin.SetRouteRequest(table=table), timeout=TIMEOUT_S)
            except grpc.RpcError as exc:
                self.tally.count("route/change", exc.code().name, str(exc.details()))
                return
        self.tally.count("route/change", OK)
