"""server.repository.model_config (config.pbtxt -> ModelSpec) and versions.select_versions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from server._pb import model_config_pb2 as mc
from server.backends.onnxruntime import OnnxRuntimeFactory
from server.errors import ModelLoadError
from server.repository.model_config import CONFIG_FILE, read_config, to_spec
from server.repository.versions import select_versions
from server.spec import BatchingSpec, InstanceSpec, ModelSpec, QueuePolicy, TensorSpec
from server.types import DataType
from tests import model_factory

FULL_CONFIG = """\
name: "full"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 16
version_policy: { latest { num_versions: 2 } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    format: FORMAT_NONE
    dims: [ 3, -1 ]
  },
  {
    name: "MASK"
    data_type: TYPE_BOOL
    dims: [ 4 ]
    optional: true
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT64
    dims: [ 1 ]
    label_filename: "labels.txt"
  },
  {
    name: "TEXT"
    data_type: TYPE_STRING
    dims: [ -1 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 1500
  preserve_ordering: true
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy {
    timeout_action: REJECT
    default_timeout_microseconds: 100000
    allow_timeout_override: true
    max_queue_size: 32
  }
  priority_queue_policy {
    key: 1
    value {
      default_timeout_microseconds: 5000
      max_queue_size: 4
    }
  }
}
instance_group [
  {
    count: 2
    kind: KIND_CPU
  },
  {
    kind: KIND_GPU
    gpus: [ 0, 1 ]
  }
]
default_model_filename: "net.onnx"
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters { key: "execution_mode" value: { string_value: "sequential" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    count: 3
    inputs {
      key: "INPUT0"
      value {
        data_type: TYPE_FP32
        dims: [ 3, 5 ]
        zero_data: true
      }
    }
  }
]
"""


def model_dir(tmp_path: Path, name: str, text: str | None) -> Path:
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (directory / CONFIG_FILE).write_text(textwrap.dedent(text), encoding="utf-8")
    return directory


def parse(tmp_path: Path, name: str, text: str) -> ModelSpec:
    directory = model_dir(tmp_path, name, text)
    return to_spec(read_config(directory), directory)


MINIMAL = """\
name: "{name}"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""


def minimal(name: str, extra: str = "") -> str:
    return MINIMAL.format(name=name) + extra


# -- a full config ---------------------------------------------------------------------------


def test_full_triton_config_parses_to_the_expected_spec(tmp_path: Path) -> None:
    spec = parse(tmp_path, "full", FULL_CONFIG)
    assert spec.name == "full"
    assert spec.platform == "onnxruntime_onnx"
    assert spec.backend == "onnxruntime"
    assert spec.max_batch_size == 16
    assert spec.batches
    assert spec.inputs == (
        TensorSpec("INPUT0", DataType.FP32, (3, -1)),
        TensorSpec("MASK", DataType.BOOL, (4,), optional=True),
    )
    assert spec.outputs == (
        TensorSpec("OUTPUT0", DataType.INT64, (1,), label_filename="labels.txt"),
        TensorSpec("TEXT", DataType.BYTES, (-1,)),
    )
    batching = spec.batching
    assert batching.enabled
    assert batching.preferred_batch_sizes == (4, 8)
    assert batching.max_queue_delay_us == 1500
    assert batching.preserve_ordering
    assert batching.priority_levels == 3
    assert batching.default_priority_level == 2
    assert batching.default_queue_policy == QueuePolicy(
        timeout_us=100_000, allow_timeout_override=True, max_queue_size=32
    )
    assert dict(batching.priority_queue_policy) == {1: QueuePolicy(timeout_us=5000,
                                                                   max_queue_size=4)}
    assert batching.queue_policy(1).max_queue_size == 4
    assert batching.queue_policy(2).max_queue_size == 32
    assert spec.instances == (
        InstanceSpec(kind="CPU", count=2),
        InstanceSpec(kind="GPU", count=1, gpus=(0, 1)),
    )
    assert spec.instance_count == 3
    assert spec.default_model_filename == "net.onnx"
    assert dict(spec.parameters) == {"intra_op_thread_count": "2",
                                     "execution_mode": "sequential"}
    (warm,) = spec.warmup
    assert (warm.name, warm.batch_size, warm.count) == ("zeros", 4, 3)
    assert warm.inputs["INPUT0"].dims == (3, 5)
    assert warm.inputs["INPUT0"].source == "zero"
    assert warm.inputs["INPUT0"].datatype is DataType.FP32
    assert spec.input("MASK") is not None and spec.output("nope") is None


def test_version_policy_is_kept_on_the_parsed_config(tmp_path: Path) -> None:
    config = read_config(model_dir(tmp_path, "full", FULL_CONFIG))
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2


def test_defaults_of_a_minimal_config(tmp_path: Path) -> None:
    spec = parse(tmp_path, "tiny", minimal("tiny"))
    assert spec.platform == "onnxruntime_onnx" and spec.backend == "onnxruntime"
    assert spec.batching == BatchingSpec()
    assert not spec.batching.enabled
    assert spec.instances == (InstanceSpec(kind="AUTO", count=1),)
    assert spec.default_model_filename == "model.onnx"
    assert spec.warmup == ()


def test_name_may_be_left_out(tmp_path: Path) -> None:
    text = minimal("x").replace('name: "x"\n', "")
    assert parse(tmp_path, "from_dir", text).name == "from_dir"


def test_empty_dynamic_batching_block_enables_batching(tmp_path: Path) -> None:
    spec = parse(tmp_path, "db", minimal("db", "dynamic_batching { }\n"))
    assert spec.batching.enabled
    assert spec.batching.max_queue_delay_us == 0
    assert spec.batching.preferred_batch_sizes == ()


def test_model_factory_configs_round_trip(tmp_path: Path) -> None:
    directory = model_factory.slow_model(tmp_path, "slow", delay_ms=1, max_queue_size=3,
                                         priority_levels=2, default_timeout_microseconds=7)
    spec = to_spec(read_config(directory), directory)
    assert spec.batching.default_queue_policy == QueuePolicy(timeout_us=7, max_queue_size=3)
    assert spec.batching.default_priority_level == 2
    assert spec.parameters["intra_op_thread_count"] == "1"


# -- unknown fields -------------------------------------------------------------------------------


def test_misspelled_field_names_file_line_and_field(tmp_path: Path) -> None:
    text = 'name: "typo"\nplatform: "onnxruntime_onnx"\nmax_batch_sizee: 8\n'
    directory = model_dir(tmp_path, "typo", text)
    with pytest.raises(ModelLoadError) as caught:
        read_config(directory)
    message = str(caught.value)
    assert str(directory / CONFIG_FILE) in message
    assert ":3:" in message
    assert "max_batch_sizee" in message


def test_unsupported_sequence_batching_is_rejected_by_name(tmp_path: Path) -> None:
    text = minimal("seq", "sequence_batching {\n  max_sequence_idle_microseconds: 5000\n}\n")
    directory = model_dir(tmp_path, "seq", text)
    with pytest.raises(ModelLoadError) as caught:
        read_config(directory)
    message = str(caught.value)
    assert str(directory / CONFIG_FILE) in message
    assert ":5:" in message
    assert "sequence_batching" in message


def test_misspelled_nested_field_names_its_line(tmp_path: Path) -> None:
    text = minimal("nested", "dynamic_batching {\n  max_queue_delay_microsecond: 100\n}\n")
    with pytest.raises(ModelLoadError, match=r":6:\d+.*max_queue_delay_microsecond"):
        read_config(model_dir(tmp_path, "nested", text))


@pytest.mark.parametrize("field", ["optimization { }", "ensemble_scheduling { }",
                                   "model_metrics { }"])
def test_other_unsupported_triton_features_are_rejected(tmp_path: Path, field: str) -> None:
    with pytest.raises(ModelLoadError, match=field.split()[0]):
        read_config(model_dir(tmp_path, "unsupported", minimal("unsupported", field + "\n")))


def test_response_cache_is_read_into_the_spec(tmp_path: Path) -> None:
    cached = model_dir(tmp_path, "cached", minimal("cached", "response_cache { enable: true }\n"))
    assert to_spec(read_config(cached), cached).response_cache
    plain = model_dir(tmp_path, "plain", minimal("plain"))
    assert not to_spec(read_config(plain), plain).response_cache


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, "broken", 'name: "broken"\nmax_batch_size: {\n')
    with pytest.raises(ModelLoadError, match=str(directory / CONFIG_FILE)):
        read_config(directory)


