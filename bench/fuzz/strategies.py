"""Hypothesis strategies of fuzz cases: ModelInferRequest bytes against a server's models.

A case is built from a served model's metadata: a valid request (every input at a drawn
shape, contents of the right size), to which ``mutated`` applies one to three mistakes a
client can make — contents shorter or longer than shape x datatype, wrong ranks and dims
(negative, zero, huge, above max_batch_size), wrong or unknown datatypes, duplicate, missing,
unknown and far too many inputs, raw entries missing or extra, typed contents of the wrong
field or count, parameters of every kind with odd values (priority, timeout,
binary_data_size, sequence and classification keys), shared_memory_* naming the one
registered region (bench/fuzz/region.py) or none, at any offset and size, unknown or
repeated requested outputs, BYTES contents with bad length prefixes, unknown model names and
versions. ``corrupted`` then damages the serialized bytes (bit flips, truncation, insertions,
overwrites, a length far past the end, invalid UTF-8), and ``random`` is bytes from nowhere.
Some cases go on ModelStreamInfer, a few requests per stream.

Tensor contents repeat a short drawn pattern: hypothesis's buffer holds 8 KiB, a CNN row
alone is 12 KiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from bench.fuzz.region import REGION
from bench.fuzz.targets import Target, Tensor, concrete_shape, filler
from server._pb import grpc_service_pb2 as pb
from server.types import DataType

UNARY = "unary"
STREAM = "stream"


@dataclass(frozen=True)
class Case:
    """What one call sends: ``messages`` (one for a unary call), and how they were made:
    ``kind`` valid, mutated, corrupted or random (a stream's: "stream"), ``how`` the mutations
    and damage applied (a stream's: "kind:how" of each request)."""

    rpc: str
    messages: tuple[bytes, ...]
    kind: str
    how: tuple[str, ...] = ()
    #: Send the call with a gRPC deadline (the server then knows it); without one the client
    #: still gives up after its per-call timeout.
    deadline: bool = True


@dataclass
class InputDraft:
    name: str
    datatype: str
    shape: list[int]
    params: dict[str, pb.InferParameter] = field(default_factory=dict)
    contents: pb.InferTensorContents | None = None


@dataclass
class Draft:
    """A request before serialization, for mutations to edit."""

    target: Target
    model_name: str
    model_version: str
    request_id: str
    inputs: list[InputDraft]
    raw: list[bytes]
    params: dict[str, pb.InferParameter] = field(default_factory=dict)
    outputs: list[tuple[str, dict[str, pb.InferParameter]]] = field(default_factory=list)

    def serialize(self) -> bytes:
        request = pb.ModelInferRequest(model_name=self.model_name,
                                       model_version=self.model_version, id=self.request_id)
        for key, value in self.params.items():
            request.parameters[key].CopyFrom(value)
        for draft in self.inputs:
            tensor = request.inputs.add(name=draft.name, datatype=draft.datatype,
                                        shape=draft.shape)
            for key, value in draft.params.items():
                tensor.parameters[key].CopyFrom(value)
            if draft.contents is not None:
                tensor.contents.CopyFrom(draft.contents)
        for name, params in self.outputs:
            output = request.outputs.add(name=name)
            for key, value in params.items():
                output.parameters[key].CopyFrom(value)
        request.raw_input_contents.extend(self.raw)
        return bytes(request.SerializeToString())


# -- values ---------------------------------------------------------------------------------

# Module-level strategies of tuples: hypothesis caches and validates them once.
INT64_EDGES = (0, 1, -1, 2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63))
PATTERNS = st.binary(min_size=1, max_size=8)
TEXT = st.text(max_size=12)
DATATYPES = tuple(dt.wire for dt in DataType)
ANY_DATATYPE = st.sampled_from(
    (*DATATYPES, "", "FP8", "fp32", "STRING", "INT128", "TYPE_FP32", "BYTES\x00", "Ω")) | TEXT
KEYS = ("priority", "timeout", "binary_data_size", "binary_data", "shared_memory_region",
        "shared_memory_byte_size", "shared_memory_offset", "sequence_id", "sequence_start",
        "sequence_end", "classification", "headers", "triton_enable_empty_final_response")
SHM_KEYS = KEYS[4:7]
PARAM_KINDS = st.sampled_from(("bool", "int64", "uint64", "double", "string", "none"))
INT64S = st.sampled_from(INT64_EDGES) | st.integers(-1000, 10**7)
UINT64S = st.sampled_from((0, 1, 2**63, 2**64 - 1)) | st.integers(0, 10**7)
STRINGS = st.sampled_from(("", "region0", "-1", "1e9", "true")) | TEXT


@st.composite
def parameter(draw: st.DrawFn) -> pb.InferParameter:
    """An InferParameter of any kind (or of none), its value ordinary or extreme."""
    kind = draw(PARAM_KINDS)
    if kind == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return pb.InferParameter(int64_param=draw(INT64S))
    if kind == "uint64":
        return pb.InferParameter(uint64_param=draw(UINT64S))
    if kind == "double":
        return pb.InferParameter(double_param=draw(st.floats()))
    if kind == "string":
        return pb.InferParameter(string_param=draw(STRINGS))
    return pb.InferParameter()


@st.composite
def parameters(draw: st.DrawFn, keys: tuple[str, ...] = KEYS) -> dict[str, pb.InferParameter]:
    names = draw(st.lists(st.sampled_from(keys) | TEXT, min_size=1, max_size=4))
    return {name: draw(parameter()) for name in names}


SHM_SIZES = st.sampled_from((0, 4, 16, 64, 255, 256, 257)) | INT64S


@st.composite
def shm_parameters(draw: st.DrawFn) -> dict[str, pb.InferParameter]:
    """A tensor's shared_memory_* parameters, mostly naming the registered region (or one
    nobody registered) with offsets and sizes inside, across and far past its end; each
    sometimes missing or of another kind."""
    params = {}
    which = draw(st.integers(0, 9))
    if which < 7:
        params[SHM_KEYS[0]] = pb.InferParameter(string_param=REGION)
    elif which < 9:
        params[SHM_KEYS[0]] = pb.InferParameter(string_param=draw(TEXT))
    else:
        params[SHM_KEYS[0]] = draw(parameter())
    for key in SHM_KEYS[1:]:
        if draw(st.integers(0, 4)) > 0:
            params[key] = pb.InferParameter(int64_param=draw(SHM_SIZES))
        elif draw(st.booleans()):
            params[key] = draw(parameter())
    return params


# -- a valid request ------------------------------------------------------------------------

@st.composite
def drawn_shape(draw: st.DrawFn, tensor: Tensor, rows: int) -> list[int]:
    """A shape the model accepts: ``rows`` in a batching model's first dim, other -1 dims
    small."""
    shape = concrete_shape(tensor)
    for k, dim in enumerate(tensor.shape):
        if dim == -1:
            shape[k] = rows if k == 0 else draw(st.sampled_from((shape[k], 1, 2, 3)))
    return shape


@st.composite
def valid_draft(draw: st.DrawFn, targets: Sequence[Target]) -> Draft:
    target = draw(st.sampled_from(targets))
    rows = draw(st.integers(1, min(4, max(1, target.max_batch_size))))
    inputs, raw = [], []
    for tensor in target.inputs:
        shape = draw(drawn_shape(tensor, rows))
        inputs.append(InputDraft(tensor.name, tensor.datatype, shape))
        raw.append(filler(tensor.datatype, math.prod(shape), draw(PATTERNS)))
    version = draw(st.sampled_from(("", *target.versions)))
    return Draft(target, target.name, version, draw(st.sampled_from(("", "r1")) | TEXT),
                 inputs, raw)


# -- mutations: each edits a draft in place --------------------------------------------------

Mutation = Callable[[st.DrawFn, Draft], None]


def _pick(draw: st.DrawFn, items: Sequence[object]) -> int:
    return draw(st.integers(0, len(items) - 1))


def raw_size(draw: st.DrawFn, d: Draft) -> None:
    """A raw entry shorter, longer or of another length than shape x datatype needs."""
    if not d.raw:
        d.raw.append(draw(st.binary(max_size=16)))
        return
    i = _pick(draw, d.raw)
    how = draw(st.sampled_from(("short", "long", "any")))
    if how == "short":
        d.raw[i] = d.raw[i][:draw(st.integers(0, max(0, len(d.raw[i]) - 1)))]
    elif how == "long":
        d.raw[i] += draw(st.binary(min_size=1, max_size=9))
    else:
        d.raw[i] = draw(st.binary(max_size=64))


def raw_count(draw: st.DrawFn, d: Draft) -> None:
    """A raw entry missing, or one too many."""
    if len(d.raw) > 0 and draw(st.booleans()):
        del d.raw[_pick(draw, d.raw)]
    else:
        d.raw.insert(draw(st.integers(0, len(d.raw))), draw(st.binary(max_size=16)))


def rank(draw: st.DrawFn, d: Draft) -> None:
    """A dimension more or fewer (contents unchanged)."""
    if not d.inputs:
        return
    shape = d.inputs[_pick(draw, d.inputs)].shape
    if len(shape) > 0 and draw(st.booleans()):
        del shape[draw(st.integers(0, len(shape) - 1))]
    else:
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))


