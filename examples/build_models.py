"""Build the example model repository served by Peregrine.

Usage::

    python examples/build_models.py [--out DIR] [--with-torch]

``DIR`` defaults to ``examples/models`` next to this script. The result is a
Triton-layout repository::

    DIR/
      mlp_classifier/{config.pbtxt, 1/model.onnx, 2/model.onnx}
      cnn/{config.pbtxt, 1/model.onnx}
      image_classifier/{config.pbtxt, 1/model.onnx}
      text_encoder/{config.pbtxt, 1/model.onnx}
      digits_gbm/{config.pbtxt, 1/model.py, 1/model.joblib}
      text_normalizer/{config.pbtxt, 1/model.py}
      cnn_torch/{config.pbtxt, 1/model.pt2}       (only with --with-torch)

Models:

* ``mlp_classifier`` -- scikit-learn ``StandardScaler + MLPClassifier`` trained on
  ``load_digits`` and converted with skl2onnx. Input ``input`` FP32 [N, 64] (raw
  digit pixel intensities, 0..16); outputs ``label`` INT64 [N, 1] and
  ``probabilities`` FP32 [N, 10]. Two versions (different seed and hidden size),
  both served (``version_policy: { all { } }``).
* ``cnn`` -- a small image CNN written with ``onnx.helper``, random (seeded)
  weights. Input ``image`` FP32 [N, 3, 32, 32]; output ``scores`` FP32 [N, 10]
  (softmax).
* ``image_classifier`` -- the same network (same seed) behind server-side image
  preprocessing declared in its config (``preprocess.*`` parameters): clients send
  raw ``image`` UINT8 [N, H, W, 3] of any size; the server resizes the shorter side
  to 36 (bilinear), crops the centre 32x32, scales to [0, 1] and normalises with the
  ImageNet mean/std into the model's FP32 [N, 3, 32, 32].
* ``cnn_torch`` (``--with-torch``, needs torch) -- ``cnn``'s network and weights as a
  ``torch.export`` program for the PyTorch backend (``platform: "pytorch_libtorch"``,
  ``KIND_AUTO``: a GPU where torch sees one), checked against ``cnn``.
* ``text_encoder`` -- string model: input ``text`` BYTES [N, 1]; outputs
  ``token_id`` INT64 [N, 1] (vocabulary lookup, -1 when unknown) and ``text_out``
  BYTES [N, 1] (echo).
* ``digits_gbm`` -- Python backend (``backend: "python"``): a scikit-learn
  ``GradientBoostingClassifier`` trained on ``load_digits``, pickled with joblib
  beside a Triton ``model.py`` that predicts a whole batch of requests at once.
  The inputs and outputs of ``mlp_classifier``.
* ``text_normalizer`` -- Python backend: pre-processing for ``text_encoder``.
  Input ``raw_text`` BYTES [N, 1]; output ``text`` BYTES [N, 1], the text folded
  to lower-case ASCII words (" Pérégrine! " -> "peregrine"), ``text_encoder``'s input.

The build is deterministic (fixed seeds), takes a few seconds and is idempotent.
Every model is built into a staging directory next to ``DIR``, loaded and run in
onnxruntime (a Python model's model.py here, with Peregrine's model API), and only
then moved into place, one whole model directory at a time,
so a half-written model never appears in ``DIR``. A model whose files are
byte-identical to what is already in ``DIR`` is left untouched (no spurious
reload by a server polling the repository). Other directories in ``DIR`` are
never touched.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_OUT = Path(__file__).resolve().parent / "models"

# Opsets understood by every onnxruntime this project supports (>= 1.17).
ONNX_OPSET = 17
ONNX_ML_OPSET = 3
IR_VERSION = 8  # the IR version that goes with opset 17

DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
CNN_CLASSES = 10
TEXT_VOCABULARY = (
    "hello",
    "world",
    "peregrine",
    "falcon",
    "triton",
    "onnx",
    "grpc",
    "inference",
)


# --------------------------------------------------------------------------------------
# Repository writing
# --------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` by first renaming it aside, so it vanishes in one step."""
    if not path.exists():
        return
    graveyard = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    path.rename(graveyard / path.name)
    shutil.rmtree(graveyard)


