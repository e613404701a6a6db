"""The TensorRT engine cache (server/backends/tensorrt/engine_cache.py) without TensorRT: the
key, the paths, atomic writes, the lock."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from server.accelerator_options import ShapeRange
from server.atomic_file import write_atomically
from server.backends.tensorrt.engine_cache import (
    BuildSettings,
    GpuIdentity,
    build_lock,
    cache_entry,
    default_cache_dir,
    engine_cache_key,
    file_sha256,
    key_material,
    resolve_cache_dir,
    timing_cache_path,
)
from server.errors import ModelLoadError

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0))
PROFILE = {"image": ShapeRange((1, 3, 32, 32), (16, 3, 32, 32), (32, 3, 32, 32))}
SETTINGS = BuildSettings(("fp16",), PROFILE, workspace_mb=1024)
SHA = "ab" * 32


def key(**changes: object) -> str:
    args: dict[str, object] = {"model_sha256": SHA, "trt_version": "10.13.0.35", "gpu": H100,
                               "settings": SETTINGS}
    args.update(changes)
    return engine_cache_key(**args)  # type: ignore[arg-type]


def test_the_key_is_a_stable_sha256() -> None:
    assert key() == key()
    assert len(key()) == 64 and int(key(), 16) >= 0
    reordered = BuildSettings(("fp16",), MappingProxyType(dict(reversed(list(PROFILE.items())))),
                              workspace_mb=1024)
    assert key(settings=reordered) == key()
    both = BuildSettings(("int8", "fp16"), PROFILE)
    assert key(settings=both) == key(settings=BuildSettings(("fp16", "int8"), PROFILE))


@pytest.mark.parametrize("change", [
    {"model_sha256": "cd" * 32},
    {"trt_version": "10.14.1"},
    {"gpu": GpuIdentity("NVIDIA H200", (9, 0))},
    {"gpu": GpuIdentity("NVIDIA H100 80GB HBM3", (8, 9))},
    {"settings": BuildSettings((), PROFILE, workspace_mb=1024)},
    {"settings": BuildSettings(("bf16",), PROFILE, workspace_mb=1024)},
    {"settings": BuildSettings(("fp16",), PROFILE)},
    {"settings": BuildSettings(("fp16",), PROFILE, 1024, builder_optimization_level=5)},
    {"settings": BuildSettings(("fp16",), {"image": ShapeRange(
        (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}, 1024)},
])
def test_every_component_changes_the_key(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_key_material_says_what_the_key_was_made_of() -> None:
    material = key_material(SHA, "10.13.0.35", H100, SETTINGS)
    assert material["model_sha256"] == SHA and material["tensorrt"] == "10.13.0.35"
    assert material["gpu"] == "NVIDIA H100 80GB HBM3"
    assert material["compute_capability"] == "9.0"
    assert material["build"]["precision_flags"] == ["fp16"]
    assert material["build"]["profile"]["image"]["max"] == [32, 3, 32, 32]


def test_paths(tmp_path: Path) -> None:
    entry = cache_entry(tmp_path, "my model/v", key())
    assert entry.directory == tmp_path / "my_model_v"
    assert entry.plan.name == f"{key()}.plan" and entry.metadata.suffix == ".json"
    assert H100.slug == "nvidia-h100-80gb-hbm3-sm90"
    assert timing_cache_path(tmp_path, H100, "10.13.0.35") == \
        tmp_path / "timing" / "nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35.cache"


def test_cache_directories(tmp_path: Path) -> None:
    assert default_cache_dir({"PEREGRINE_TRT_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/peregrine/tensorrt")
    assert default_cache_dir({}).parts[-3:] == (".cache", "peregrine", "tensorrt")
    model_dir = tmp_path / "m"
    assert resolve_cache_dir("engines", model_dir, {}) == model_dir.resolve() / "engines"
    for outside in ("/abs", "../other", "~/engines"):
        with pytest.raises(ModelLoadError, match=r"trt_engine_cache_dir .* must be a relative"):
            resolve_cache_dir(outside, model_dir, {})
    assert resolve_cache_dir(None, model_dir, {"PEREGRINE_TRT_CACHE_DIR": "/e"}) == Path("/e")


def test_atomic_write_and_hash(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "x.plan"
    write_atomically(target, b"engine")
    write_atomically(target, memoryview(b"engine2"))
    assert target.read_bytes() == b"engine2"
    assert [p.name for p in target.parent.iterdir()] == ["x.plan"]  # no temporary left
    assert file_sha256(target) == hashlib.sha256(b"engine2").hexdigest()


def test_build_lock_serialises_builders(tmp_path: Path) -> None:
    entry = cache_entry(tmp_path, "m", key())
    inside: list[int] = []
    overlaps: list[bool] = []

    def builder(n: int) -> None:
        with build_lock(entry):
            overlaps.append(bool(inside))
            inside.append(n)
            time.sleep(0.05)
            inside.remove(n)

    threads = [threading.Thread(target=builder, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [False, False, False]
    assert entry.lock.exists()


class FakeTimingCache:
    def __init__(self, data: bytes = b"timings", fail: bool = False) -> None:
        self.data = data
        self.fail = fail

    def serialize(self) -> bytes:
        if self.fail:
            raise RuntimeError("serialisation failed")
        return self.data


class FakeBuilderConfig:
    """The timing-cache calls of TensorRT's IBuilderConfig, with the failures they can have."""

    def __init__(self, accepts: bool = True, keeps: bool = True, fail: bool = False) -> None:
        self.accepts = accepts
        self.keeps = keeps
        self.fail = fail
        self.cache: FakeTimingCache | None = None

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(data or b"new", self.fail)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if self.keeps:
            self.cache = cache
        return self.accepts

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.cache