def dim_value(draw: st.DrawFn, d: Draft) -> None:
    """A dimension negative, zero, huge or above max_batch_size (contents unchanged)."""
    if not d.inputs:
        return
    shape = d.inputs[_pick(draw, d.inputs)].shape
    if not shape:
        return
    choices = (*INT64_EDGES, -2, d.target.max_batch_size + 1, 2**40)
    shape[draw(st.integers(0, len(shape) - 1))] = draw(
        st.sampled_from(choices) | st.integers(-5, 100))


def datatype(draw: st.DrawFn, d: Draft) -> None:
    """Another datatype, known or not (contents unchanged)."""
    if d.inputs:
        d.inputs[_pick(draw, d.inputs)].datatype = draw(ANY_DATATYPE)


def duplicate_input(draw: st.DrawFn, d: Draft) -> None:
    if d.inputs:
        i = _pick(draw, d.inputs)
        original = d.inputs[i]
        d.inputs.append(InputDraft(original.name, original.datatype, list(original.shape)))
        if i < len(d.raw):
            d.raw.append(d.raw[i])


def drop_input(draw: st.DrawFn, d: Draft) -> None:
    if d.inputs:
        i = _pick(draw, d.inputs)
        del d.inputs[i]
        if i < len(d.raw) and draw(st.booleans()):
            del d.raw[i]