def write_model(
    repo: Path, name: str, version: int, onnx_model: onnx.ModelProto, config_text: str
) -> Path:
    """Write ``repo/name/version/model.onnx`` and ``repo/name/config.pbtxt``.

    The model is checked, then serialized into a temporary directory inside the
    model directory (its name is not a number, so it is never taken for a
    version) which is renamed to the version directory in one step; an existing
    version directory is replaced. ``config.pbtxt`` is replaced atomically.
    Returns the version directory.
    """
    onnx.checker.check_model(onnx_model, full_check=True)
    return write_version(repo, name, version, {"model.onnx": onnx_model.SerializeToString()},
                         config_text)


def write_version(
    repo: Path, name: str, version: int, files: dict[str, bytes], config_text: str
) -> Path:
    """Write ``files`` into ``repo/name/version/`` (replacing the version directory in one
    step, as write_model describes) and ``repo/name/config.pbtxt``."""
    final = write_version_dir(repo, name, version, files)
    _atomic_write_bytes(repo / name / "config.pbtxt", config_text.encode())
    return final


def write_version_dir(repo: Path, name: str, version: int, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``repo/name/version/`` through a hidden temporary directory
    renamed into place in one step; the model's config is left alone."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version}-", dir=model_dir))
    try:
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
        _remove_tree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _tree_contents(root: Path) -> dict[str, bytes | None]:
    """Map every path under ``root`` to its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def publish(staging: Path, out: Path, name: str) -> bool:
    """Move the finished model ``staging/name`` to ``out/name``.

    Returns False (and leaves ``out/name`` alone) when it already holds exactly
    the same files. Both directories must be on one file system.
    """
    src, dst = staging / name, out / name
    if dst.is_dir() and _tree_contents(src) == _tree_contents(dst):
        return False
    _remove_tree(dst)
    src.rename(dst)
    return True


# --------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------


def _make_model(graph: onnx.GraphProto, *, ml: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ONNX_ML_OPSET))
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="peregrine-examples"
    )
    return model


@dataclass(frozen=True)
class Digits:
    x_train: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    y_test: npt.NDArray[np.int64]


def load_digits_split() -> Digits:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=0, stratify=y
    )
    return Digits(x_train, x_test, y_train, y_test)


MLP_CONFIG = """\
name: "mlp_classifier"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { all { } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 500
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
model_warmup [
  {
    name: "random_batch_1"
    batch_size: 1
    inputs {
      key: "input"
      value {
        data_type: TYPE_FP32
        dims: [ 64 ]
        random_data: true
      }
    }
  }
]
"""


def build_mlp(
    out_dir: Path,
    version: int,
    seed: int,
    hidden: Sequence[int] = (32,),
    digits: Digits | None = None,
) -> float:
    """Train, convert and write one version of ``mlp_classifier``.

    Returns the test accuracy of the scikit-learn model.
    """
    model, accuracy = train_mlp(version, seed, hidden, digits)
    write_model(out_dir, "mlp_classifier", version, model, MLP_CONFIG)
    return accuracy


def train_mlp(
    version: int,
    seed: int,
    hidden: Sequence[int] = (32,),
    digits: Digits | None = None,
) -> tuple[onnx.ModelProto, float]:
    """Train ``mlp_classifier`` on ``digits`` and convert it (checked against scikit-learn);
    returns the ONNX model and the scikit-learn model's test accuracy."""
    data = digits if digits is not None else load_digits_split()
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=400, random_state=seed)
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", clf)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(data.x_train, data.y_train)
    accuracy = float(pipe.score(data.x_test, data.y_test))

    model = convert_sklearn(
        pipe,
        name=f"mlp_classifier_v{version}",
        initial_types=[("input", FloatTensorType([None, DIGITS_FEATURES]))],
        final_types=[
            ("label_flat", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, DIGITS_CLASSES])),
        ],
        options={id(clf): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
    )
    # skl2onnx emits the label as [N]; with max_batch_size > 0 a Triton output
    # needs at least one non-batch dim, so make it [N, 1].
    graph = model.graph
    _free_name(graph, "label")  # skl2onnx uses "label" for an intermediate tensor
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "label_axes"))
    graph.node.append(
        helper.make_node("Unsqueeze", ["label_flat", "label_axes"], ["label"], name="label_2d")
    )
    label_info = helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1])
    outputs = [label_info if o.name == "label_flat" else o for o in graph.output]
    del graph.output[:]
    graph.output.extend(outputs)
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    model.ir_version = IR_VERSION
    model.producer_name = "peregrine-examples"
    model.doc_string = (
        f"load_digits MLP, hidden={tuple(hidden)}, seed={seed}, test accuracy {accuracy:.4f}"
    )
    _check_mlp_against_sklearn(model, pipe, data)
    return model, accuracy