def test_a_timing_cache_is_saved_when_the_builder_kept_it(tmp_path: Path) -> None:
    from server.backends.tensorrt.builder import _timing_cache, save_timing_cache

    path = tmp_path / "timing" / "gpu.cache"
    config = FakeBuilderConfig()
    assert _timing_cache(config, path) is not None
    assert save_timing_cache(config, path) and path.read_bytes() == b"new"


@pytest.mark.parametrize("config", [
    FakeBuilderConfig(accepts=False, keeps=False),  # set_timing_cache answered False
    FakeBuilderConfig(accepts=True, keeps=False),  # took it, yet get_timing_cache is None
    FakeBuilderConfig(fail=True),  # serialisation fails
], ids=["refused", "lost", "unserialisable"])
def test_a_timing_cache_that_cannot_be_saved_never_costs_the_engine(
    tmp_path: Path, config: FakeBuilderConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    from server.backends.tensorrt.builder import _timing_cache, save_timing_cache

    path = tmp_path / "gpu.cache"
    cache = _timing_cache(config, path)
    if cache is None:
        assert not config.accepts  # refused: the build goes on without a cache to write back
    else:
        with caplog.at_level("WARNING"):
            assert not save_timing_cache(config, path)  # a warning, no exception
        assert "timing cache not saved" in caplog.text
    assert not path.exists()


class FakeNetwork:
    def __init__(self, *kinds: str) -> None:
        self.layers = [SimpleNamespace(type=kind) for kind in kinds]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> SimpleNamespace:
        return self.layers[index]


FAKE_TRT = SimpleNamespace(LayerType=SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ"))


def test_int8_is_refused_for_a_model_without_quantize_nodes(tmp_path: Path) -> None:
    from server.backends.tensorrt.builder import require_quantized

    require_quantized(FAKE_TRT, FakeNetwork("CONV", "Q", "DQ", "MATMUL"), tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match=r"trt_precision int8 needs a quantised model.*"
                                             r"QuantizeLinear/DequantizeLinear"):
        require_quantized(FAKE_TRT, FakeNetwork("CONV", "MATMUL"), tmp_path / "m.onnx")


class FakeFlagConfig:
    """The flag calls of TensorRT's IBuilderConfig: which flags are set, TF32 on by default
    as TensorRT has it."""

    def __init__(self) -> None:
        self.flags = {"TF32"}

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)


FLAGS_TRT = SimpleNamespace(__version__="10.16", BuilderFlag=SimpleNamespace(
    FP16="FP16", BF16="BF16", INT8="INT8", TF32="TF32"))


@pytest.mark.parametrize(("precision", "flags"), [
    ("fp32", set()),  # the precision contract: an fp32 engine computes in FP32, not TF32
    ("fp16", {"FP16", "TF32"}),
    ("bf16", {"BF16", "TF32"}),
    ("int8,fp16", {"INT8", "FP16", "TF32"}),
])
def test_builder_flags_follow_the_precision_contract(precision: str, flags: set[str]) -> None:
    from server.accelerator_options import parse_trt_options
    from server.backends.tensorrt.builder import set_precision

    config = FakeFlagConfig()
    options = parse_trt_options({"trt_precision": precision}, "m")
    set_precision(FLAGS_TRT, config, options.precision_flags)
    assert config.flags == flags


def test_a_tensorrt_without_reduced_precision_flags_says_so() -> None:
    from server.backends.tensorrt.builder import set_precision

    strongly_typed = SimpleNamespace(__version__="11.4", BuilderFlag=SimpleNamespace())
    config = FakeFlagConfig()
    set_precision(strongly_typed, config, ())  # no TF32 flag to clear: nothing to do
    with pytest.raises(ModelLoadError, match=r"TensorRT 11\.4 has no FP16 builder flag"):
        set_precision(strongly_typed, config, ("fp16",))
