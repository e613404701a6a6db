"""One instance of a Python (``model.py``) or MLflow pyfunc model: its model process, and a
new one in its place when it dies.

A batch runs as its requests (``execute_requests``): each request's inputs are written to the
inputs region, the request list goes over the socket, and each response's outputs are copied
out of the outputs region as the raw bytes the encoder sends. The calling thread (the
instance's worker) blocks on the socket; the event loop never does.

When the process dies (the model crashed, or was killed for overrunning the execution
timeout), only the batch it was running fails, UNAVAILABLE, saying how it ended; the waiter
thread starts a new process at once, and the next batch waits for it. Should that fail, each
following batch tries once more before failing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence

import grpc

from server.backends.python.process import Launch, ModelProcess, ProcessExited
from server.backends.python.wire import Descriptor, tensor_nbytes
from server.errors import (
    BackendError,
    BoundExceeded,
    InstanceUnavailable,
    ModelError,
    ModelLoadError,
    ModelNotReady,
    PeregrineError,
)
from server.spec import ModelSpec
from server.types import Array, DataType, InferRequest, OutputTensor

log = logging.getLogger(__name__)

#: How long finalize may take at unload before the process is killed.
FINALIZE_TIMEOUT_S = 5.0
#: TritonError code names -> the status the client gets.
_STATUS = {
    "UNKNOWN": grpc.StatusCode.UNKNOWN, "INTERNAL": grpc.StatusCode.INTERNAL,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND, "INVALID_ARG": grpc.StatusCode.INVALID_ARGUMENT,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE, "UNSUPPORTED": grpc.StatusCode.UNIMPLEMENTED,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS, "CANCELLED": grpc.StatusCode.CANCELLED,
}
#: The parameter that sizes the shared memory, named in refusals.
SHM_KEY = "python_shm_bytes"

#: A request's outputs by name, or the error it alone failed with.
RequestResult = dict[str, OutputTensor] | PeregrineError


class PythonInstance:
    """A Backend and a RequestBackend; ``cancel`` kills a process running a batch."""

    def __init__(self, spec: ModelSpec, launch: Launch, description: str) -> None:
        self._spec = spec
        self._launch = launch
        self._description = description
        self._where = f"model '{spec.name}' version {launch.version} instance {launch.instance}"
        self._outputs = {t.name: t.datatype for t in spec.outputs}
        self._inputs = {t.name: t.datatype for t in spec.inputs}
        self._lock = threading.Condition()
        self._closed = False
        #: A new process is being started in place of a dead one.
        self._restarting = False
        #: A batch is inside the process now (cancel kills it only then).
        self._running = False
        #: Set by cancel: the batch waiting for a new process gives up.
        self._cancelled = False
        self._process: ModelProcess | None = None
        self._process = self._start()

    @property
    def description(self) -> str:
        return self._description

    @property
    def pid(self) -> int | None:
        """The model process's id (None between a death and its replacement)."""
        process = self._process
        return None if process is None else process.pid

    # -- the Backend interface -----------------------------------------------------------------

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        self.execute(inputs)

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """One request made of ``inputs`` (warm-up runs): its outputs' arrays."""
        request = InferRequest(model_name=self._spec.name, model_version=self._launch.version,
                               id="", inputs=dict(inputs),
                               input_types={n: self._inputs[n] for n in inputs})
        [result] = self.execute_requests([request])
        if isinstance(result, PeregrineError):
            raise result
        return {name: tensor.data for name, tensor in result.items()}

    def cancel(self) -> None:
        """The running batch overran the execution timeout: kill the process running it (a new
        one replaces it), or stop waiting for a new one."""
        with self._lock:
            self._cancelled = True
            process = self._process if self._running else None
            self._lock.notify_all()
        if process is not None:
            log.warning("model process killed: its batch overran the execution timeout",
                        extra={"model": self._spec.name, "version": self._launch.version,
                               "instance": self._launch.instance, "pid": process.pid})
            process.kill()

    def close(self) -> None:
        """finalize() and stop the process (killed when it takes longer than
        FINALIZE_TIMEOUT_S)."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
            self._lock.notify_all()
        if process is not None:
            process.stop(FINALIZE_TIMEOUT_S)

    # -- the RequestBackend interface ------------------------------------------------------------

    def execute_requests(self, requests: Sequence[InferRequest]) -> list[RequestResult]:
        """Per request, its outputs or its own error. Raises InstanceUnavailable when the
        process dies under the batch, ModelError when the model's execute raised."""
        with self._lock:
            self._cancelled = False
        process = self._acquire()
        results: list[RequestResult | None] = [None] * len(requests)
        try:
            for chunk, entries in self._chunks(process, requests, results):
                try:
                    reply = process.call({"op": "execute", "requests": entries})
                except ProcessExited as exc:
                    raise InstanceUnavailable(
                        f"{self._where}: its model process {exc} while running this batch; "
                        "a new process is being started") from None
                self._read(process, reply, chunk, results)
        finally:
            with self._lock:
                self._running = False
            if process.exited.is_set():
                process.close()
        return [r if r is not None else BackendError(f"{self._where} gave no answer")
                for r in results]

    def _acquire(self) -> ModelProcess:
        """The live process, once a replacement being started is up; a replacement that
        failed is tried once more now. Marks the instance running."""
        with self._lock:
            while not self._closed and not self._cancelled and (
                    self._restarting or (self._process is not None and self._process.dead)):
                self._lock.wait()
            if self._closed or self._cancelled:
                raise ModelNotReady(f"{self._where} was closed" if self._closed
                                    else f"{self._where} was cancelled")
            process = self._process
            if process is not None:
                self._running = True
                return process
            self._restarting = True
        try:
            process = self._start()
        except ModelLoadError as exc:
            with self._lock:
                self._restarting = False
                self._lock.notify_all()
            raise InstanceUnavailable(f"{self._where}: its model process died and could not "
                                      f"be started again: {exc}") from None
        with self._lock:
            self._restarting = False
            self._lock.notify_all()
            closed = self._closed
            if not closed:
                self._process = process
                self._running = True
        if closed:
            process.stop(FINALIZE_TIMEOUT_S)
            raise ModelNotReady(f"{self._where} was closed")
        return process

    def _chunks(self, process: ModelProcess, requests: Sequence[InferRequest],
                results: list[RequestResult | None]) -> Iterator[
                    tuple[list[int], list[dict[str, object]]]]:
        """The requests in groups whose inputs fit the inputs region together (a request too
        large alone fails with the bound), each group's inputs written when it goes."""
        region = process.inputs
        groups: list[list[int]] = []
        group: list[int] = []
        group_sizes: list[int] = []
        for index, request in enumerate(requests):
            sizes = [tensor_nbytes(v, request.input_types[n]) for n, v in request.inputs.items()]
            if not region.fits(sizes):
                results[index] = BoundExceeded(SHM_KEY, (
                    f"the inputs of request '{request.id}' take {sum(sizes)} bytes, more than "
                    f"the {region.capacity} bytes of {self._where}'s shared memory "
                    f"(parameter {SHM_KEY})"))
                continue
            if group and not region.fits([*group_sizes, *sizes]):
                groups.append(group)
                group, group_sizes = [], []
            group.append(index)
            group_sizes.extend(sizes)
        if group:
            groups.append(group)
        every_output = [t.name for t in self._spec.outputs]
        for group in groups:
            region.reset()
            yield group, [{
                "id": requests[i].id,
                "inputs": [region.put(name, value, requests[i].input_types[name])
                           for name, value in requests[i].inputs.items()],
                "outputs": list(requests[i].requested_outputs or every_output),
                "parameters": requests[i].parameters,
                "timeout": requests[i].timeout_us,
            } for i in group]

    def _read(self, process: ModelProcess, reply: dict[str, object], chunk: list[int],
              results: list[RequestResult | None]) -> None:
        error = reply.get("error")
        if isinstance(error, dict):
            failure = self._model_error(error)
            for index in chunk:
                results[index] = failure
            return
        responses = reply.get("responses")
        if not isinstance(responses, list) or len(responses) != len(chunk):
            raise BackendError(f"{self._where}: the model process answered a malformed reply")
        for index, response in zip(chunk, responses, strict=True):
            results[index] = self._outputs_of(process, response)

    def _model_error(self, error: dict[str, object]) -> PeregrineError:
        message = str(error.get("message", ""))
        code = str(error.get("code", "INTERNAL"))
        if code == "RESOURCE_EXHAUSTED":
            return BoundExceeded(SHM_KEY, f"{self._where}: {message} (parameter {SHM_KEY})")
        return ModelError(message, _STATUS.get(code, grpc.StatusCode.INTERNAL))

    def _outputs_of(self, process: ModelProcess, response: object) -> RequestResult:
        if not isinstance(response, dict):
            return BackendError(f"{self._where}: the model process answered a malformed reply")
        if isinstance(response.get("error"), dict):
            return self._model_error(response["error"])
        outputs: dict[str, OutputTensor] = {}
        for descriptor in response.get("outputs", []):
            try:
                outputs[descriptor[0]] = self._output(process, descriptor)
            except PeregrineError as exc:
                return exc
            except (ValueError, TypeError, IndexError) as exc:
                return BackendError(f"{self._where}: the model process described an output "
                                    f"wrongly ({exc})")
        return outputs

    def _output(self, process: ModelProcess, descriptor: Descriptor) -> OutputTensor:
        name, wire_type, shape = descriptor[0], descriptor[1], descriptor[2]
        declared = self._outputs.get(name)
        if declared is None:
            raise ModelError(f"model '{self._spec.name}' returned output '{name}', which its "
                             f"config does not declare; it declares {sorted(self._outputs)}")
        datatype = DataType.from_wire(wire_type)
        if datatype is not declared and not (declared is DataType.BF16
                                              and datatype is DataType.UINT16):
            raise ModelError(f"model '{self._spec.name}' returned output '{name}' as "
                             f"{datatype.wire}; its config declares {declared.wire}")
        dims = tuple(int(d) for d in shape)
        raw = process.outputs.copy(descriptor)
        if declared is not DataType.BYTES:
            count = 1
            for d in dims:
                count *= d
            if len(raw) != count * declared.itemsize:
                raise ValueError(f"output '{name}' of shape {list(dims)} has {len(raw)} bytes")
        return OutputTensor(name, declared, raw=raw, shape=dims)

    # -- the process -------------------------------------------------------------------------

    def _start(self) -> ModelProcess:
        process = ModelProcess(self._launch, self._exited)
        process.start()
        return process

    def _exited(self, process: ModelProcess) -> None:
        """On the process's waiter thread: a process that died while serving is replaced."""
        with self._lock:
            if self._closed or process is not self._process:
                return
            self._restarting = True  # no batch takes the dead process from now on
            in_use = self._running
        log.error("model process exited", extra={
            "model": self._spec.name, "version": self._launch.version,
            "instance": self._launch.instance, "pid": process.pid,
            "how": process.exit_description()})
        if not in_use:  # else the batch it ran releases its memory when it ends
            process.close()
        try:
            replacement: ModelProcess | None = self._start()
        except ModelLoadError as exc:
            replacement = None
            log.error("model process could not be started again; the next batch tries again",
                      extra={"model": self._spec.name, "version": self._launch.version,
                             "instance": self._launch.instance, "reason": str(exc)})
        with self._lock:
            self._restarting = False
            closed = self._closed
            if not closed:
                self._process = replacement
            self._lock.notify_all()
        if replacement is None:
            return
        if closed:
            replacement.stop(FINALIZE_TIMEOUT_S)
        else:
            log.info("model process started again", extra={
                "model": self._spec.name, "version": self._launch.version,
                "instance": self._launch.instance, "pid": replacement.pid})