def _free_name(graph: onnx.GraphProto, name: str) -> None:
    """Rename every use of tensor ``name`` in ``graph`` to an unused name."""
    used = {t for n in graph.node for t in (*n.input, *n.output)}
    used |= {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    if name not in used:
        return
    new = next(f"{name}_{i}" for i in range(len(used) + 1) if f"{name}_{i}" not in used)
    for node in graph.node:
        node.input[:] = [new if t == name else t for t in node.input]
        node.output[:] = [new if t == name else t for t in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == name:
            value.name = new


def _check_mlp_against_sklearn(model: onnx.ModelProto, pipe: Pipeline, data: Digits) -> None:
    sess = _session(model)
    label, proba = sess.run(["label", "probabilities"], {"input": data.x_test})
    want_label = pipe.predict(data.x_test)
    want_proba = pipe.predict_proba(data.x_test)
    agree = float(np.mean(label[:, 0] == want_label))
    if agree < 0.99 or not np.allclose(proba, want_proba, atol=1e-4):
        raise RuntimeError(f"ONNX MLP disagrees with scikit-learn (label agreement {agree:.4f})")


CNN_CONFIG = """\
name: "cnn"
platform: "onnxruntime_onnx"
max_batch_size: 32
version_policy: { latest { num_versions: 1 } }
input [
  {
    name: "image"
    data_type: TYPE_FP32
    dims: [ 3, 32, 32 ]
  }
]
output [
  {
    name: "scores"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 200
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
model_warmup [
  {
    name: "zero_batch_1"
    batch_size: 1
    inputs {
      key: "image"
      value {
        data_type: TYPE_FP32
        dims: [ 3, 32, 32 ]
        zero_data: true
      }
    }
  }
]
"""


IMAGE_CLASSIFIER_CONFIG = """\
name: "image_classifier"
platform: "onnxruntime_onnx"
max_batch_size: 32
version_policy: { latest { num_versions: 1 } }
input [
  {
    name: "image"
    data_type: TYPE_FP32
    dims: [ 3, 32, 32 ]
  }
]
output [
  {
    name: "scores"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 200
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
parameters: { key: "preprocess.input" value: { string_value: "image" } }
parameters: { key: "preprocess.resize" value: { string_value: "36" } }
parameters: { key: "preprocess.crop" value: { string_value: "32,32" } }
parameters: { key: "preprocess.scale" value: { string_value: "0.00392156862745098" } }
parameters: { key: "preprocess.mean" value: { string_value: "0.485,0.456,0.406" } }
parameters: { key: "preprocess.std" value: { string_value: "0.229,0.224,0.225" } }
model_warmup [
  {
    name: "zero_batch_1"
    batch_size: 1
    inputs {
      key: "image"
      value {
        data_type: TYPE_FP32
        dims: [ 3, 32, 32 ]
        zero_data: true
      }
    }
  }
]
"""


def build_cnn(out_dir: Path, version: int = 1, seed: int = 0) -> None:
    """Write ``cnn``: Conv-Relu-MaxPool, Conv-Relu, GAP, Gemm, Softmax (random weights)."""
    write_model(out_dir, "cnn", version, _cnn_model(seed), CNN_CONFIG)


def build_image_classifier(out_dir: Path, version: int = 1, seed: int = 0) -> None:
    """Write ``image_classifier``: ``cnn``'s network behind server-side preprocessing."""
    write_model(out_dir, "image_classifier", version, _cnn_model(seed), IMAGE_CLASSIFIER_CONFIG)


def _cnn_weights(seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """The ``cnn`` network's weights (seeded): the ONNX and the PyTorch builds share them."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> npt.NDArray[np.float32]:
        return np.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), dtype=np.float32)

    return {
        "conv1_w": he((8, 3, 3, 3), 3 * 9),
        "conv1_b": np.zeros(8, dtype=np.float32),
        "conv2_w": he((16, 8, 3, 3), 8 * 9),
        "conv2_b": np.zeros(16, dtype=np.float32),
        "fc_w": he((CNN_CLASSES, 16), 16),
        "fc_b": (rng.standard_normal(CNN_CLASSES) * 0.01).astype(np.float32),
    }


def _cnn_model(seed: int) -> onnx.ModelProto:
    weights = _cnn_weights(seed)
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "conv1_w", "conv1_b"],
            ["c1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node(
            "Conv",
            ["p1", "conv2_w", "conv2_b"],
            ["c2"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", CNN_CLASSES])],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = _make_model(graph)
    model.doc_string = f"small random-weight CNN, seed={seed}"
    return model


CNN_TORCH_CONFIG = """\
name: "cnn_torch"
platform: "pytorch_libtorch"
default_model_filename: "model.pt2"
max_batch_size: 32
input [
  {
    name: "image"
    data_type: TYPE_FP32
    dims: [ 3, 32, 32 ]
  }
]
output [
  {
    name: "scores"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 200
}
instance_group [
  {
    count: 1
    kind: KIND_AUTO
  }
]
"""


def build_cnn_torch(out_dir: Path, version: int = 1, seed: int = 0) -> None:
    """Write ``cnn_torch``: ``cnn``'s network and weights as a torch.export program
    (``model.pt2``, batch 1..32) for the PyTorch backend, checked against the ONNX ``cnn``."""
    import torch
    from torch import nn

    weights = {k: torch.from_numpy(v) for k, v in _cnn_weights(seed).items()}

    class Cnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, value in weights.items():
                self.register_buffer(name, value)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            nf = nn.functional
            x = torch.relu(nf.conv2d(image, self.conv1_w, self.conv1_b, padding=1))
            x = torch.relu(nf.conv2d(nf.max_pool2d(x, 2), self.conv2_w, self.conv2_b, padding=1))
            logits = nf.linear(x.mean(dim=(2, 3)), self.fc_w, self.fc_b)
            return torch.softmax(logits, dim=1)

    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(Cnn().eval(), (torch.zeros(2, 3, 32, 32),),
                                  dynamic_shapes=({0: batch},))
    model_dir = out_dir / "cnn_torch"
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(model_dir / str(version) / "model.pt2"))
    (model_dir / "config.pbtxt").write_text(CNN_TORCH_CONFIG)
    x = _sample("image", (3, 32, 32), 3)
    [want] = _session(_cnn_model(seed)).run(["scores"], {"image": x})
    with torch.inference_mode():
        got = torch.export.load(str(model_dir / str(version) / "model.pt2")).module()(
            torch.from_numpy(x)).numpy()
    if not np.allclose(got, want, atol=1e-5):
        raise RuntimeError("cnn_torch: the PyTorch program does not compute cnn's scores")
    print(f"  verified cnn_torch/{version} against cnn: image {x.shape} -> scores {got.shape}")


TEXT_CONFIG = """\
name: "text_encoder"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  {
    name: "text"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }
]
output [
  {
    name: "token_id"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "text_out"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }
]
dynamic_batching { }
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""


def build_text_encoder(out_dir: Path, version: int = 1) -> None:
    """Write ``text_encoder``: vocabulary lookup (LabelEncoder) plus an echo."""
    nodes = [
        helper.make_node(
            "LabelEncoder",
            ["text"],
            ["token_id"],
            name="lookup",
            domain="ai.onnx.ml",
            keys_strings=list(TEXT_VOCABULARY),
            values_int64s=list(range(len(TEXT_VOCABULARY))),
            default_int64=-1,
        ),
        helper.make_node("Identity", ["text"], ["text_out"], name="echo"),
    ]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1])],
        [
            helper.make_tensor_value_info("token_id", TensorProto.INT64, ["N", 1]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N", 1]),
        ],
    )
    model = _make_model(graph, ml=True)
    model.doc_string = "vocabulary: " + " ".join(TEXT_VOCABULARY)
    write_model(out_dir, "text_encoder", version, model, TEXT_CONFIG)


