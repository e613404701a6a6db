"""KServe's Python model server (kserve.ModelServer) serving ONNX files with ONNX Runtime.

Runs inside KServe's own virtualenv (bench/.venv-kserve), not Peregrine's::

    python bench/compare/peer_servers/kserve_model.py --grpc_port P --http_port Q \
        --model mlp_classifier=/path/model.onnx --model cnn=/path/model.onnx

KServe binds every interface (gRPC ``[::]:port``, REST ``0.0.0.0``); this script rebinds both
to 127.0.0.1 before starting. KServe has no server-side batching, no ModelStreamInfer, no
ModelStatistics and no tensor metadata in ModelMetadata: the load generator reads its
inputs from a file and reports no server-side split. ``predict`` runs the session on the
event loop, as a plain kserve.Model does.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import grpc.aio
import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import (  # type: ignore[import-not-found]
    InferOutput,
    InferRequest,
    InferResponse,
    Model,
    ModelServer,
)
from kserve import model_server as kserve_model_server

HOST = "127.0.0.1"


def _loopback_only() -> None:
    """Rebind KServe's gRPC and REST servers from all interfaces to 127.0.0.1."""
    server_class: Any = grpc.aio.server().__class__
    original_add = server_class.add_insecure_port

    def add_insecure_port(self: Any, address: str) -> int:
        return int(original_add(self, address.replace("[::]", HOST)))

    server_class.add_insecure_port = add_insecure_port
    original_config = uvicorn.Config.__init__

    def config_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = HOST
        original_config(self, *args, **kwargs)

    uvicorn.Config.__init__ = config_init  # type: ignore[method-assign]


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str, intra_op_threads: int, spinning: bool) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        flag = "1" if spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True

    async def predict(self, payload: InferRequest, headers: Any = None,
                      response_headers: Any = None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        outputs = []
        for name, value in zip(self._outputs, results, strict=True):
            array = np.ascontiguousarray(value)
            output = InferOutput(name=name, shape=list(array.shape),
                                 datatype=_datatype(array.dtype))
            output.set_data_from_numpy(array, binary_data=True)
            outputs.append(output)
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=outputs)


def _datatype(dtype: np.dtype[Any]) -> str:
    names = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64",
             "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
    return names[str(dtype)]


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve_model_server.parser], add_help=False)
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--intra_op_threads", type=int, default=1)
    parser.add_argument("--allow_spinning", type=int, default=0)
    args, _ = parser.parse_known_args()
    _loopback_only()
    models = []
    for entry in args.model:
        name, _, path = entry.partition("=")
        models.append(OnnxModel(name, path, args.intra_op_threads, bool(args.allow_spinning)))
    server = ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1,
                         enable_grpc=True)
    # KServe logs every RPC at INFO; the comparison runs every server at warning level.
    for name in ("kserve", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
