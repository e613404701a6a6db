"""NativeModelPacker against ReferenceModelPacker through the ModelPacker interface: the same
batch tensors from the same requests, and the same raw_output_contents bytes per request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.codec.encode import raw_bytes
from server.interfaces import ModelPacker
from server.packing import (
    NativePacker,
    ReferencePacker,
    default_packer,
    native_enabled,
    select_packer,
)
from server.packing.native import NativeModelPacker
from server.packing.reference import ragged_pad_element
from server.spec import ImagePreprocess, ModelSpec, TensorSpec
from server.types import Array, DataType, InferRequest, OutputTensor

FIXED = [dt for dt in DataType if dt is not DataType.BYTES]


def random_tensor(rng: np.random.Generator, datatype: DataType, shape: tuple[int, ...]) -> Array:
    if datatype is DataType.BYTES:
        flat = np.empty(int(np.prod(shape)), dtype=object)
        flat[:] = [bytes(rng.integers(0, 256, rng.integers(0, 6), dtype=np.uint8))
                   for _ in range(flat.size)]
        return flat.reshape(shape)
    dtype = datatype.numpy_dtype
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if datatype is DataType.BOOL:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def wire_view(a: Array) -> Array:
    """What decode produces: a read-only numpy view over a bytes object."""
    if a.dtype == object:
        return a
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def make_spec(inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int = 64,
              pre: ImagePreprocess | None = None) -> ModelSpec:
    return ModelSpec(name="m", platform="onnxruntime_onnx", backend="onnxruntime",
                     max_batch_size=max_batch_size, inputs=tuple(inputs),
                     outputs=tuple(outputs), preprocess=pre)


def make_request(inputs: dict[str, Array]) -> InferRequest:
    return InferRequest(model_name="m", model_version="1", id="r", inputs=inputs,
                        input_types={})


def packers(spec: ModelSpec) -> tuple[ModelPacker, ModelPacker]:
    return NativePacker().for_model(spec, "1"), ReferencePacker().for_model(spec, "1")


def assert_same_batch(native: ModelPacker, reference: ModelPacker, requests: list[InferRequest],
               rows: list[int]) -> None:
    with native.pack(requests, rows) as got, reference.pack(requests, rows) as want:
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
            if value.dtype == object:
                assert got[name].tolist() == value.tolist()
            else:
                assert np.ascontiguousarray(got[name]).tobytes() == value.tobytes(), name


def encoded(per_request: list[dict[str, OutputTensor]]) -> list[dict[str, tuple[Any, ...]]]:
    return [{n: (t.datatype, tuple(t.shape), raw_bytes(t)) for n, t in outs.items()}
            for outs in per_request]


@settings(max_examples=200, deadline=None)
@given(
    in_types=st.lists(st.sampled_from(list(DataType)), min_size=1, max_size=3),
    out_types=st.lists(st.sampled_from(list(DataType)), min_size=1, max_size=3),
    row_shape=st.lists(st.integers(1, 4), max_size=2).map(tuple),
    rows=st.lists(st.integers(1, 4), min_size=1, max_size=9),
    seed=st.integers(0, 2**32 - 1),
)
def test_native_and_reference_agree(
    in_types: list[DataType], out_types: list[DataType], row_shape: tuple[int, ...],
    rows: list[int], seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    inputs = [TensorSpec(f"IN{i}", dt, (-1,) * len(row_shape)) for i, dt in enumerate(in_types)]
    outputs = [TensorSpec(f"OUT{i}", dt, row_shape) for i, dt in enumerate(out_types)]
    spec = make_spec(inputs, outputs)
    native, reference = packers(spec)
    requests = [
        make_request({t.name: wire_view(random_tensor(rng, t.datatype, (r, *row_shape)))
                      for t in inputs})
        for r in rows
    ]
    assert_same_batch(native, reference, requests, rows)
    batch_outputs = {t.name: random_tensor(rng, t.datatype, (sum(rows), *row_shape))
                     for t in outputs}
    batch_outputs["UNDECLARED"] = np.zeros((sum(rows), 1), np.float32)
    got = native.unpack(batch_outputs, requests, rows)
    want = reference.unpack(batch_outputs, requests, rows)
    assert encoded(got) == encoded(want)
    for outs in got:
        assert "UNDECLARED" not in outs
        for t in outs.values():
            assert t.datatype is DataType.BYTES or t.raw is not None  # sliced straight to bytes
            # The lazy array view decodes the raw bytes back to the declared values.
            assert t.data.shape == t.shape


def test_single_request_is_zero_copy_and_optional_inputs_are_skipped() -> None:
    spec = make_spec([TensorSpec("A", DataType.FP32, (2,)),
                      TensorSpec("B", DataType.INT8, (2,), optional=True)],
                     [TensorSpec("Y", DataType.FP32, (2,))])
    native, _ = packers(spec)
    a = wire_view(np.ones((3, 2), np.float32))
    with native.pack([make_request({"A": a})], [3]) as batch:
        assert set(batch) == {"A"} and batch["A"] is a
    two = [make_request({"A": a}), make_request({"A": a})]
    with native.pack(two, [3, 3]) as batch:
        assert set(batch) == {"A"} and batch["A"].shape == (6, 2)


def test_pooled_buffers_are_reused_and_returned_on_errors() -> None:
    spec = make_spec([TensorSpec("A", DataType.FP32, (4,))], [TensorSpec("Y", DataType.FP32, (4,))])
    native = NativePacker().for_model(spec, "1")
    assert isinstance(native, NativeModelPacker)
    requests = [make_request({"A": np.full((2, 4), i, np.float32)}) for i in range(3)]
    with native.pack(requests, [2, 2, 2]) as first:
        address = first["A"].ctypes.data
        assert native.pool.free_buffers("A") == 0
    assert native.pool.free_buffers("A") == 1
    with native.pack(requests[:2], [2, 2]) as second:
        assert second["A"].ctypes.data == address  # the same memory, reused
    bad = [*requests, make_request({"A": np.ones((2, 5), np.float32)})]
    with pytest.raises(ValueError, match="shape"):
        native.pack(bad, [2, 2, 2, 2])
    assert native.pool.free_buffers("A") == 1 and native.pool.allocations == 1


def test_preprocessing_is_fused_into_packing() -> None:
    pre = ImagePreprocess("image", resize_shorter=10, crop=(8, 8), scale=(1 / 255,),
                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), threads=2)
    image = TensorSpec("image", DataType.FP32, (3, 8, 8))
    other = TensorSpec("meta", DataType.INT64, (2,))
    spec = make_spec([image, other], [TensorSpec("Y", DataType.FP32, (1,))], pre=pre)
    native, reference = packers(spec)
    rng = np.random.default_rng(7)
    sizes = [(2, 12, 20), (1, 10, 10), (3, 33, 17)]
    requests = [make_request({
        "image": wire_view(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)),
        "meta": wire_view(rng.integers(0, 9, (n, 2), dtype=np.int64)),
    }) for n, h, w in sizes]
    rows = [n for n, _, _ in sizes]
    assert_same_batch(native, reference, requests, rows)
    assert_same_batch(native, reference, requests[:1], rows[:1])  # one request still preprocesses


def test_unbatched_model_with_preprocessing() -> None:
    pre = ImagePreprocess("image", resize=(6, 6), layout="NHWC")
    image = TensorSpec("image", DataType.FP16, (6, 6, 1))
    spec = make_spec([image], [TensorSpec("Y", DataType.FP32, (1,))], max_batch_size=0, pre=pre)
    native, reference = packers(spec)
    request = make_request({"image": np.arange(20, dtype=np.uint8).reshape(4, 5, 1)})
    assert_same_batch(native, reference, [request], [1])
    scalar = {"Y": np.float32(3.5) * np.ones((), np.float32)}
    assert (encoded(native.unpack(scalar, [request], [1]))
            == encoded(reference.unpack(scalar, [request], [1])))


RAGGED_TYPES = [t for t in DataType if t is not DataType.BYTES]


@settings(max_examples=150, deadline=None)
@given(
    datatype=st.sampled_from(RAGGED_TYPES),
    extents=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3)),
                     min_size=1, max_size=6),
    trailing=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_ragged_inputs_pad_and_scattered_outputs_unpad_like_the_oracle(
    datatype: DataType, extents: list[tuple[int, int, int]], trailing: int, seed: int,
) -> None:
    """Requests of [rows, length, width] with different lengths and widths share a batch
    padded with the configured value; an output scattered like that input comes back cut to
    each request's own extents, a trailing dim kept whole; other outputs split by rows."""
    rng = np.random.default_rng(seed)
    pad = 1.0 if datatype is DataType.BOOL else 7.0
    ragged = TensorSpec("X", datatype, (-1, -1), ragged=True, pad_value=pad)
    fixed = TensorSpec("F", DataType.FP32, (2,))
    outputs = [TensorSpec("Y", DataType.FP32, (-1, -1, trailing), scatter_like="X"),
               TensorSpec("P", DataType.INT64, (1,))]
    spec = make_spec([ragged, fixed], outputs)
    native, reference = packers(spec)
    requests = [make_request({
        "X": wire_view(random_tensor(rng, datatype, (n, length, width))),
        "F": wire_view(random_tensor(rng, DataType.FP32, (n, 2))),
    }) for n, length, width in extents]
    rows = [n for n, _, _ in extents]
    assert_same_batch(native, reference, requests, rows)
    with native.pack(requests, rows) as batch:
        x = batch["X"]
        assert x.shape == (sum(rows), max(e[1] for e in extents), max(e[2] for e in extents))
        start = 0
        for request, (n, length, width) in zip(requests, extents, strict=True):
            mine = x[start:start + n]
            np.testing.assert_array_equal(mine[:, :length, :width], request.inputs["X"])
            padding = np.ones(mine.shape, dtype=bool)
            padding[:, :length, :width] = False
            assert (mine[padding] == ragged_pad_element(ragged)).all()
            start += n
        batch_outputs = {
            "Y": random_tensor(rng, DataType.FP32, (*x.shape, trailing)),
            "P": random_tensor(rng, DataType.INT64, (sum(rows), 1)),
        }
    got = native.unpack(batch_outputs, requests, rows)
    assert encoded(got) == encoded(reference.unpack(batch_outputs, requests, rows))
    start = 0
    for outs, request, n in zip(got, requests, rows, strict=True):
        _, length, width = request.inputs["X"].shape
        want = batch_outputs["Y"][start:start + n, :length, :width]
        assert outs["Y"].shape == want.shape
        np.testing.assert_array_equal(outs["Y"].data, want)
        np.testing.assert_array_equal(outs["P"].data, batch_outputs["P"][start:start + n])
        start += n


def test_packer_selection_reads_the_environment_when_asked() -> None:
    assert native_enabled({}) and native_enabled({"PEREGRINE_NATIVE": "1"})
    for off in ("0", "false", "OFF", " no "):
        assert not native_enabled({"PEREGRINE_NATIVE": off})
    assert isinstance(select_packer({"PEREGRINE_NATIVE": "0"}), ReferencePacker)
    assert isinstance(select_packer({}), NativePacker)
    assert isinstance(default_packer, NativePacker)