# --------------------------------------------------------------------------------------
# Python models (backend "python": a model.py run in a model process of its own)
# --------------------------------------------------------------------------------------

GBM_CONFIG = """\
name: "digits_gbm"
backend: "python"
max_batch_size: 64
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 500
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""

GBM_MODEL_PY = '''\
"""digits_gbm: a scikit-learn gradient-boosting classifier (model.joblib beside this file)
served by Peregrine's Python backend, as a Triton model.py."""

from pathlib import Path

import joblib
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = joblib.load(version_dir / "model.joblib")

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        responses = [None] * len(requests)
        valid = []
        for i, rows in enumerate(inputs):
            if np.isfinite(rows).all():
                valid.append(i)
            else:  # that request alone fails, INVALID_ARGUMENT with this text
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "input holds NaN or infinity", pb_utils.TritonError.INVALID_ARG))
        if valid:
            # The batch's requests in one predict call: their rows together, then cut back.
            batch = np.concatenate([inputs[i] for i in valid])
            probabilities = self.model.predict_proba(batch).astype(np.float32)
            labels = self.model.classes_[probabilities.argmax(axis=1)].astype(np.int64)
            start = 0
            for i in valid:
                end = start + len(inputs[i])
                responses[i] = pb_utils.InferenceResponse([
                    pb_utils.Tensor("label", labels[start:end].reshape(-1, 1)),
                    pb_utils.Tensor("probabilities", probabilities[start:end]),
                ])
                start = end
        return responses
