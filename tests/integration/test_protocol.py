"""Health, metadata, config, statistics, repository index, gRPC health and reflection,
through tritonclient (sync and asyncio) and raw stubs, against a real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import server
from tests import model_factory
from tests.server_harness import ServerThread

INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture
def client(standard_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(standard_server.url) as c:
        yield c


@pytest.fixture
def channel(standard_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(standard_server.url) as ch:
        yield ch


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def add_sub_inputs(batch: int = 1) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a = np.arange(batch * 16, dtype=np.float32).reshape(batch, 16)
    b = np.full((batch, 16), 3.0, dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [batch, 16], "FP32"),
              grpcclient.InferInput("INPUT1", [batch, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def write_auto_model(repo: Path, name: str = "auto") -> None:
    """An identity INT32 model whose config leaves inputs, outputs and platform out."""
    model_factory.identity_model(repo, name, "INT32", max_batch_size=4)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nmax_batch_size: 4\n')


# -- liveness and readiness --------------------------------------------------------------------


def test_server_live_and_ready_without_strict_readiness(
    client: grpcclient.InferenceServerClient,
) -> None:
    # standard_server runs with strict_readiness=False and holds the 'broken' model.
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_strict_readiness_is_false_with_a_broken_model(
    tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    write_auto_model(tmp_path)
    model_factory.broken_model(tmp_path, "broken")
    running = start_server(tmp_path)  # strict_readiness defaults to True
    assert running.settings.strict_readiness is True
    with grpcclient.InferenceServerClient(running.url) as c:
        assert c.is_server_live() is True
        assert c.is_server_ready() is False
        assert c.is_model_ready("auto") is True
        assert c.is_model_ready("broken") is False


def test_strict_readiness_is_true_when_every_model_loads(
    tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    write_auto_model(tmp_path)
    running = start_server(tmp_path)
    with grpcclient.InferenceServerClient(running.url) as c:
        assert c.is_server_live() is True
        assert c.is_server_ready() is True
        # The auto-completed config: inputs, outputs, platform and backend come from the model.
        config = c.get_model_config("auto").config
        assert config.name == "auto"
        assert config.max_batch_size == 4
        assert config.platform == "onnxruntime_onnx"
        assert config.backend == "onnxruntime"
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
            ("INPUT0", model_factory_type("TYPE_INT32"), [-1])
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
            ("OUTPUT0", model_factory_type("TYPE_INT32"), [-1])
        ]
        meta = c.get_model_metadata("auto")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("INPUT0", "INT32", [-1, -1])
        ]
        x = np.array([[1, -2, 3]], dtype=np.int32)
        inp = grpcclient.InferInput("INPUT0", [1, 3], "INT32")
        inp.set_data_from_numpy(x)
        out = c.infer("auto", [inp]).as_numpy("OUTPUT0")
        assert out is not None and np.array_equal(out, x)


def model_factory_type(name: str) -> int:
    return int(grpcclient.model_config_pb2.DataType.Value(name))


def test_model_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("add_sub") is True
    assert client.is_model_ready("add_sub", "1") is True
    assert client.is_model_ready("add_sub", "7") is False
    assert client.is_model_ready("broken") is False
    assert client.is_model_ready("no_such_model") is False


# -- metadata ----------------------------------------------------------------------------------


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "peregrine"
    assert meta.version == server.__version__
    extensions = set(meta.extensions)
    assert {"model_configuration", "model_repository", "statistics"} <= extensions
    as_json = client.get_server_metadata(as_json=True)
    assert as_json["name"] == "peregrine"
    assert set(as_json["extensions"]) == extensions


def test_model_metadata_batched(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("add_sub")
    assert meta.name == "add_sub"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]),
        ("OUTPUT1", "FP32", [-1, 16]),
    ]
    versioned = client.get_model_metadata("add_sub", "1")
    assert versioned == meta


@pytest.mark.parametrize(
    ("model", "datatype", "shape"),
    [
        ("identity_bytes", "BYTES", [-1, -1]),
        ("identity_bool", "BOOL", [-1, -1]),
        ("identity_fp16", "FP16", [-1, -1]),
        ("identity_bf16", "BF16", [-1, -1]),
        ("no_batch", "FP32", [4]),
    ],
)
def test_model_metadata_datatypes_and_shapes(
    client: grpcclient.InferenceServerClient, model: str, datatype: str, shape: list[int]
) -> None:
    meta = client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model
    [inp] = meta["inputs"]
    [out] = meta["outputs"]
    assert inp["datatype"] == datatype and out["datatype"] == datatype
    assert [int(d) for d in inp["shape"]] == shape
    assert [int(d) for d in out["shape"]] == shape


def test_model_metadata_unknown_model_and_version(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no_such_model")
    assert status_of(unknown.value) == "StatusCode.NOT_FOUND"
    assert "no_such_model" in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.get_model_metadata("add_sub", "42")
    assert status_of(version.value) == "StatusCode.NOT_FOUND"
    assert "42" in version.value.message()


# -- model config ------------------------------------------------------------------------------


def test_model_config_fields(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub").config
    # From config.pbtxt:
    assert config.name == "add_sub"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [t.name for t in config.input] == ["INPUT0", "INPUT1"]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert all(list(t.dims) == [16] for t in [*config.input, *config.output])
    assert all(t.data_type == model_factory_type("TYPE_FP32") for t in config.input)
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    # Auto-completed by the server:
    assert config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"


def test_model_config_as_json(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("no_batch", as_json=True)["config"]
    assert config["name"] == "no_batch"
    assert int(config.get("max_batch_size", 0)) == 0
    assert "dynamic_batching" not in config
    assert config["input"][0]["name"] == "INPUT0"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [4]
    bytes_config = client.get_model_config("identity_bytes", as_json=True)["config"]
    assert bytes_config["input"][0]["data_type"] == "TYPE_STRING"


def test_model_config_unknown(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("no_such_model")
    assert status_of(unknown.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as version:
        client.get_model_config("add_sub", "9")
    assert status_of(version.value) == "StatusCode.NOT_FOUND"


# -- statistics --------------------------------------------------------------------------------


def test_statistics_grow_after_inference(client: grpcclient.InferenceServerClient) -> None:
    def stats() -> service_pb2.ModelStatistics:
        response = client.get_inference_statistics("add_sub", "1")
        [only] = response.model_stats
        assert (only.name, only.version) == ("add_sub", "1")
        return only

    before = stats()
    for batch in (1, 2, 3):
        inputs, a, b = add_sub_inputs(batch)
        result = client.infer("add_sub", inputs)
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 6
    executions = after.execution_count - before.execution_count
    assert 1 <= executions <= 3
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert after.last_inference > 0
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    sizes = {b.batch_size for b in after.batch_stats}
    assert sizes and all(1 <= s <= 8 for s in sizes)

    as_json = client.get_inference_statistics("add_sub", as_json=True)
    [entry] = as_json["model_stats"]
    assert int(entry["inference_count"]) == after.inference_count


def test_statistics_count_failures(client: grpcclient.InferenceServerClient) -> None:
    def fails() -> int:
        [only] = client.get_inference_statistics("identity_int16").model_stats
        return int(only.inference_stats.fail.count)

    before = fails()
    bad = grpcclient.InferInput("INPUT0", [1, 2], "INT32")  # the model wants INT16
    bad.set_data_from_numpy(np.zeros((1, 2), dtype=np.int32))
    with pytest.raises(InferenceServerException):
        client.infer("identity_int16", [bad])
    assert fails() == before + 1


def test_statistics_of_all_models(client: grpcclient.InferenceServerClient) -> None:
    response = client.get_inference_statistics("")
    names = {(s.name, s.version) for s in response.model_stats}
    expected = {(f"identity_{d.lower()}", "1") for d in model_factory.IDENTITY_DTYPES}
    expected |= {("add_sub", "1"), ("no_batch", "1")}
    assert names == expected  # 'broken' serves no version, so it has no statistics


def test_statistics_unknown(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("no_such_model")
    assert status_of(unknown.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as version:
        client.get_inference_statistics("add_sub", "3")
    assert status_of(version.value) == "StatusCode.NOT_FOUND"


# -- repository index --------------------------------------------------------------------------


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    by_name = {m.name: m for m in index.models}
    assert by_name["add_sub"].state == "READY"
    assert by_name["add_sub"].version == "1"
    assert by_name["identity_bf16"].state == "READY"
    broken = by_name["broken"]
    assert broken.state == "UNAVAILABLE"
    assert "model.onnx" in broken.reason
    assert "protobuf" in broken.reason.lower() or "could not load" in broken.reason


def test_repository_index_ready_filter(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    everything = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest())
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert "broken" in {m.name for m in everything.models}
    assert {m.name for m in ready.models} == {m.name for m in everything.models} - {"broken"}
    assert all(m.state == "READY" for m in ready.models)


# -- gRPC health and reflection ----------------------------------------------------------------


@pytest.mark.parametrize("service", ["", INFERENCE_SERVICE])
def test_grpc_health_check(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_unknown_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def _reflect(
    channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return response


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    response = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    services = {s.name for s in response.list_services_response.service}
    assert {INFERENCE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE} <= services


def test_reflection_file_containing_symbol(channel: grpc.Channel) -> None:
    response = _reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE_SERVICE)
    )
    assert response.WhichOneof("message_response") == "file_descriptor_response"
    files = []
    for blob in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto()
        proto.ParseFromString(blob)
        files.append(proto)
    assert files
    services = {
        f"{f.package}.{s.name}": {m.name for m in s.method} for f in files for s in f.service
    }
    methods = services[INFERENCE_SERVICE]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelStreamInfer"} <= methods
    messages = {m.name for f in files if f.package == "inference" for m in f.message_type}
    assert {"ModelInferRequest", "ModelInferResponse"} <= messages


def test_reflection_unknown_symbol(channel: grpc.Channel) -> None:
    response = _reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")
    )
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# -- unimplemented extensions ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        # system shared memory is implemented: tests/integration/test_shared_memory.py
        pytest.param(lambda c: c.register_cuda_shared_memory("region", b"AAAA", 0, 64),
                     id="cuda_shared_memory_register"),
        pytest.param(lambda c: c.get_cuda_shared_memory_status(), id="cuda_shared_memory_status"),
        pytest.param(lambda c: c.update_log_settings({"log_info": True}), id="log_settings"),
        # TraceSetting is implemented: tests/integration/test_tracing.py
    ],
)
def test_unimplemented_rpcs(
    client: grpcclient.InferenceServerClient,
    call: Callable[[grpcclient.InferenceServerClient], object],
) -> None:
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert status_of(err.value) == "StatusCode.UNIMPLEMENTED"
    assert client.is_server_live() is True


def test_unimplemented_rpc_raw_stub(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.LogSettings(service_pb2.LogSettingsRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


# -- inference basics: id and parameters -------------------------------------------------------


def test_request_id_is_echoed(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = add_sub_inputs(2)
    result = client.infer("add_sub", inputs, request_id="req-42/é")
    response = result.get_response()
    assert response.id == "req-42/é"
    assert response.model_name == "add_sub"
    assert response.model_version == "1"
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    no_id = client.infer("add_sub", inputs).get_response()
    assert no_id.id == ""


def test_custom_request_parameters_are_accepted(
    client: grpcclient.InferenceServerClient,
) -> None:
    inputs, a, b = add_sub_inputs(1)
    result = client.infer(
        "add_sub",
        inputs,
        parameters={"my_tag": "abc", "my_count": 7, "my_flag": True},
        request_id="with-params",
    )
    assert result.get_response().id == "with-params"
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)


# -- tritonclient.grpc.aio ---------------------------------------------------------------------


async def test_aio_health_and_metadata(standard_server: ServerThread) -> None:
    async with aioclient.InferenceServerClient(standard_server.url) as c:
        assert await c.is_server_live() is True
        assert await c.is_server_ready() is True
        assert await c.is_model_ready("add_sub") is True
        assert await c.is_model_ready("broken") is False
        meta = await c.get_model_metadata("identity_int8")
        assert meta.inputs[0].datatype == "INT8"
        assert list(meta.inputs[0].shape) == [-1, -1]
        server_meta = await c.get_server_metadata()
        assert server_meta.name == "peregrine"
        with pytest.raises(InferenceServerException) as err:
            await c.get_model_metadata("no_such_model")
        assert status_of(err.value) == "StatusCode.NOT_FOUND"


async def test_aio_infer(standard_server: ServerThread) -> None:
    async with aioclient.InferenceServerClient(standard_server.url) as c:
        a = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
        b = np.ones((2, 16), dtype=np.float32)
        inputs = [aioclient.InferInput("INPUT0", [2, 16], "FP32"),
                  aioclient.InferInput("INPUT1", [2, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = await c.infer("add_sub", inputs, request_id="aio-1")
        assert result.get_response().id == "aio-1"
        assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
        assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
        stats = await c.get_inference_statistics("add_sub")
        assert stats.model_stats[0].inference_count >= 2
