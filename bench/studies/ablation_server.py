"""Peregrine with its ModelInfer path cut short after one stage: where a unary request's time
goes inside the server.

    python -m bench.studies.ablation_server --stage codec serve --model-repository examples/models

Stages, each doing what the one before does and more:

- ``respond``: answer every request with the response the full path gave the first one
  (gRPC and Peregrine's servicer, no per-request work: the no-op floor, through our server);
- ``codec``: + decode the request and encode that cached response;
- ``execute``: + validate, then run the request alone on the model right in the handler
  (pack, ONNX Runtime, unpack, response), with no queue and no future;
- ``full``: Peregrine unchanged (+ routing, the queue and batcher, futures, statistics).

Bench tooling only: it reaches into the servicer and the batcher on purpose, so that each
stage runs the server's own code.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

STAGES = ("respond", "codec", "execute", "full")


Handler = Callable[[Any, Any, Any], Awaitable[Any]]


def stage_handler(stage: str) -> Handler:
    """ModelInfer cut after ``stage``, as a handler (servicer, request bytes, context)."""
    from server.codec.validate import validate_request
    from server.frontend import inference
    from server.types import InferResponse

    if stage == "full":
        full: Handler = inference.InferenceServicer.ModelInfer
        return full
    first: dict[Any, Any] = {}

    async def cached(servicer: Any, data: bytes) -> InferResponse:
        """The full path's answer to the first request of each model, kept."""
        key = _model_name(data)
        if key not in first:
            _decoded, answer, _shm = servicer._start(data, None, None)
            first[key] = await answer
        response: InferResponse = first[key]
        return response

    async def model_infer(servicer: Any, data: bytes, context: grpc.aio.ServicerContext) -> Any:
        codec = servicer._codec
        if stage == "respond":
            key = ("encoded", _model_name(data))
            if key not in first:
                first[key] = codec.encode_response_bytes(await cached(servicer, data), None,
                                                         False)
            return first[key]
        decoded = codec.decode_request_bytes(data, inference._deadline_ns(context), None)
        if stage == "codec":
            return codec.encode_response_bytes(await cached(servicer, data), None, False)
        served = servicer._dataplane._catalog.get(decoded.model_name, decoded.model_version)
        validate_request(decoded, served.spec)
        # The version's execution seam (pack -> execute -> check -> unpack), without the queue.
        batcher = served.scheduler
        first_input = next(iter(decoded.inputs.values()))
        rows = [int(first_input.shape[0]) if served.spec.batches else 1]
        run = batcher.executor.run(batcher.instances[0], [decoded], rows)
        if run.error is not None:
            raise run.error
        outcome = run.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return codec.encode_response_bytes(outcome, None, False)

    return model_infer


def _model_name(data: bytes) -> bytes:
    """The model name field of a serialized request without decoding it (the respond stage
    does no per-request work): field 1, which the clients we drive write first, with a
    one-byte length."""
    if len(data) < 2 or data[0] != 0x0A or data[1] >= 0x80:
        raise ValueError("expected the model name first in the request")
    return data[2:2 + data[1]]


def install(stage: str) -> None:
    """Replace InferenceServicer.ModelInfer with the path cut after ``stage``."""
    if stage == "full":
        return
    from server.frontend import inference
    from server.frontend.status import mapped

    inference.InferenceServicer.ModelInfer = mapped(stage_handler(stage))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) < 2 or arguments[0] != "--stage" or arguments[1] not in STAGES:
        print("usage: python -m bench.studies.ablation_server "
              f"--stage {{{','.join(STAGES)}}} serve ...",
              file=sys.stderr)
        return 2
    install(arguments[1])
    from server.cli import main as serve_main

    return serve_main(arguments[2:])


if __name__ == "__main__":
    sys.exit(main())
