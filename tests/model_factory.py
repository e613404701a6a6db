"""Builders of small ONNX models for tests.

Every builder writes ``<repo>/<name>/config.pbtxt`` and
``<repo>/<name>/<version>/model.onnx`` (Triton repository layout) and returns the
model directory. All configs are rendered by :func:`render_config`; every builder
accepts the :class:`ConfigOptions` keyword arguments (dynamic batching and
queue-policy settings, instance count)::

    identity_models(repo)                       # identity_fp32, identity_bytes, ...
    add_sub_model(repo, max_queue_delay_microseconds=1000, preferred_batch_size=[4])
    slow_model(repo, "slow", delay_ms=50, max_queue_size=2)
    no_batch_model(repo, "no_batch")
    broken_model(repo, "broken")
    scaled_model_version(repo, "m", 2, factor=2.0)    # only m/2/ (OUTPUT0 = INPUT0 * 2)
    failing_model(repo, "failing")    # loads, but every inference fails (INTERNAL)
    stalling_scaled_version(repo, "m", 2, 2.0, trips=40_000)  # m/2/, a slow warm-up

Tensor names follow the Triton examples: ``INPUT0``/``INPUT1`` and
``OUTPUT0``/``OUTPUT1``. With ``max_batch_size > 0`` the ONNX shapes get a leading
dynamic batch dimension ``N`` that the config dims leave out; ``-1`` config dims
become dynamic ONNX dimensions.

BF16: onnxruntime's CPU Identity kernel does support bfloat16 (checked with
onnxruntime 1.32, opset 17), so ``identity_bf16`` is built. numpy has no bfloat16
type, though: ``InferenceSession.run`` rejects both ``ml_dtypes.bfloat16`` arrays
and uint16 arrays for it. Feed it raw 16-bit patterns through an ``OrtValue`` /
``IOBinding`` with ``element_type=16`` (``TensorProto.BFLOAT16``), e.g.::

    binding = session.io_binding()
    binding.bind_input("INPUT0", "cpu", 0, 16, raw.shape, raw.ctypes.data)  # raw: uint16
    binding.bind_output("OUTPUT0", "cpu", 0, 16, out.shape, out.ctypes.data)  # out: uint16
    session.run_with_iobinding(binding)

Builders emit opset 17 / IR version 8 models, loadable by onnxruntime >= 1.14.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from typing import Unpack

ONNX_OPSET = 17
IR_VERSION = 8

# Triton data type (as in config.pbtxt without "TYPE_", and in KServe V2) -> ONNX type.
ONNX_TYPE: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
    "BF16": TensorProto.BFLOAT16,
}

# Triton data type -> numpy dtype used to feed onnxruntime (BF16 has none, see above).
NUMPY_DTYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# Every data type identity_models() builds a model for.
IDENTITY_DTYPES: tuple[str, ...] = tuple(ONNX_TYPE)

# Data types Add and Sub support in onnxruntime's CPU provider (add_sub_model).
ADD_SUB_DTYPES: tuple[str, ...] = ("INT32", "INT64", "FP16", "FP32", "FP64")


class ConfigOptions(TypedDict, total=False):
    """Keyword arguments every builder accepts, rendered into config.pbtxt.

    ``dynamic_batching`` defaults to ``max_batch_size > 0``; the other batching
    settings are only written when dynamic batching is on and when they differ
    from Triton's defaults. ``max_queue_size``, ``default_timeout_microseconds``,
    ``timeout_action`` and ``allow_timeout_override`` go into
    ``default_queue_policy``, as in Triton's ModelDynamicBatching message.
    """

    dynamic_batching: bool
    max_queue_delay_microseconds: int
    preferred_batch_size: Sequence[int]
    preserve_ordering: bool
    priority_levels: int
    default_priority_level: int
    max_queue_size: int
    default_timeout_microseconds: int
    timeout_action: str  # "REJECT" or "DELAY"
    allow_timeout_override: bool
    instance_count: int
    queue_delay: str  # the "queue_delay" parameter: "adaptive" (default) or "fixed"
    #: the body of a ModelVersionPolicy: "all { }", "latest { num_versions: 2 }", ...
    version_policy: str
    #: > 0: a ``model_warmup`` entry of zeros (one row, ``-1`` dims as 1) run this many times
    warmup_count: int
    #: ``response_cache { enable: true }``: answers may come from the server's response cache
    response_cache: bool


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: Triton data type and config dims (batch dim excluded)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


# --------------------------------------------------------------------------------------
# config.pbtxt
# --------------------------------------------------------------------------------------


def config_data_type(triton_dtype: str) -> str:
    """The config.pbtxt spelling of a Triton data type: ``FP32`` -> ``TYPE_FP32``.

    BYTES is the one exception: model configs call it ``TYPE_STRING``.
    """
    return "TYPE_STRING" if triton_dtype == "BYTES" else f"TYPE_{triton_dtype}"


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor_block(kind: str, tensors: Sequence[TensorSpec]) -> list[str]:
    entries = [
        "  {\n"
        f'    name: "{t.name}"\n'
        f"    data_type: {config_data_type(t.dtype)}\n"
        f"    dims: {_dims(t.dims)}\n"
        "  }"
        for t in tensors
    ]
    return [f"{kind} [", ",\n".join(entries), "]"]


def _batching_block(options: ConfigOptions) -> list[str]:
    lines = ["dynamic_batching {"]
    preferred = list(options.get("preferred_batch_size", ()))
    if preferred:
        lines.append(f"  preferred_batch_size: {_dims(preferred)}")
    delay = options.get("max_queue_delay_microseconds", 0)
    if delay:
        lines.append(f"  max_queue_delay_microseconds: {delay}")
    if options.get("preserve_ordering", False):
        lines.append("  preserve_ordering: true")
    levels = options.get("priority_levels", 0)
    if levels:
        lines.append(f"  priority_levels: {levels}")
        lines.append(f"  default_priority_level: {options.get('default_priority_level', levels)}")
    policy = []
    if "timeout_action" in options:
        policy.append(f"    timeout_action: {options['timeout_action']}")
    timeout = options.get("default_timeout_microseconds", 0)
    if timeout:
        policy.append(f"    default_timeout_microseconds: {timeout}")
    if options.get("allow_timeout_override", False):
        policy.append("    allow_timeout_override: true")
    queue_size = options.get("max_queue_size", 0)
    if queue_size:
        policy.append(f"    max_queue_size: {queue_size}")
    if policy:
        lines += ["  default_queue_policy {", *policy, "  }"]
    lines.append("}")
    return lines


def _warmup_block(inputs: Sequence[TensorSpec], count: int) -> list[str]:
    lines = ["model_warmup [", "  {", '    name: "zeros"', "    batch_size: 1",
             f"    count: {count}"]
    for spec in inputs:
        dims = _dims([d if d >= 0 else 1 for d in spec.dims])
        lines += [f'    inputs {{ key: "{spec.name}" value {{ data_type: '
                  f"{config_data_type(spec.dtype)} dims: {dims} zero_data: true }} }}"]
    return [*lines, "  }", "]"]


def render_config(
    name: str,
    *,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    parameters: Mapping[str, str] | None = None,
    platform: str = "onnxruntime_onnx",
    **options: Unpack[ConfigOptions],
) -> str:
    """Render a Triton ``config.pbtxt`` (protobuf text format) for an ONNX model."""
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
    ]
    if options.get("dynamic_batching", max_batch_size > 0):
        lines += _batching_block(options)
    count = options.get("instance_count", 1)
    lines += ["instance_group [", "  {", f"    count: {count}", "    kind: KIND_CPU", "  }", "]"]
    if "version_policy" in options:
        lines.append(f"version_policy: {{ {options['version_policy']} }}")
    if options.get("warmup_count", 0) > 0:
        lines += _warmup_block(inputs, options["warmup_count"])
    if options.get("response_cache", False):
        lines.append("response_cache { enable: true }")
    parameters = dict(parameters or {})
    if "queue_delay" in options:
        parameters["queue_delay"] = options["queue_delay"]
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_version(
    repo: Path, name: str, model: onnx.ModelProto | bytes, version: int = 1,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Publish ``repo/name/version/`` atomically: fill it under a dot-prefixed temporary
    name inside the model directory (a polling server ignores it), then rename it into
    place. ``extra_files`` go beside ``model.onnx`` (e.g. a ``model_card.json``).
    Returns the version directory.
    """
    data = model if isinstance(model, bytes) else model.SerializeToString()
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version}-", dir=model_dir))
    try:
        (tmp / "model.onnx").write_bytes(data)
        for file_name, content in (extra_files or {}).items():
            (tmp / file_name).write_bytes(content)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-v{version}-", dir=model_dir))
            final.rename(old / "v")
            shutil.rmtree(old)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def write_config(model_dir: Path, config_text: str) -> Path:
    """Replace ``model_dir/config.pbtxt`` atomically (temporary file + rename)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    fd, cfg_tmp = tempfile.mkstemp(prefix=".config.", dir=model_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(config_text)
    os.replace(cfg_tmp, model_dir / "config.pbtxt")
    return model_dir / "config.pbtxt"


def write_model(
    repo: Path, name: str, model: onnx.ModelProto | bytes, config_text: str, version: int = 1
) -> Path:
    """Write ``repo/name/version/model.onnx`` and ``repo/name/config.pbtxt``.

    The version directory is filled under a temporary (non-numeric) name and
    renamed into place, and the config is replaced atomically, so a server polling
    ``repo`` never sees a half-written model. Returns the model directory.
    """
    write_version(repo, name, model, version)
    model_dir = Path(repo) / name
    write_config(model_dir, config_text)
    return model_dir


def _value_info(spec: TensorSpec, batched: bool) -> onnx.ValueInfoProto:
    shape: list[int | str] = ["N"] if batched else []
    shape += [d if d >= 0 else f"{spec.name}_d{i}" for i, d in enumerate(spec.dims)]
    return helper.make_tensor_value_info(spec.name, ONNX_TYPE[spec.dtype], shape)


def _build(
    repo: Path,
    name: str,
    *,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    version: int,
    initializers: Sequence[onnx.TensorProto] = (),
    parameters: Mapping[str, str] | None = None,
    options: ConfigOptions,
) -> Path:
    """Make the ONNX graph and the config from one set of tensor specs and write both."""
    batched = max_batch_size > 0
    graph = helper.make_graph(
        list(nodes),
        name,
        [_value_info(t, batched) for t in inputs],
        [_value_info(t, batched) for t in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=IR_VERSION,
        producer_name="peregrine-tests",
    )
    onnx.checker.check_model(model, full_check=True)
    config = render_config(
        name,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        **options,
    )
    return write_model(repo, name, model, config, version)


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def identity_model(
    repo: Path,
    name: str,
    triton_dtype: str,
    *,
    max_batch_size: int = 8,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """``INPUT0`` -> ``OUTPUT0`` unchanged; ``triton_dtype`` tensors, config dims [-1]."""
    dtype = triton_dtype.upper()
    if dtype not in ONNX_TYPE:
        raise ValueError(f"unknown Triton data type {triton_dtype!r}")
    return _build(
        repo,
        name,
        nodes=[helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        inputs=[TensorSpec("INPUT0", dtype, (-1,))],
        outputs=[TensorSpec("OUTPUT0", dtype, (-1,))],
        max_batch_size=max_batch_size,
        version=version,
        options=options,
    )


def identity_models(
    repo: Path, max_batch_size: int = 8, delay_us: int = 0, **options: Unpack[ConfigOptions]
) -> dict[str, str]:
    """One identity model per data type in :data:`IDENTITY_DTYPES`.

    Models are named ``identity_<dtype lower>`` (``identity_fp32``,
    ``identity_bytes``, ...). ``delay_us`` is the dynamic batcher's
    ``max_queue_delay_microseconds``. Returns {Triton data type: model name}.
    """
    opts: ConfigOptions = {"max_queue_delay_microseconds": delay_us, **options}
    names = {}
    for dtype in IDENTITY_DTYPES:
        name = f"identity_{dtype.lower()}"
        identity_model(repo, name, dtype, max_batch_size=max_batch_size, **opts)
        names[dtype] = name
    return names


def add_sub_model(
    repo: Path,
    name: str = "add_sub",
    *,
    max_batch_size: int = 8,
    width: int = 16,
    triton_dtype: str = "FP32",
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """Triton's classic "simple" model: two inputs, their sum and their difference.

    ``OUTPUT0 = INPUT0 + INPUT1`` and ``OUTPUT1 = INPUT0 - INPUT1``; all four tensors
    have config dims ``[width]`` (default 16).
    """
    dtype = triton_dtype.upper()
    if dtype not in ADD_SUB_DTYPES:
        raise ValueError(f"add_sub_model supports {ADD_SUB_DTYPES}, not {triton_dtype!r}")
    specs = [TensorSpec(n, dtype, (width,)) for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    return _build(
        repo,
        name,
        nodes=[
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        inputs=specs[:2],
        outputs=specs[2:],
        max_batch_size=max_batch_size,
        version=version,
        options=options,
    )


SLOW_WIDTH = 256
# Median time of one [256, 256] x [256, 256] float32 MatMul step in onnxruntime 1.32 with
# one intra-op thread, measured on the 2-core x86-64 development machine (0.30 ms). The
# per-batch time is nearly independent of the batch size: 50 steps took 14.9 ms for
# batches of 1, 8 and 32 rows alike.
SLOW_MS_PER_STEP = 0.30


def slow_model_steps(delay_ms: float) -> int:
    """Number of MatMul steps :func:`slow_model` uses for ``delay_ms``."""
    return max(1, round(delay_ms / SLOW_MS_PER_STEP))


def _slow_permutation() -> npt.NDArray[np.float32]:
    perm = np.random.default_rng(20240601).permutation(SLOW_WIDTH)
    return np.eye(SLOW_WIDTH, dtype=np.float32)[perm]


def slow_model_expected(x: npt.NDArray[np.float32], delay_ms: float) -> npt.NDArray[np.float32]:
    """What :func:`slow_model` built with ``delay_ms`` returns for ``x`` ([N, 256] FP32).

    The model multiplies by a permutation matrix, so the result is an exact
    permutation of each row of ``x`` (compare with ``np.array_equal``).
    """
    p = np.linalg.matrix_power(_slow_permutation(), slow_model_steps(delay_ms))
    return np.asarray(np.asarray(x, dtype=np.float32) @ p, dtype=np.float32)


def slow_model(
    repo: Path,
    name: str = "slow",
    delay_ms: float = 20.0,
    *,
    max_batch_size: int = 8,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """An FP32 model that takes about ``delay_ms`` per batch on one CPU thread.

    ``INPUT0`` [N, 256] -> ``OUTPUT0`` [N, 256] = ``INPUT0 @ P**K`` with ``P`` a fixed
    permutation matrix and ``K = slow_model_steps(delay_ms)``; see
    :func:`slow_model_expected`. The work is ``K`` chained [256, 256] x [256, 256]
    MatMuls computing ``P**K``, so one batch costs about ``K * 0.3 ms`` (2-core
    development machine; see :data:`SLOW_MS_PER_STEP`) whatever its size, which
    makes batching visible. The chain starts from ``P + 0 * float(batch size)``
    so that onnxruntime cannot constant-fold it (the batch size is only known at
    run time). The config pins ``intra_op_thread_count`` to 1. Results are exact:
    every output element is one input element times 1.0 plus zeros.
    """
    steps = slow_model_steps(delay_ms)
    nodes = [
        helper.make_node("Shape", ["INPUT0"], ["batch"], start=0, end=1),
        helper.make_node("Cast", ["batch"], ["batch_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["batch_f", "zero"], ["nothing"]),
        helper.make_node("Add", ["P", "nothing"], ["m1"]),
    ]
    nodes += [helper.make_node("MatMul", [f"m{i}", "P"], [f"m{i + 1}"]) for i in range(1, steps)]
    nodes.append(helper.make_node("MatMul", ["INPUT0", f"m{steps}"], ["OUTPUT0"]))
    return _build(
        repo,
        name,
        nodes=nodes,
        inputs=[TensorSpec("INPUT0", "FP32", (SLOW_WIDTH,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (SLOW_WIDTH,))],
        initializers=[
            numpy_helper.from_array(_slow_permutation(), "P"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero"),
        ],
        parameters={"intra_op_thread_count": "1"},
        max_batch_size=max_batch_size,
        version=version,
        options=options,
    )


def no_batch_model(
    repo: Path, name: str = "no_batch", *, version: int = 1, **options: Unpack[ConfigOptions]
) -> Path:
    """``max_batch_size: 0``; ``INPUT0`` FP32 [4] -> ``OUTPUT0`` = ``INPUT0 * 2`` FP32 [4].

    No dynamic_batching block is written unless ``dynamic_batching=True`` is passed.
    """
    return _build(
        repo,
        name,
        nodes=[helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT0"])],
        inputs=[TensorSpec("INPUT0", "FP32", (4,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (4,))],
        initializers=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
        max_batch_size=0,
        version=version,
        options=options,
    )


def broken_model(
    repo: Path,
    name: str = "broken",
    *,
    max_batch_size: int = 8,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """A valid config.pbtxt (FP32 ``INPUT0`` -> ``OUTPUT0``, dims [-1]) next to a
    model.onnx of garbage bytes, so loading the model fails."""
    config = render_config(
        name,
        max_batch_size=max_batch_size,
        inputs=[TensorSpec("INPUT0", "FP32", (-1,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1,))],
        **options,
    )
    garbage = b"this is not an ONNX model\x00\xff\xfe" + bytes(range(256))
    return write_model(repo, name, garbage, config, version)


def failing_model(
    repo: Path,
    name: str = "failing",
    *,
    max_batch_size: int = 8,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """Loads and warms up like any model, but every inference fails inside onnxruntime.

    The signature of :func:`scaled_model_version` (FP32 ``INPUT0`` -> ``OUTPUT0``, config
    dims [16]), so it can stand in for a version of such a model (e.g. a failing canary).
    The graph reshapes the ``N * 16`` input values to rows of 15 first, which fails at run
    time unless ``N`` is a multiple of 15 (never within ``max_batch_size`` 8).
    """
    spec = TensorSpec("INPUT0", "FP32", (16,))
    return _build(
        repo,
        name,
        nodes=[
            helper.make_node("Reshape", ["INPUT0", "rows15"], ["odd"]),
            helper.make_node("Reshape", ["odd", "rows16"], ["OUTPUT0"]),
        ],
        inputs=[spec],
        outputs=[TensorSpec("OUTPUT0", "FP32", (16,))],
        initializers=[
            numpy_helper.from_array(np.array([-1, 15], dtype=np.int64), "rows15"),
            numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "rows16"),
        ],
        max_batch_size=max_batch_size,
        version=version,
        options=options,
    )


def _permutation_loop_body(name: str) -> onnx.GraphProto:
    """The body of a Loop over a [1, 256] FP32 state: one MatMul by :func:`slow_model`'s
    permutation ``P`` (an initializer of the outer graph) per trip."""
    row: list[str | int] = ["one", SLOW_WIDTH]
    return helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "P"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        f"{name}_body",
        [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, row)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, row)],
    )


def loop_model(
    repo: Path,
    name: str = "loop",
    *,
    parameters: Mapping[str, str] | None = None,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """A model that runs as long as the request asks, and stops when cancelled.

    ``max_batch_size: 0``; ``INPUT0`` FP32 [1, 256] and ``TRIPS`` INT64 [1] -> ``OUTPUT0``
    FP32 [1, 256] = ``INPUT0 @ P**TRIPS`` (``P`` :func:`slow_model`'s permutation, so the
    result is exact). One ONNX Loop of ``TRIPS`` [1, 256] x [256, 256] MatMuls: tens of
    microseconds per trip, so a huge ``TRIPS`` runs for ever. onnxruntime checks its terminate
    flag on every trip, so a cancelled run stops within one. ``intra_op_thread_count`` 1.
    """
    return _build(
        repo,
        name,
        nodes=[
            helper.make_node("Reshape", ["TRIPS", "scalar"], ["trips"]),
            helper.make_node("Loop", ["trips", "go", "INPUT0"], ["OUTPUT0"],
                             body=_permutation_loop_body(name)),
        ],
        inputs=[TensorSpec("INPUT0", "FP32", (1, SLOW_WIDTH)), TensorSpec("TRIPS", "INT64", (1,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (1, SLOW_WIDTH))],
        initializers=[
            numpy_helper.from_array(_slow_permutation(), "P"),
            numpy_helper.from_array(np.array(True), "go"),
            numpy_helper.from_array(np.array([], dtype=np.int64), "scalar"),
        ],
        parameters={"intra_op_thread_count": "1", **(parameters or {})},
        max_batch_size=0,
        version=version,
        options=options,
    )


def loop_model_expected(x: npt.NDArray[np.float32], trips: int) -> npt.NDArray[np.float32]:
    """What :func:`loop_model` returns for ``x`` [1, 256] and ``trips``."""
    p = np.linalg.matrix_power(_slow_permutation(), trips)
    return np.asarray(np.asarray(x, dtype=np.float32) @ p, dtype=np.float32)


def stuck_model(
    repo: Path,
    name: str = "stuck",
    size: int = 8192,
    *,
    parameters: Mapping[str, str] | None = None,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """A model whose every run is one long kernel that cancelling cannot stop.

    ``max_batch_size: 0``; ``INPUT0`` FP32 [1] -> ``OUTPUT0`` FP32 [1], the sum of
    ``W @ W`` where ``W`` is ``INPUT0`` expanded to [size, size]: one MatMul of ``2 size**3``
    flops on one thread (3.6 s for size 4096 on the 2-core development machine; size 8192,
    the default, about 30 s and 768 MiB). onnxruntime checks its terminate flag between
    kernels only, so a cancelled run goes on to the end: the hung model of the tests.
    """
    return _build(
        repo,
        name,
        nodes=[
            helper.make_node("Expand", ["INPUT0", "square"], ["w"]),
            helper.make_node("MatMul", ["w", "w"], ["ww"]),
            helper.make_node("ReduceSum", ["ww"], ["total"], keepdims=1),
            helper.make_node("Reshape", ["total", "one"], ["OUTPUT0"]),
        ],
        inputs=[TensorSpec("INPUT0", "FP32", (1,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (1,))],
        initializers=[
            numpy_helper.from_array(np.array([size, size], dtype=np.int64), "square"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
        parameters={"intra_op_thread_count": "1", **(parameters or {})},
        max_batch_size=0,
        version=version,
        options=options,
    )


def chain_model(
    repo: Path,
    name: str = "chain",
    steps: int = 40,
    *,
    parameters: Mapping[str, str] | None = None,
    max_batch_size: int = 8,
    version: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """A model whose time grows with its input's size: cheap for a few values, long for
    millions.

    ``INPUT0`` FP32 [-1] -> ``OUTPUT0`` FP32 [-1] = ``Sin`` applied ``steps`` times, element
    by element, on one thread (``intra_op_thread_count`` 1).
    """
    nodes = [helper.make_node("Sin", [f"s{i}" if i else "INPUT0"],
                              [f"s{i + 1}" if i + 1 < steps else "OUTPUT0"])
             for i in range(steps)]
    return _build(
        repo,
        name,
        nodes=nodes,
        inputs=[TensorSpec("INPUT0", "FP32", (-1,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1,))],
        parameters={"intra_op_thread_count": "1", **(parameters or {})},
        max_batch_size=max_batch_size,
        version=version,
        options=options,
    )


SCALED_WIDTH = 16


def scaled_model_config(
    name: str, *, max_batch_size: int = 8, **options: Unpack[ConfigOptions]
) -> str:
    """The config.pbtxt of :func:`scaled_model_version` (FP32 [-1, 16] in and out)."""
    return render_config(
        name,
        max_batch_size=max_batch_size,
        inputs=[TensorSpec("INPUT0", "FP32", (SCALED_WIDTH,))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (SCALED_WIDTH,))],
        **options,
    )


def scaled_model_version(
    repo: Path,
    name: str,
    version: int,
    factor: float,
    *,
    with_config: bool = False,
    max_batch_size: int = 8,
    weights_mb: float = 0.0,
    extra_files: Mapping[str, bytes] | None = None,
    **options: Unpack[ConfigOptions],
) -> Path:
    """One version whose output says which version answered: ``OUTPUT0 = INPUT0 * factor``.

    ``INPUT0``/``OUTPUT0`` FP32 [N, 16] (config dims [16], ``max_batch_size`` 8, dynamic
    batching). Writes only ``<name>/<version>/`` (published atomically, see
    :func:`write_version`), plus ``config.pbtxt`` when ``with_config`` (rendered from
    ``options``). ``weights_mb`` > 0 adds a weight tensor of about that size that every
    request reads one zero row of (through a Gather onnxruntime cannot fold away), so a
    loaded version holds that much memory without changing its output.
    ``extra_files`` are written into the version directory (e.g. ``model_card.json``).
    Returns the version directory.
    """
    batched = max_batch_size > 0
    initializers = [numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")]
    if weights_mb > 0:
        rows = max(2, int(weights_mb * 1024 * 1024) // (4 * SCALED_WIDTH))
        weights = np.random.default_rng(version).random((rows, SCALED_WIDTH), dtype=np.float32)
        weights[0] = 0.0
        initializers += [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        nodes = [
            helper.make_node("Mul", ["INPUT0", "zero"], ["zeros"]),
            helper.make_node("ReduceMin", ["zeros"], ["zero_at_run_time"], keepdims=0),
            helper.make_node("Cast", ["zero_at_run_time"], ["row"], to=TensorProto.INT64),
            helper.make_node("Gather", ["W", "row"], ["zero_row"], axis=0),
            helper.make_node("Mul", ["INPUT0", "factor"], ["scaled"]),
            helper.make_node("Add", ["scaled", "zero_row"], ["OUTPUT0"]),
        ]
    else:
        nodes = [helper.make_node("Mul", ["INPUT0", "factor"], ["OUTPUT0"])]
    version_dir = _write_scaled_version(repo, name, version, nodes, initializers, batched,
                                        extra_files)
    if with_config:
        write_config(Path(repo) / name,
                     scaled_model_config(name, max_batch_size=max_batch_size, **options))
    return version_dir


def _write_scaled_version(
    repo: Path, name: str, version: int, nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto], batched: bool,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Check and publish one version of the scaled signature (FP32 [N, 16] in and out)."""
    graph = helper.make_graph(
        list(nodes), name,
        [_value_info(TensorSpec("INPUT0", "FP32", (SCALED_WIDTH,)), batched)],
        [_value_info(TensorSpec("OUTPUT0", "FP32", (SCALED_WIDTH,)), batched)],
        initializer=list(initializers),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=IR_VERSION,
        producer_name="peregrine-tests",
    )
    onnx.checker.check_model(model, full_check=True)
    return write_version(repo, name, model, version, extra_files)