# -- semantic validation --------------------------------------------------------------------------


def test_name_mismatch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"name 'other' does not match .*'dirname'"):
        parse(tmp_path, "dirname", minimal("other"))


def test_preferred_size_above_max_is_rejected(tmp_path: Path) -> None:
    text = minimal("pref", "dynamic_batching { preferred_batch_size: [ 4, 16 ] }\n")
    with pytest.raises(ModelLoadError, match=r"preferred_batch_size 16 is outside 1..8"):
        parse(tmp_path, "pref", text)


def test_preferred_size_zero_is_rejected(tmp_path: Path) -> None:
    text = minimal("pref0", "dynamic_batching { preferred_batch_size: [ 0 ] }\n")
    with pytest.raises(ModelLoadError, match="preferred_batch_size 0"):
        parse(tmp_path, "pref0", text)


def test_dynamic_batching_needs_a_batching_model(tmp_path: Path) -> None:
    text = minimal("nb", "dynamic_batching { }\n").replace("max_batch_size: 8",
                                                          "max_batch_size: 0")
    with pytest.raises(ModelLoadError, match="needs max_batch_size > 0"):
        parse(tmp_path, "nb", text)


@pytest.mark.parametrize("default_level", [0, 4])
def test_default_priority_level_out_of_range(tmp_path: Path, default_level: int) -> None:
    text = minimal("prio", "dynamic_batching { priority_levels: 3 "
                           f"default_priority_level: {default_level} }}\n")
    with pytest.raises(ModelLoadError, match=r"default_priority_level must be within 1\.\.3"):
        parse(tmp_path, "prio", text)