def unknown_input(draw: st.DrawFn, d: Draft) -> None:
    name = draw(st.sampled_from(("", "INPUT9", "image ")) | TEXT)
    dt = draw(st.sampled_from(DATATYPES))
    d.inputs.append(InputDraft(name, dt, [1, 1]))
    d.raw.append(filler(dt, 1, b"\x01"))


def many_inputs(draw: st.DrawFn, d: Draft) -> None:
    """Tens to hundreds of inputs, each with its raw entry."""
    for k in range(draw(st.integers(20, 300))):
        d.inputs.append(InputDraft(f"x{k}", "FP32", [1, 1]))
        d.raw.append(b"\0\0\0\0")


def typed_contents(draw: st.DrawFn, d: Draft) -> None:
    """An input's data in a typed contents field — maybe the wrong field, maybe the wrong
    count — with the raw entries kept (a mix the protocol forbids) or dropped."""
    if not d.inputs:
        return
    draft = d.inputs[_pick(draw, d.inputs)]
    count = max(0, min(math.prod(draft.shape) if draft.shape else 1, 64))
    count = draw(st.sampled_from((count, 0, count + 1)))
    contents = pb.InferTensorContents()
    which = draw(st.sampled_from(("bool", "int", "int64", "uint", "uint64", "fp32", "fp64",
                                  "bytes")))
    if which == "bool":
        contents.bool_contents.extend([True] * count)
    elif which in ("int", "int64"):
        value = draw(st.sampled_from((1, 2**31 - 1, -(2**31))))
        getattr(contents, f"{which}_contents").extend([value] * count)
    elif which in ("uint", "uint64"):
        getattr(contents, f"{which}_contents").extend([draw(st.integers(0, 2**32 - 1))] * count)
    elif which in ("fp32", "fp64"):
        getattr(contents, f"{which}_contents").extend([draw(st.floats(width=32))] * count)
    else:
        contents.bytes_contents.extend([draw(st.binary(max_size=6))] * count)
    draft.contents = contents
    if draw(st.booleans()):
        d.raw.clear()


def request_parameters(draw: st.DrawFn, d: Draft) -> None:
    d.params.update(draw(parameters()))


def input_parameters(draw: st.DrawFn, d: Draft) -> None:
    """Parameters of every kind on an input."""
    if d.inputs:
        d.inputs[_pick(draw, d.inputs)].params.update(draw(parameters()))


def shared_memory_input(draw: st.DrawFn, d: Draft) -> None:
    """An input read from shared memory (see shm_parameters), its byte size often the one
    its shape needs, its raw entry mostly dropped as a client does."""
    if not d.inputs:
        return
    i = _pick(draw, d.inputs)
    params = draw(shm_parameters())
    if i < len(d.raw) and draw(st.booleans()):
        params[SHM_KEYS[1]] = pb.InferParameter(int64_param=len(d.raw[i]))
    d.inputs[i].params.update(params)
    if i < len(d.raw) and draw(st.integers(0, 3)) > 0:
        del d.raw[i]


def requested_outputs(draw: st.DrawFn, d: Draft) -> None:
    """Requested outputs: real, unknown or repeated names, with odd parameters."""
    names = (*(t.name for t in d.target.outputs), "", "nope")
    for _ in range(draw(st.integers(1, 3))):
        params = draw(st.just({}) | shm_parameters()
                      | parameters(("classification", "binary_data", *SHM_KEYS)))
        d.outputs.append((draw(st.sampled_from(names) | TEXT), params))