def stalling_scaled_version(
    repo: Path, name: str, version: int, factor: float, trips: int, *, broken: bool = False,
) -> Path:
    """A version of :func:`scaled_model_version`'s signature (``max_batch_size`` > 0) whose
    every run first spins ``trips`` trips of :func:`loop_model`'s MatMul (about 20 µs each on
    the 2-core development machine), so its warm-up (config option ``warmup_count``) keeps
    it loading for a while. It then answers ``INPUT0 * factor`` exactly (the loop's state is
    zeros derived from the input, so onnxruntime cannot fold it away) or, ``broken``, fails
    every run after the loop (a Reshape to rows of 15, as :func:`failing_model`), so its
    warm-up fails late. Writes only ``<name>/<version>/``; returns it.
    """
    nodes = [
        helper.make_node("ReduceSum", ["INPUT0"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["zero_at_run_time"]),
        helper.make_node("Expand", ["zero_at_run_time", "row"], ["state"]),
        helper.make_node("Loop", ["trips", "go", "state"], ["spun"],
                         body=_permutation_loop_body(name)),
        helper.make_node("ReduceSum", ["spun"], ["nothing"], keepdims=0),
        helper.make_node("Mul", ["INPUT0", "factor"], ["scaled"]),
        helper.make_node("Add", ["scaled", "nothing"], ["answer" if broken else "OUTPUT0"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([1, SLOW_WIDTH], dtype=np.int64), "row"),
        numpy_helper.from_array(np.array(trips, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array(_slow_permutation(), "P"),
    ]
    if broken:
        nodes += [helper.make_node("Reshape", ["answer", "rows15"], ["odd"]),
                  helper.make_node("Reshape", ["odd", "rows16"], ["OUTPUT0"])]
        initializers += [
            numpy_helper.from_array(np.array([-1, 15], dtype=np.int64), "rows15"),
            numpy_helper.from_array(np.array([-1, SCALED_WIDTH], dtype=np.int64), "rows16"),
        ]
    return _write_scaled_version(repo, name, version, nodes, initializers, batched=True)


def ragged_model(
    repo: Path,
    name: str = "ragged",
    *,
    max_batch_size: int = 8,
    pad: float | None = None,
    rank: int = 1,
    **options: Unpack[ConfigOptions],
) -> Path:
    """Ragged batching: input ``X`` [-1] FP32 (``rank`` variable dims) with
    ``allow_ragged_batch``; ``DOUBLED = 2 X``, scattered back to each request's own extents
    (batch_output BATCH_SCATTER_WITH_INPUT_SHAPE); ``TOTAL`` [1] (one 1 per dim) = the sum of
    each row of X, which zero padding leaves unchanged. ``pad`` sets the ``ragged_pad.X``
    parameter."""
    variable = (-1,) * rank
    x = TensorSpec("X", "FP32", variable)
    model_dir = _build(
        repo,
        name,
        nodes=[
            helper.make_node("Add", ["X", "X"], ["DOUBLED"]),
            helper.make_node("ReduceSum", ["X", "axes"], ["TOTAL"], keepdims=1),
        ],
        inputs=[x],
        outputs=[TensorSpec("DOUBLED", "FP32", variable), TensorSpec("TOTAL", "FP32", (1,) * rank)],
        max_batch_size=max_batch_size,
        version=1,
        initializers=[numpy_helper.from_array(np.arange(1, rank + 1, dtype=np.int64), "axes")],
        parameters=None if pad is None else {"ragged_pad.X": str(pad)},
        options=options,
    )
    text = (model_dir / "config.pbtxt").read_text(encoding="utf-8")
    declared = f'    name: "X"\n    data_type: TYPE_FP32\n    dims: {_dims(variable)}\n'
    assert declared in text
    text = text.replace(declared, declared + "    allow_ragged_batch: true\n")
    text += ('batch_output [ { target_name: "DOUBLED" kind: BATCH_SCATTER_WITH_INPUT_SHAPE '
             'source_input: "X" } ]\n')
    write_config(model_dir, text)
    return model_dir