def test_default_priority_level_without_levels(tmp_path: Path) -> None:
    text = minimal("prio", "dynamic_batching { default_priority_level: 1 }\n")
    with pytest.raises(ModelLoadError, match="needs priority_levels"):
        parse(tmp_path, "prio", text)


def test_priority_queue_policy_level_out_of_range(tmp_path: Path) -> None:
    text = minimal("prio", "dynamic_batching {\n  priority_levels: 2\n  default_priority_level: 1\n"
                           "  priority_queue_policy { key: 3 value { max_queue_size: 1 } }\n}\n")
    with pytest.raises(ModelLoadError, match=r"priority_queue_policy level 3 is outside 1..2"):
        parse(tmp_path, "prio", text)


def test_timeout_action_delay_is_rejected(tmp_path: Path) -> None:
    text = minimal("delay", "dynamic_batching { default_queue_policy { timeout_action: DELAY } }\n")
    with pytest.raises(ModelLoadError, match="timeout_action DELAY is not supported"):
        parse(tmp_path, "delay", text)


def test_timeout_action_delay_in_a_priority_policy_is_rejected(tmp_path: Path) -> None:
    text = minimal("delay2", "dynamic_batching {\n  priority_levels: 2\n"
                             "  default_priority_level: 2\n"
                             "  priority_queue_policy { key: 1 value { timeout_action: DELAY } }\n"
                             "}\n")
    with pytest.raises(ModelLoadError, match="priority 1: timeout_action DELAY"):
        parse(tmp_path, "delay2", text)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('platform: "tensorflow_savedmodel"\n', "platform 'tensorflow_savedmodel' is not"),
        ('backend: "tensorflow"\n', "backend 'tensorflow' is not supported"),
        ("instance_group [ { kind: KIND_MODEL } ]\n", "KIND_MODEL is not supported"),
        ("model_transaction_policy { decoupled: true }\n", "decoupled models .* are not supported"),
    ],
)
def test_unsupported_settings_are_rejected(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse(tmp_path, "unsup", minimal("unsup", extra))


def test_negative_max_batch_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="max_batch_size must not be negative"):
        parse(tmp_path, "neg", minimal("neg").replace("max_batch_size: 8", "max_batch_size: -1"))


@pytest.mark.parametrize("dims", ["[ 0 ]", "[ -2 ]", "[ 4, 0 ]"])
def test_bad_dims_are_rejected(tmp_path: Path, dims: str) -> None:
    text = minimal("dims").replace('data_type: TYPE_FP32 dims: [ 4 ] } ]\noutput',
                                   f'data_type: TYPE_FP32 dims: {dims} }} ]\noutput')
    with pytest.raises(ModelLoadError, match="dims must be positive or -1"):
        parse(tmp_path, "dims", text)


