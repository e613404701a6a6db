"""An MLServer custom runtime serving an ONNX file with ONNX Runtime.

Runs inside MLServer's own virtualenv (bench/.venv-mlserver), not Peregrine's. The session
gets the ``intra_op_thread_count`` and ``allow_spinning`` given in the model settings'
``parameters.extra`` (the comparison passes the same values to every server). Inference runs
on the event loop, as MLServer's own runtimes do with ``parallel_workers: 0``. Adaptive
batching, when the model settings enable it, is MLServer's own (it wraps ``predict``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import (  # type: ignore[import-not-found]
    InferenceRequest,
    InferenceResponse,
)
from mlserver.utils import get_model_uri  # type: ignore[import-not-found]


def session_options(extra: dict[str, Any]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(extra.get("intra_op_thread_count", 1))
    spinning = "1" if str(extra.get("allow_spinning", "0")) in ("1", "true") else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


class OnnxRuntimeModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        parameters = self._settings.parameters
        extra = dict(parameters.extra or {}) if parameters is not None else {}
        self._session = ort.InferenceSession(uri, session_options(extra),
                                             providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value)
                     for name, value in zip(self._output_names, results, strict=True)],
        )

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        """Answer every request of the stream, one after another (MLServer's default answers
        only the first)."""
        async for payload in payloads:
            yield await self.predict(payload)
