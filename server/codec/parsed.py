"""The neutral parsed form of a ModelInferRequest: the one input of ``codec.decode``.

Two producers fill it: the native parser (``server._native.parse_infer_request``, straight
from the wire bytes, no protobuf object) and :func:`from_message` (a message the protobuf
runtime parsed: the pure-Python path, PEREGRINE_NATIVE=0). Decoding runs the same code on
either, so the two paths give bit-identical requests and errors by construction.

Plain tuples, not classes: the native parser builds them at the cost of a tuple each. Their
types are in server.types, where the data plane and the cache's interface see them too.
"""

from __future__ import annotations

from collections.abc import Mapping

from server._pb import grpc_service_pb2 as pb
from server.types import (
    Parameter,
    Parameters,
    ParsedInput,
    ParsedOutput,
    ParsedRequest,
    TypedContents,
)

__all__ = ["Parameter", "Parameters", "ParsedInput", "ParsedOutput", "ParsedRequest",
           "TypedContents", "from_message", "from_parameters"]

#: InferParameter's oneof members by field number; NONE when the parameter has no value.
NONE, BOOL, INT64, STRING, DOUBLE, UINT64 = range(6)
_MEMBERS = {"bool_param": BOOL, "int64_param": INT64, "string_param": STRING,
            "double_param": DOUBLE, "uint64_param": UINT64}



def from_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Parameter]:
    """A protobuf ``map<string, InferParameter>`` in the neutral form."""
    out: dict[str, Parameter] = {}
    for key, param in params.items():
        member = param.WhichOneof("parameter_choice")
        out[key] = (NONE, None) if member is None else (_MEMBERS[member], getattr(param, member))
    return out


def from_message(message: pb.ModelInferRequest) -> ParsedRequest:
    """What the native parser returns for the bytes ``message`` was parsed from."""
    return (
        message.model_name,
        message.model_version,
        message.id,
        from_parameters(message.parameters),
        [
            (t.name, t.datatype, tuple(t.shape), from_parameters(t.parameters),
             t.contents if t.HasField("contents") else None)
            for t in message.inputs
        ],
        [(o.name, from_parameters(o.parameters)) for o in message.outputs],
        message.raw_input_contents,
    )