def test_missing_data_type_is_rejected(tmp_path: Path) -> None:
    text = minimal("dt").replace('name: "INPUT0" data_type: TYPE_FP32', 'name: "INPUT0"')
    with pytest.raises(ModelLoadError, match="input 'INPUT0': data_type is missing"):
        parse(tmp_path, "dt", text)


def test_duplicate_input_is_rejected(tmp_path: Path) -> None:
    text = minimal("dup", 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    with pytest.raises(ModelLoadError, match="input 'INPUT0' is declared twice"):
        parse(tmp_path, "dup", text)


def test_warmup_batch_above_max_is_rejected(tmp_path: Path) -> None:
    text = minimal("warm", 'model_warmup [ { name: "w" batch_size: 9 inputs { key: "INPUT0" '
                           'value { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]\n')
    with pytest.raises(ModelLoadError, match="batch_size 9 exceeds max_batch_size"):
        parse(tmp_path, "warm", text)


# -- auto-complete from the model ------------------------------------------------------------------


def complete(directory: Path) -> ModelSpec:
    spec = to_spec(read_config(directory), directory)
    return OnnxRuntimeFactory().complete_spec(spec, str(directory / "1"))


def test_missing_config_is_auto_completed_from_the_model(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "auto", width=8)
    (directory / CONFIG_FILE).unlink()
    config = read_config(directory)
    assert config == mc.ModelConfig()
    spec = complete(directory)
    assert spec.name == "auto"
    # Without a config the model does not batch: every dimension comes from the model, and
    # its dynamic batch dimension becomes -1.
    assert spec.max_batch_size == 0
    assert spec.inputs == (TensorSpec("INPUT0", DataType.FP32, (-1, 8)),
                           TensorSpec("INPUT1", DataType.FP32, (-1, 8)))
    assert spec.outputs == (TensorSpec("OUTPUT0", DataType.FP32, (-1, 8)),
                            TensorSpec("OUTPUT1", DataType.FP32, (-1, 8)))


def test_config_without_tensors_is_completed_without_the_batch_dim(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "partial", width=8, triton_dtype="INT32")
    (directory / CONFIG_FILE).write_text('name: "partial"\nmax_batch_size: 4\n',
                                         encoding="utf-8")
    spec = complete(directory)
    assert [t.name for t in spec.inputs] == ["INPUT0", "INPUT1"]
    assert all(t.dims == (8,) and t.datatype is DataType.INT32 for t in spec.inputs)
    assert [t.name for t in spec.outputs] == ["OUTPUT0", "OUTPUT1"]


def test_declared_tensors_matching_the_model_are_kept(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "declared")
    spec = complete(directory)
    assert spec.inputs == (TensorSpec("INPUT0", DataType.FP32, (16,)),
                           TensorSpec("INPUT1", DataType.FP32, (16,)))


def test_config_input_not_in_the_model_is_a_load_error(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "wrong")
    config = (directory / CONFIG_FILE).read_text(encoding="utf-8")
    (directory / CONFIG_FILE).write_text(config.replace('"INPUT1"', '"INPUT_X"'),
                                         encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"config input 'INPUT_X' is not in the model"):
        complete(directory)


def test_config_datatype_mismatch_is_a_load_error(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "dtype")
    config = (directory / CONFIG_FILE).read_text(encoding="utf-8")
    (directory / CONFIG_FILE).write_text(config.replace("TYPE_FP32", "TYPE_INT32", 1),
                                         encoding="utf-8")
    with pytest.raises(ModelLoadError, match="TYPE_INT32 but the model's is tensor\\(float\\)"):
        complete(directory)


def test_config_dims_mismatch_is_a_load_error(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "dims", width=16)
    config = (directory / CONFIG_FILE).read_text(encoding="utf-8")
    (directory / CONFIG_FILE).write_text(config.replace("[ 16 ]", "[ 15 ]", 1), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"dims \[15\] do not match the model's \[16\]"):
        complete(directory)


def test_model_input_missing_from_the_config_is_a_load_error(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "missing")
    text = (directory / CONFIG_FILE).read_text(encoding="utf-8")
    start = text.index("  {\n    name: \"INPUT1\"")
    end = text.index("  }", start) + len("  }")
    text = text[:start].rstrip(",\n") + "\n" + text[end:]
    (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"model inputs \['INPUT1'\] are missing"):
        complete(directory)


def test_missing_model_file_is_a_load_error(tmp_path: Path) -> None:
    directory = model_factory.add_sub_model(tmp_path, "nofile")
    (directory / "1" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model.onnx' is missing"):
        complete(directory)


# -- version policy --------------------------------------------------------------------------------


def policy(text: str) -> mc.ModelVersionPolicy:
    from google.protobuf import text_format

    parsed: mc.ModelVersionPolicy = text_format.Parse(text, mc.ModelVersionPolicy())
    return parsed


def test_default_policy_serves_the_latest_version() -> None:
    assert select_versions(mc.ModelVersionPolicy(), [3, 1, 2]) == [3]


def test_latest_n() -> None:
    assert select_versions(policy("latest { num_versions: 2 }"), [1, 5, 3, 2]) == [3, 5]
    assert select_versions(policy("latest { num_versions: 10 }"), [2, 1]) == [1, 2]


def test_latest_zero_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="num_versions >= 1"):
        select_versions(policy("latest { num_versions: 0 }"), [1, 2])


def test_all_versions() -> None:
    assert select_versions(policy("all { }"), [3, 1, 2, 2]) == [1, 2, 3]


def test_specific_versions() -> None:
    assert select_versions(policy("specific { versions: [ 3, 1 ] }"), [1, 2, 3]) == [1, 3]


def test_missing_specific_version_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match=r"versions \[4\] that are not on disk"):
        select_versions(policy("specific { versions: [ 1, 4 ] }"), [1, 2, 3])


