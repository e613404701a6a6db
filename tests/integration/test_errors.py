"""Bad requests get the right gRPC status and a message naming the problem; the server goes on."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.server_harness import ServerThread

MIB = 1024 * 1024
Stub: TypeAlias = service_pb2_grpc.GRPCInferenceServiceStub


@pytest.fixture
def client(standard_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(standard_server.url) as c:
        yield c


@pytest.fixture
def stub(standard_server: ServerThread) -> Iterator[Stub]:
    with grpc.insecure_channel(standard_server.url) as channel:
        yield Stub(channel)


def fp32_input(
    name: str, data: npt.NDArray[Any], datatype: str = "FP32"
) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def good_inputs(batch: int = 1) -> list[grpcclient.InferInput]:
    a = np.ones((batch, 16), dtype=np.float32)
    return [fp32_input("INPUT0", a), fp32_input("INPUT1", a * 2)]


def assert_still_serves(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("add_sub", good_inputs(2))
    assert np.array_equal(result.as_numpy("OUTPUT0"), np.full((2, 16), 3.0, dtype=np.float32))
    assert np.array_equal(result.as_numpy("OUTPUT1"), np.full((2, 16), -1.0, dtype=np.float32))


def infer_error(
    client: grpcclient.InferenceServerClient, model: str, inputs: list[grpcclient.InferInput],
    **kwargs: object,
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs, **kwargs)
    return err.value


def stub_error(stub: Stub, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    return err.value


def raw_request(model: str = "add_sub") -> service_pb2.ModelInferRequest:
    """A valid add_sub request in raw form, for tests to spoil."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(np.ones(16, dtype=np.float32).tobytes())
    return request


# -- through tritonclient ----------------------------------------------------------------------


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "no_such_model", good_inputs())
    assert str(err.status()) == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'no_such_model' is not found"
    assert_still_serves(client)


def test_unknown_version(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", good_inputs(), model_version="5")
    assert str(err.status()) == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'add_sub' version 5 is not found"
    assert_still_serves(client)


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.float64)
    inputs = [fp32_input("INPUT0", a, "FP64"), good_inputs()[1]]
    err = infer_error(client, "add_sub", inputs)
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in err.message() and "FP64" in err.message() and "FP32" in err.message()
    assert_still_serves(client)


