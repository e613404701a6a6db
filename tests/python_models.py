"""Builders of Python-backend test models (``backend: "python"``, ``<version>/model.py``).

Each writes ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.py`` and returns the
model directory::

    counting_model(repo, "counting")    # OUTPUT0 = INPUT0 * 2, REQUESTS = len(requests), PID;
                                        # the first value of INPUT0 picks a misbehaviour
    datatypes_model(repo, "datatypes")  # echoes IN_<T> as OUT_<T> for every datatype
    python_model(repo, "m", config_body, source)   # any other
"""

from __future__ import annotations

import textwrap
from pathlib import Path

#: INPUT0[0, 0] values that make ``counting`` misbehave.
CRASH = -1.0  # os._exit(3) inside execute
HANG = -2.0  # sleeps for an hour inside execute
REFUSE = -3.0  # that request answered TritonError("value -3 refused", INVALID_ARG)
RAISE = -4.0  # execute raises ValueError("execute blew up")
CALL_OTHER = -5.0  # a BLS call: InferenceRequest(...).exec()
#: execute prints "executing N requests": only when asked, so that no print of a test's
#: requests reaches the log after that test ended (its log capture closed).
SAY = -6.0
WIDTH = 4

#: Datatypes of the protocol as config names, and the numpy dtype each echoes as.
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
    "BF16": "uint16",
}


def python_model(repo: Path, name: str, config_body: str, source: str,
                 version: int = 1) -> Path:
    """``config_body``: the config after ``name`` and ``backend``."""
    model_dir = repo / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\n' + textwrap.dedent(config_body))
    (model_dir / str(version) / "model.py").write_text(textwrap.dedent(source))
    return model_dir


COUNTING_SOURCE = f"""\
import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.instance = args["model_instance_name"]
        out = pb_utils.get_output_config_by_name(self.config, "OUTPUT0")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        heavy = sorted(m for m in ("grpc", "onnxruntime", "server.app") if m in sys.modules)
        print(f"initialized {{self.instance}} version {{args['model_version']}} "
              f"heavy modules: {{heavy}}")

    def execute(self, requests):
        firsts = [float(pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy().flat[0])
                  for r in requests]
        if {SAY} in firsts:
            print(f"executing {{len(requests)}} requests")
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            first = float(x.flat[0])
            if first == {CRASH}:
                os._exit(3)
            if first == {HANG}:
                time.sleep(3600)
            if first == {RAISE}:
                raise ValueError("execute blew up")
            if first == {CALL_OTHER}:
                pb_utils.InferenceRequest(model_name="other", requested_output_names=["Y"],
                                          inputs=[]).exec()
            if first == {REFUSE}:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "value -3 refused", pb_utils.TritonError.INVALID_ARG)))
                continue
            rows = len(x)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", (x * 2).astype(self.dtype)),
                pb_utils.Tensor("REQUESTS", np.full((rows, 1), len(requests), np.int64)),
                pb_utils.Tensor("PID", np.full((rows, 1), os.getpid(), np.int64)),
            ]))
        return responses

    def finalize(self):
        print(f"finalized {{self.instance}}")
"""


def counting_model(repo: Path, name: str, execution_timeout_ms: int = 1500,
                   max_queue_delay_us: int = 200_000, instances: int = 1,
                   version: int = 1) -> Path:
    """Batches up to 8 requests (fixed queue delay, preferred batch 4)."""
    return python_model(repo, name, f"""\
        max_batch_size: 8
        input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
        output [
          {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }},
          {{ name: "REQUESTS" data_type: TYPE_INT64 dims: [ 1 ] }},
          {{ name: "PID" data_type: TYPE_INT64 dims: [ 1 ] }}
        ]
        dynamic_batching {{
          preferred_batch_size: [ 4 ]
          max_queue_delay_microseconds: {max_queue_delay_us}
        }}
        instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
        parameters {{ key: "queue_delay" value {{ string_value: "fixed" }} }}
        parameters {{
          key: "execution_timeout_ms" value {{ string_value: "{execution_timeout_ms}" }}
        }}
        """, COUNTING_SOURCE, version)


DATATYPES_SOURCE = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = []
            for tensor in request.inputs():
                kind = tensor.name()[3:]
                outputs.append(pb_utils.Tensor("OUT_" + kind, tensor.as_numpy(),
                                               tensor.triton_dtype()))
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
"""


def datatypes_model(repo: Path, name: str, shm_bytes: int = 1 << 20) -> Path:
    """Not batching; every input optional, [-1] each; ``shm_bytes`` per shared-memory
    region."""
    inputs = ",\n".join(
        f'  {{ name: "IN_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [ -1 ] '
        "optional: true }" for t in DATATYPES)
    outputs = ",\n".join(
        f'  {{ name: "OUT_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [ -1 ] }}'
        for t in DATATYPES)
    region = f'parameters {{ key: "python_shm_bytes" value {{ string_value: "{shm_bytes}" }} }}\n'
    return python_model(repo, name, f"max_batch_size: 0\ninput [\n{inputs}\n]\n"
                                    f"output [\n{outputs}\n]\n{region}", DATATYPES_SOURCE)