'''


def build_digits_gbm(out_dir: Path, digits: Digits, version: int = 1) -> float:
    """Train ``digits_gbm`` (GradientBoostingClassifier on load_digits, the inputs and outputs
    of ``mlp_classifier``) and write it with its model.py; returns its test accuracy."""
    import joblib
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(n_estimators=25, max_depth=3, random_state=0)
    model.fit(digits.x_train, digits.y_train)
    accuracy = float(model.score(digits.x_test, digits.y_test))
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    write_version(out_dir, "digits_gbm", version,
                  {"model.py": GBM_MODEL_PY.encode(), "model.joblib": buffer.getvalue()},
                  GBM_CONFIG)
    [labels, probabilities] = run_python_model(
        out_dir, "digits_gbm", {"input": digits.x_test}, ["label", "probabilities"])
    if not np.array_equal(labels[:, 0], model.predict(digits.x_test)) or \
            not np.allclose(probabilities, model.predict_proba(digits.x_test), atol=1e-6):
        raise RuntimeError("digits_gbm: model.py disagrees with scikit-learn")
    return accuracy


NORMALIZER_CONFIG = """\
name: "text_normalizer"
backend: "python"
max_batch_size: 16
input [
  {
    name: "raw_text"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }
]
output [
  {
    name: "text"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }
]
dynamic_batching { }
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""

NORMALIZER_MODEL_PY = '''\
"""text_normalizer: the pre-processing in front of text_encoder, in Python. Each raw text
becomes text_encoder's input: Unicode compatibility forms folded, accents dropped, lower case,
everything but letters and digits a single space (" Pér\u00e9grine! " -> "peregrine")."""