def test_wrong_rank(client: grpcclient.InferenceServerClient) -> None:
    flat = np.ones(16, dtype=np.float32)
    err = infer_error(client, "add_sub", [fp32_input("INPUT0", flat), fp32_input("INPUT1", flat)])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "shape [16]" in err.message()
    rank3 = np.ones((1, 16, 1), dtype=np.float32)
    err3 = infer_error(client, "add_sub",
                       [fp32_input("INPUT0", rank3), fp32_input("INPUT1", rank3)])
    assert str(err3.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "[1, 16, 1]" in err3.message()
    assert_still_serves(client)


def test_wrong_shape(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((2, 15), dtype=np.float32)
    err = infer_error(client, "add_sub", [fp32_input("INPUT0", a), fp32_input("INPUT1", a)])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "[2, 15]" in err.message() and "16" in err.message()
    no_batch = infer_error(client, "no_batch", [fp32_input("INPUT0", np.ones((1, 4), np.float32))])
    assert str(no_batch.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "[1, 4]" in no_batch.message() and "[4]" in no_batch.message()
    assert_still_serves(client)


def test_batch_sizes_disagree(client: grpcclient.InferenceServerClient) -> None:
    inputs = [fp32_input("INPUT0", np.ones((2, 16), np.float32)),
              fp32_input("INPUT1", np.ones((3, 16), np.float32))]
    err = infer_error(client, "add_sub", inputs)
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "batch size" in err.message()
    assert_still_serves(client)


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", good_inputs()[:1])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT1" in err.message()
    assert_still_serves(client)


def test_extra_input(client: grpcclient.InferenceServerClient) -> None:
    extra = fp32_input("INPUT2", np.ones((1, 16), np.float32))
    err = infer_error(client, "add_sub", [*good_inputs(), extra])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT2" in err.message()
    assert_still_serves(client)


def test_batch_over_max_batch_size(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", good_inputs(9))
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "max_batch_size" in err.message() and "9" in err.message()
    result = client.infer("add_sub", good_inputs(8))  # the limit itself is fine
    assert result.as_numpy("OUTPUT0").shape == (8, 16)
    assert_still_serves(client)


def test_empty_tensor(client: grpcclient.InferenceServerClient) -> None:
    empty = np.ones((0, 16), dtype=np.float32)
    err = infer_error(client, "add_sub", [fp32_input("INPUT0", empty), fp32_input("INPUT1", empty)])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "empty" in err.message() and "[0, 16]" in err.message()
    assert_still_serves(client)


def test_model_not_ready(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((1, 3), dtype=np.float32)
    err = infer_error(client, "broken", [fp32_input("INPUT0", x)])
    assert str(err.status()) == "StatusCode.UNAVAILABLE"
    assert err.message().startswith("Request for unknown model: 'broken' has no available "
                                    "versions: ")
    assert_still_serves(client)


def test_requested_unknown_output(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", good_inputs(),
                      outputs=[grpcclient.InferRequestedOutput("OUTPUT7")])
    assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "OUTPUT7" in err.message()
    assert_still_serves(client)


def test_sequence_parameters_are_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", good_inputs(), sequence_id=7, sequence_start=True)
    assert str(err.status()) == "StatusCode.UNIMPLEMENTED"
    assert "sequence" in err.message()
    assert_still_serves(client)


# -- through raw stubs ---------------------------------------------------------------------------


def test_raw_length_does_not_match_shape(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = raw_request()
    request.raw_input_contents[1] = np.ones(15, dtype=np.float32).tobytes()
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("input byte size mismatch for input 'INPUT1' for model "
                                    "'add_sub'. Expected 64, got 60 ")
    assert_still_serves(client)


def test_raw_contents_count_does_not_match_inputs(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = raw_request()
    del request.raw_input_contents[1]
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in err.details()
    assert_still_serves(client)


def test_raw_and_typed_contents_together(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = raw_request()
    request.inputs[0].contents.fp32_contents.extend([1.0] * 16)
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "contents" in err.details() and "raw_input_contents" in err.details()
    assert_still_serves(client)


def test_malformed_bytes_length_prefix(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    # First element fine; the second declares 100 bytes but only 3 follow.
    request.raw_input_contents.append(
        struct.pack("<I", 2) + b"ok" + struct.pack("<I", 100) + b"abc"
    )
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "BYTES" in err.details()
    assert "100" in err.details()
    truncated = service_pb2.ModelInferRequest(model_name="identity_bytes")
    truncated.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 1])
    truncated.raw_input_contents.append(b"\x05\x00")  # half a length prefix
    assert stub_error(stub, truncated).code() is grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serves(client)


def test_bytes_element_count_does_not_match_shape(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 3])
    request.raw_input_contents.append(struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b")
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "3" in err.details()
    assert_still_serves(client)


def test_typed_contents_count_mismatch(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(
        [1.0] * 15)
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(
        [1.0] * 16)
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "15" in err.details() and "16" in err.details()
    assert_still_serves(client)


def test_typed_contents_in_the_wrong_field(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2]).contents.fp64_contents.extend(
        [1.0, 2.0])
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents" in err.details()
    fp16 = service_pb2.ModelInferRequest(model_name="identity_fp16")
    fp16.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend(
        [1.0, 2.0])
    err16 = stub_error(stub, fp16)
    assert err16.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in err16.details()
    assert_still_serves(client)


def test_typed_int8_out_of_range(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 2]).contents.int_contents.extend(
        [1, 300])
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INT8" in err.details() and "127" in err.details()
    assert_still_serves(client)


def test_input_without_data(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details()
    assert_still_serves(client)


def test_bool_raw_byte_other_than_0_or_1(
    stub: Stub, client: grpcclient.InferenceServerClient
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_bool")
    request.inputs.add(name="INPUT0", datatype="BOOL", shape=[1, 3])
    request.raw_input_contents.append(b"\x00\x01\x02")
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "BOOL" in err.details()
    assert_still_serves(client)


def test_unknown_datatype_string(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = raw_request()
    request.inputs[0].datatype = "FP8"
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "FP8" in err.details() and "INPUT0" in err.details()
    assert_still_serves(client)


def test_negative_dimension(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = raw_request()
    request.inputs[0].shape[:] = [-1, 16]
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "negative" in err.details()
    assert_still_serves(client)


def test_duplicated_input_name(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = raw_request()
    request.inputs[1].name = "INPUT0"
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "twice" in err.details()
    assert_still_serves(client)


def test_duplicated_requested_output(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = raw_request()
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT0")
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "OUTPUT0" in err.details()
    assert_still_serves(client)


def test_bad_priority_parameter_type(stub: Stub, client: grpcclient.InferenceServerClient) -> None:
    request = raw_request()
    request.parameters["priority"].string_param = "high"
    err = stub_error(stub, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in err.details()
    assert_still_serves(client)


# -- servers of their own ------------------------------------------------------------------------


def test_message_over_the_size_limit(
    tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    model_factory.identity_model(tmp_path, "identity_fp32", "FP32")
    running = start_server(tmp_path, grpc_max_message_bytes=1 * MIB)
    with grpcclient.InferenceServerClient(running.url) as c:
        big = np.ones((1, 2 * MIB // 4), dtype=np.float32)  # 2 MiB of raw content
        err = infer_error(c, "identity_fp32", [fp32_input("INPUT0", big)])
        assert str(err.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "2097" in err.message() or "larger than max" in err.message().lower()
        small = np.arange(1024, dtype=np.float32).reshape(1, 1024)
        out = c.infer("identity_fp32", [fp32_input("INPUT0", small)]).as_numpy("OUTPUT0")
        assert np.array_equal(out, small)
        [stats] = c.get_inference_statistics("identity_fp32").model_stats
        assert stats.inference_stats.success.count == 1


def test_priority_above_priority_levels(
    tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    model_factory.add_sub_model(tmp_path, "add_sub", priority_levels=2)
    running = start_server(tmp_path)
    with grpcclient.InferenceServerClient(running.url) as c:
        err = infer_error(c, "add_sub", good_inputs(), priority=3)
        assert str(err.status()) == "StatusCode.INVALID_ARGUMENT"
        assert "priority 3" in err.message() and "2 priority levels" in err.message()
        for priority in (0, 1, 2):
            result = c.infer("add_sub", good_inputs(), priority=priority)
            assert np.array_equal(result.as_numpy("OUTPUT0"),
                                  np.full((1, 16), 3.0, dtype=np.float32))
        [stats] = c.get_inference_statistics("add_sub").model_stats
        assert stats.inference_stats.success.count == 3
        assert stats.inference_stats.fail.count == 1