def test_version_policy_from_a_config_file(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, "vp", minimal("vp", "version_policy: { all { } }\n"))
    assert select_versions(read_config(directory).version_policy, [2, 7]) == [2, 7]


# -- ragged batching ---------------------------------------------------------------------------

RAGGED = """\
name: "{name}"
max_batch_size: {max_batch}
input [ {{ name: "TOKENS" data_type: {dtype} dims: [ -1 ] allow_ragged_batch: true }},
        {{ name: "FIXED" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "PER_TOKEN" data_type: TYPE_FP32 dims: [ -1, 8 ] }},
         {{ name: "POOLED" data_type: TYPE_FP32 dims: [ 8 ] }} ]
batch_output [ {{ target_name: "PER_TOKEN" kind: BATCH_SCATTER_WITH_INPUT_SHAPE
                 source_input: "{source}" }} ]
{extra}"""


def ragged(name: str, *, dtype: str = "TYPE_INT64", max_batch: int = 8, source: str = "TOKENS",
           extra: str = "") -> str:
    return RAGGED.format(name=name, dtype=dtype, max_batch=max_batch, source=source, extra=extra)


def test_ragged_input_and_scattered_output_parse(tmp_path: Path) -> None:
    spec = parse(tmp_path, "rag", ragged(
        "rag", extra='parameters { key: "ragged_pad.TOKENS" value: { string_value: "-1" } }\n'))
    tokens, fixed = spec.inputs
    assert tokens.ragged and tokens.pad_value == -1.0
    assert not fixed.ragged
    per_token, pooled = spec.outputs
    assert per_token.scatter_like == "TOKENS" and pooled.scatter_like == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ragged("bad", max_batch=0), "needs a model that batches"),
        (ragged("bad", dtype="TYPE_STRING"), "BYTES inputs is not supported"),
        (ragged("bad", source="FIXED"), "source_input must name one input with"),
        (ragged("bad").replace("dims: [ -1 ] allow", "dims: [ 4 ] allow"), "variable \\(-1\\) dim"),
        (ragged("bad", extra='parameters { key: "ragged_pad.TOKENS" value: '
                             '{ string_value: "x" } }\n'), "must be a number"),
        (ragged("bad", dtype="TYPE_UINT8", extra='parameters { key: "ragged_pad.TOKENS" '
                                                 'value: { string_value: "-1" } }\n'),
         "does not fit UINT8"),
        (ragged("bad").replace('target_name: "PER_TOKEN"', 'target_name: "NOPE"'),
         "outputs the model does not declare"),
        (ragged("bad", extra='batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" '
                             'data_type: TYPE_INT32 source_input: "TOKENS" } ]\n'),
         "batch_input is not supported"),
    ],
)
def test_unsupported_ragged_configs_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse(tmp_path, "bad", text)