import re
import unicodedata

import numpy as np
import triton_python_backend_utils as pb_utils

NOT_A_WORD = re.compile(r"[^0-9a-z]+")


def normalise(raw):
    text = unicodedata.normalize("NFKD", raw.decode("utf-8", errors="replace"))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(w for w in NOT_A_WORD.split(text) if w).encode()


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "raw_text").as_numpy()
            text = np.array([normalise(item) for item in raw.reshape(-1)], dtype=object)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("text", text.reshape(raw.shape))]))
        return responses
'''


def build_text_normalizer(out_dir: Path, version: int = 1) -> None:
    """Write ``text_normalizer`` (model.py only) and check it feeds ``text_encoder``."""
    write_version(out_dir, "text_normalizer", version,
                  {"model.py": NORMALIZER_MODEL_PY.encode()}, NORMALIZER_CONFIG)
    raw = np.array([[" P\u00e9r\u00c9grine! ".encode()], [b"GRPC"], [b"??"]], dtype=object)
    [text] = run_python_model(out_dir, "text_normalizer", {"raw_text": raw}, ["text"])
    if text[:, 0].tolist() != [b"peregrine", b"grpc", b""]:
        raise RuntimeError(f"text_normalizer: {text[:, 0].tolist()}")
    [ids, _] = _session(out_dir / "text_encoder" / "1" / "model.onnx").run(
        None, {"text": np.array([[t.decode()] for t in text[:, 0]], dtype=object)})
    shown = [[t.decode() for t in column] for column in (raw[:, 0], text[:, 0])]
    print(f"  verified text_normalizer/{version} -> text_encoder: {shown[0]} -> {shown[1]} "
          f"-> token_id {ids[:, 0].tolist()}")


def run_python_model(repo: Path, name: str, inputs: dict[str, npt.NDArray[Any]],
                     outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
    """Run ``repo/name/1/model.py`` here, in one request, with Peregrine's model API, as the
    server would (the model's own check before it is published)."""
    import importlib.util
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's server
    from server.backends.python import triton_python_backend_utils as pb_utils

    sys.modules["triton_python_backend_utils"] = pb_utils
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    if hasattr(model, "initialize"):
        model.initialize({"model_config": json.dumps({"name": name}), "model_name": name,
                          "model_repository": str(repo / name), "model_version": "1",
                          "model_instance_kind": "CPU", "model_instance_device_id": "0",
                          "model_instance_name": f"{name}_0_0"})
    request = pb_utils.InferenceRequest(
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(n, v) for n, v in inputs.items()])
    [response] = model.execute([request])
    if response.has_error():
        raise RuntimeError(f"{name}: {response.error()}")
    return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# Expected signature of every model: name -> (inputs, outputs), each tensor as
# (name, onnxruntime type string, shape without the batch dimension).
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]
EXPECTED: dict[str, tuple[Signature, Signature]] = {
    "mlp_classifier": (
        (("input", "tensor(float)", (64,)),),
        (("label", "tensor(int64)", (1,)), ("probabilities", "tensor(float)", (10,))),
    ),
    "cnn": (
        (("image", "tensor(float)", (3, 32, 32)),),
        (("scores", "tensor(float)", (10,)),),
    ),
    "image_classifier": (
        (("image", "tensor(float)", (3, 32, 32)),),
        (("scores", "tensor(float)", (10,)),),
    ),
    "text_encoder": (
        (("text", "tensor(string)", (1,)),),
        (("token_id", "tensor(int64)", (1,)), ("text_out", "tensor(string)", (1,))),
    ),
}


#: The Python-backend models (their own checks run when they are built).
PYTHON_MODELS = ("digits_gbm", "text_normalizer")


def _sample(name: str, shape: tuple[int, ...], batch: int) -> npt.NDArray[Any]:
    if name == "text":
        words = ["hello", "unknown-word", "grpc"]
        return np.array([[words[i % len(words)]] for i in range(batch)], dtype=object)
    rng = np.random.default_rng(123)
    high = 16.0 if name == "input" else 1.0
    return rng.uniform(0.0, high, size=(batch, *shape)).astype(np.float32)


def verify_model(repo: Path, name: str) -> None:
    """Load every version of ``repo/name`` in onnxruntime and run one batch."""
    inputs, outputs = EXPECTED[name]
    config = (repo / name / "config.pbtxt").read_text()
    if f'name: "{name}"' not in config:
        raise RuntimeError(f"{name}: config.pbtxt does not name the model")
    versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())
    if not versions:
        raise RuntimeError(f"{name}: no version directory")
    batch = 3
    for version in versions:
        sess = _session(repo / name / str(version) / "model.onnx")
        got_in = [(i.name, i.type, tuple(i.shape[1:])) for i in sess.get_inputs()]
        got_out = [(o.name, o.type, tuple(o.shape[1:])) for o in sess.get_outputs()]
        if got_in != list(inputs) or got_out != list(outputs):
            raise RuntimeError(f"{name}/{version}: signature {got_in} -> {got_out}")
        feed = {n: _sample(n, shape, batch) for n, _, shape in inputs}
        results = sess.run(None, feed)
        for (out_name, _, shape), value in zip(outputs, results, strict=True):
            if value.shape != (batch, *shape):
                raise RuntimeError(f"{name}/{version}: {out_name} has shape {value.shape}")
        shown = ", ".join(
            f"{o} {tuple(v.shape)}" for (o, _, _), v in zip(outputs, results, strict=True)
        )
        fed = ", ".join(f"{n} {tuple(a.shape)}" for n, a in feed.items())
        print(f"  verified {name}/{version}: {fed} -> {shown}")
        if name == "text_encoder":
            print(f"    text {feed['text'][:, 0].tolist()} -> token_id {results[0][:, 0].tolist()}")
        scores_sum_to_one = np.allclose(results[0].sum(axis=1), 1.0, atol=1e-5)
        if name in ("cnn", "image_classifier") and not scores_sum_to_one:
            raise RuntimeError("cnn: scores do not sum to 1")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def build_all(out: Path, with_torch: bool = False) -> None:
    start = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        digits = load_digits_split()
        for version, seed, hidden in ((1, 0, (32,)), (2, 1, (64,))):
            acc = build_mlp(staging, version, seed, hidden, digits)
            print(f"mlp_classifier v{version}: hidden={hidden} seed={seed} test accuracy {acc:.4f}")
        build_cnn(staging, version=1, seed=0)
        build_image_classifier(staging, version=1, seed=0)
        build_text_encoder(staging, version=1)

        for name in EXPECTED:
            verify_model(staging, name)
        accuracy = build_digits_gbm(staging, digits)
        print(f"digits_gbm v1 (python backend): test accuracy {accuracy:.4f}")
        build_text_normalizer(staging)
        names = [*EXPECTED, *PYTHON_MODELS]
        if with_torch:
            build_cnn_torch(staging, version=1, seed=0)
            names.append("cnn_torch")
        for name in names:
            changed = publish(staging, out, name)
            print(f"{'wrote' if changed else 'unchanged'} {out / name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"built {len(names)} models in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"repository directory (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--with-torch",
        action="store_true",
        help="also build cnn_torch, cnn as a torch.export program for the PyTorch backend "
        "(needs torch; left out by default: ONNX-only tools serve the default repository)",
    )
    args = parser.parse_args(argv)
    build_all(args.out, args.with_torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