def bytes_prefix(draw: st.DrawFn, d: Draft) -> None:
    """A BYTES input's raw content with a bad length prefix: longer than what follows, cut
    inside the prefix, a trailing byte, or one element short."""
    found = [i for i, t in enumerate(d.inputs) if t.datatype == "BYTES" and i < len(d.raw)]
    if found:
        i = draw(st.sampled_from(found))
    else:
        d.inputs.append(InputDraft("text", "BYTES", [1, 1]))
        d.raw.append(b"")
        i = len(d.raw) - 1
    how = draw(st.sampled_from(("long", "cut", "trailing", "short", "huge")))
    raw = d.raw[i]
    if how == "long":
        d.raw[i] = (len(raw) + 1).to_bytes(4, "little") + raw
    elif how == "cut":
        d.raw[i] = raw + b"\x05\x00"
    elif how == "trailing":
        d.raw[i] = raw + b"\x00"
    elif how == "short":
        d.raw[i] = raw[:max(0, len(raw) - 5)]
    else:
        d.raw[i] = b"\xff\xff\xff\xff" + raw


def model_name(draw: st.DrawFn, d: Draft) -> None:
    d.model_name = draw(st.sampled_from(("", "nope", "../cnn", "cnn\x00", "a" * 300, "Ω"))
                        | TEXT)


def model_version(draw: st.DrawFn, d: Draft) -> None:
    d.model_version = draw(st.sampled_from(("0", "-1", "99", "1.0", "01", " 1",
                                            "99999999999999999999", "latest")) | TEXT)


def request_id(draw: st.DrawFn, d: Draft) -> None:
    d.request_id = draw(st.sampled_from(("\n\x1b[31m", "x" * 5000, "\x00")) | TEXT)


MUTATIONS: dict[str, Mutation] = {
    m.__name__: m for m in (
        raw_size, raw_count, rank, dim_value, datatype, duplicate_input, drop_input,
        unknown_input, many_inputs, typed_contents, request_parameters, input_parameters,
        shared_memory_input, requested_outputs, bytes_prefix, model_name, model_version, request_id)
}
MUTATION_NAMES = st.lists(st.sampled_from(tuple(sorted(MUTATIONS))), min_size=1, max_size=3)


# -- byte-level corruption -------------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def corrupt(draw: st.DrawFn, data: bytes) -> tuple[str, bytes]:
    """``data`` damaged one way: (how, the bytes)."""
    how = draw(st.sampled_from(("flip", "truncate", "insert", "overwrite", "huge_length",
                                "bad_utf8", "repeat")))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "flip" and data:
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                              min_size=1, max_size=4))
        damaged = bytearray(data)
        for index, bit in flips:
            damaged[index] ^= 1 << bit
        return how, bytes(damaged)
    if how == "truncate":
        return how, data[:at]
    if how == "insert":
        return how, data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if how == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=8))
        return how, data[:at] + chunk + data[at + len(chunk):]
    if how == "huge_length":
        # A length-delimited field (any of the request's) claiming far more than follows.
        number = draw(st.sampled_from((1, 2, 3, 4, 5, 6, 7, 99)))
        length = draw(st.sampled_from((2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1, 10**6)))
        return how, data[:at] + _varint(number << 3 | 2) + _varint(length) + b"\0\0"
    if how == "bad_utf8":
        return how, b"\x0a\x02\xff\xfe" + data  # model_name, then the rest overrides it
    return how, data + data[at:]


# -- cases ----------------------------------------------------------------------------------

@st.composite
def request_bytes(draw: st.DrawFn, targets: Sequence[Target]) -> tuple[str, tuple[str, ...],
                                                                        bytes]:
    """(kind, how, bytes) of one request."""
    kind = draw(st.sampled_from(("valid", "mutated", "mutated", "mutated", "corrupted",
                                 "corrupted", "random")))
    if kind == "random":
        return kind, (), draw(st.binary(max_size=256))
    draft = draw(valid_draft(targets))
    how: list[str] = []
    if kind != "valid":
        names = draw(MUTATION_NAMES)
        if kind == "corrupted" and draw(st.booleans()):
            names = []  # corrupt a valid request
        for name in names:
            MUTATIONS[name](draw, draft)
        how.extend(names)
    data = draft.serialize()
    if kind == "corrupted":
        damage, data = draw(corrupt(data))
        how.append(damage)
    return kind, tuple(how), data


@st.composite
def cases(draw: st.DrawFn, targets: Sequence[Target]) -> Case:
    """One call: mostly unary, sometimes a stream of one to four requests."""
    if not targets:
        raise ValueError("the server serves no ready model to fuzz")
    if draw(st.integers(0, 4)) == 0:
        requests = draw(st.lists(request_bytes(targets), min_size=1, max_size=4))
        return Case(STREAM, tuple(data for _, _, data in requests), STREAM,
                    tuple(f"{kind}:{h}" for kind, how, _ in requests for h in how or ("",)))
    kind, how, data = draw(request_bytes(targets))
    return Case(UNARY, (data,), kind, how, deadline=draw(st.integers(0, 3)) > 0)
