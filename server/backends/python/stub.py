"""A model process: ``python -m server.backends.python.stub``, started by the server for each
instance of a Python (``model.py``) or MLflow pyfunc model.

It imports the standard library, numpy and this package's wire and model API only (never the
server), reads its instructions from the socket the server passed it and runs the model:

- ``init``: import ``model.py`` (its directory first on ``sys.path``) or prepare the pyfunc
  adapter, call ``initialize(args)``; answer ``ready`` or the error;
- ``execute``: the batch's requests, their inputs read from the inputs region; call
  ``execute(requests)``; write each response's outputs in the outputs region and answer their
  descriptors, or each request's error, or the batch's;
- ``auto_complete``: call ``TritonPythonModel.auto_complete_config`` on the config given and
  answer the completed config (a process of its own, started for that alone);
- ``finalize``: call ``finalize()``, answer, exit.

The model's prints go to the process's stdout and stderr, which the server logs under the
model's name. The process exits when the server closes the socket, and within a second of the
server's death (its parent changes), so a model stuck in a call never outlives the server.
"""

from __future__ import annotations

import argparse
import importlib.util
import mmap
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from server.backends.python import triton_python_backend_utils as pb_utils
from server.backends.python import wire
from server.types import DataType

#: How often the process checks that the server is still its parent.
PARENT_CHECK_S = 1.0
#: The code a failed model process exits with.
FAILED = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peregrine model process")
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--region-bytes", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    options = parser.parse_args(argv)
    _watch_parent(options.parent)
    for fd in (options.socket, options.memory):
        os.set_inheritable(fd, False)  # not to the model's own subprocesses
    sys.modules["triton_python_backend_utils"] = pb_utils
    channel = socket.socket(fileno=options.socket)
    memory = mmap.mmap(options.memory, 2 * options.region_bytes)
    os.close(options.memory)
    inputs, outputs = wire.regions(memory, options.region_bytes)
    try:
        return Stub(channel, inputs, outputs).serve()
    except wire.ChannelClosed:
        return 0  # the server is gone or closed the instance


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(FAILED)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _error(exc: BaseException) -> dict[str, Any]:
    """An exception as the server shows it: the model's own message, and the traceback for the
    log (written to stderr here too, so it reaches the server's log with the model's name)."""
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    text = str(exc) if isinstance(exc, pb_utils.TritonModelException) \
        else f"{type(exc).__name__}: {exc}"
    return {"message": text, "code": "INTERNAL"}


class Stub:
    def __init__(self, channel: socket.socket, inputs: wire.Region,
                 outputs: wire.Region) -> None:
        self._channel = channel
        self._inputs = inputs
        self._outputs = outputs
        self._model: Any = None

    def serve(self) -> int:
        while True:
            message = wire.receive(self._channel)
            op = message.get("op")
            if op == "init":
                reply = self._init(message)
            elif op == "execute":
                reply = self._execute(message["requests"])
            elif op == "auto_complete":
                reply = self._auto_complete(message)
            elif op == "finalize":
                wire.send(self._channel, self._finalize())
                return 0
            else:
                reply = {"error": {"message": f"unknown operation {op!r}", "code": "INTERNAL"}}
            wire.send(self._channel, reply)
            if "error" in reply and op in ("init", "auto_complete"):
                return FAILED

    # -- loading ---------------------------------------------------------------------------

    def _model_class(self, model_file: str) -> Any:
        path = Path(model_file)
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location("model", path)
        if spec is None or spec.loader is None:
            raise pb_utils.TritonModelException(f"cannot import {path.name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["model"] = module
        spec.loader.exec_module(module)
        model_class = getattr(module, "TritonPythonModel", None)
        if model_class is None:
            raise pb_utils.TritonModelException(f"{path.name} defines no class TritonPythonModel")
        return model_class

    def _init(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            if message["kind"] == "mlflow_pyfunc":
                from server.backends.python.pyfunc import PyfuncModel

                self._model = PyfuncModel()
            else:
                self._model = self._model_class(message["model_file"])()
            if not callable(getattr(self._model, "execute", None)):
                raise pb_utils.TritonModelException("TritonPythonModel has no execute method")
            initialize = getattr(self._model, "initialize", None)
            if initialize is not None:
                initialize(dict(message["args"]))
        except BaseException as exc:
            return {"error": _error(exc)}
        return {"op": "ready", "pid": os.getpid()}

    def _auto_complete(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            model_class = self._model_class(message["model_file"])
            config = pb_utils.ModelConfig(message["config"])
            complete = getattr(model_class, "auto_complete_config", None)
            if complete is not None:
                config = complete(config)
            return {"config": config.as_dict()}
        except BaseException as exc:
            return {"error": _error(exc)}

    def _finalize(self) -> dict[str, Any]:
        finalize = getattr(self._model, "finalize", None)
        try:
            if finalize is not None:
                finalize()
        except BaseException as exc:
            return {"error": _error(exc)}
        return {"op": "finalized"}

    # -- a batch ---------------------------------------------------------------------------

    def _execute(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            requests = [self._request(r) for r in batch]
            responses = self._model.execute(requests)
            if responses is None:
                raise pb_utils.TritonModelException(
                    "execute returned None: decoupled mode (responses sent through a response "
                    "sender) is not supported; return one InferenceResponse per request")
            responses = list(responses)
            if len(responses) != len(requests):
                raise pb_utils.TritonModelException(
                    f"execute returned {len(responses)} responses for {len(requests)} requests")
        except BaseException as exc:
            return {"error": _error(exc)}
        self._outputs.reset()
        return {"responses": [self._response(i, r) for i, r in enumerate(responses)]}

    def _request(self, entry: dict[str, Any]) -> pb_utils.InferenceRequest:
        tensors = [pb_utils.Tensor(d[0], self._inputs.array(d),
                                   pb_utils._TYPE_CODES[_CONFIG_NAMES[d[1]]])
                   for d in entry["inputs"]]
        return pb_utils.InferenceRequest(
            requested_output_names=entry["outputs"], inputs=tensors, request_id=entry["id"],
            timeout=entry.get("timeout", 0), parameters=entry.get("parameters") or {})

    def _response(self, index: int, response: Any) -> dict[str, Any]:
        if not isinstance(response, pb_utils.InferenceResponse):
            return {"error": {"message": f"execute returned {type(response).__name__} for "
                              f"request {index}, not an InferenceResponse", "code": "INTERNAL"}}
        error = response.error()
        if error is not None:
            code = error.code() if isinstance(error, pb_utils.TritonError) \
                else pb_utils.TritonError.INTERNAL
            return {"error": {"message": str(error),
                              "code": pb_utils.ERROR_CODE_NAMES.get(code, "INTERNAL")}}
        outputs = []
        for tensor in response.output_tensors():
            if not isinstance(tensor, pb_utils.Tensor):
                return {"error": {"message": f"an output of request {index} is a "
                                  f"{type(tensor).__name__}, not a Tensor", "code": "INTERNAL"}}
            try:
                outputs.append(self._outputs.put(tensor.name(), tensor.as_numpy(),
                                                 _DATATYPES[tensor.wire_datatype]))
            except wire.RegionFull as full:
                return {"error": {"message": f"the outputs of request {index} need more than "
                                  f"the {full.capacity} bytes of the outputs region",
                                  "code": "RESOURCE_EXHAUSTED"}}
        return {"outputs": outputs}


_DATATYPES = {t.wire: t for t in DataType}
_CONFIG_NAMES = {t.wire: t.config_name for t in DataType}


if __name__ == "__main__":
    sys.exit(main())
