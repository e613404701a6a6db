"""The rest of Triton's client surface (issue 21 item 3), through tritonclient: the
classification extension (unary and stream, batched and not, with the response cache on and
off), CUDA shared memory answering as Triton's does with nothing registered, TraceSetting
and LogSettings. One server for the module."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.server_harness import ServerThread

LABELS = [b"cat", b"dog", b"", b"owl"]  # fewer lines than classes; one empty


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """``cached``: FP32 identity with a label file and the response cache; ``plain``: the
    same without either; ``no_batch``: OUTPUT0 = 2 * INPUT0, FP32 [4]."""
    repo = tmp_path_factory.mktemp("surface")
    cached = model_factory.identity_model(repo, "cached", "FP32", response_cache=True)
    config = cached / "config.pbtxt"
    config.write_text(config.read_text().replace(
        'name: "OUTPUT0"\n', 'name: "OUTPUT0"\n    label_filename: "labels.txt"\n'))
    (cached / "labels.txt").write_bytes(b"\n".join(LABELS) + b"\n")
    model_factory.identity_model(repo, "plain", "FP32")
    model_factory.no_batch_model(repo, "no_batch")
    with ServerThread(repo, cache_config="local,size=1048576") as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def oracle(values: npt.NDArray[Any], k: int, labels: list[bytes]) -> list[list[bytes]]:
    """Each row's top ``k``: largest first, "%f:index[:label]"."""
    answer = []
    for row in values.reshape(values.shape[0], -1):
        ranked = sorted(range(row.size), key=lambda i: (-float(row[i]), i))[:k]
        answer.append([f"{float(row[i]):f}:{i}".encode()
                       + (b":" + labels[i] if i < len(labels) and labels[i] else b"")
                       for i in ranked])
    return answer


def classify_request(data: npt.NDArray[Any], k: int
                     ) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor], [grpcclient.InferRequestedOutput("OUTPUT0", class_count=k)]


def cache_hits(client: grpcclient.InferenceServerClient, model: str) -> int:
    stats = client.get_inference_statistics(model, "1").model_stats[0]
    return int(stats.inference_stats.cache_hit.count)


# -- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["cached", "plain"])
def test_classification_unary_and_stream_answer_triton_strings(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    data = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    data[2, 4] = data[2, 1]  # a tie: the lower index first
    labels = LABELS if model == "cached" else []
    inputs, outputs = classify_request(data, 3)
    result = client.infer(model, inputs, outputs=outputs)
    assert result.get_output("OUTPUT0").datatype == "BYTES"
    assert result.as_numpy("OUTPUT0").tolist() == oracle(data, 3, labels)

    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(lambda result, error: answers.put(error or result))
    try:
        for k in (1, 9):  # more than a row holds: every element, ranked
            tensors, requested = classify_request(data, k)
            client.async_stream_infer(model, tensors, outputs=requested, request_id=str(k))
            streamed = answers.get(timeout=10)
            assert not isinstance(streamed, InferenceServerException), streamed
            assert streamed.as_numpy("OUTPUT0").tolist() == oracle(data, k, labels)
    finally:
        client.stop_stream()

    # The class count is part of the cache key: the same inputs without it are numbers.
    hits = cache_hits(client, model)
    again = client.infer(model, inputs, outputs=outputs)
    assert again.as_numpy("OUTPUT0").tolist() == oracle(data, 3, labels)
    plain = client.infer(model, inputs)
    assert np.array_equal(plain.as_numpy("OUTPUT0"), data)
    assert cache_hits(client, model) == hits + (model == "cached")


def test_classification_of_a_model_that_does_not_batch(
    client: grpcclient.InferenceServerClient,
) -> None:
    data = np.array([0.5, -1.0, 3.0, 0.25], dtype=np.float32)
    inputs, outputs = classify_request(data, 2)
    result = client.infer("no_batch", inputs, outputs=outputs)
    assert result.get_output("OUTPUT0").shape == [2]
    assert result.as_numpy("OUTPUT0").tolist() == [b"6.000000:2", b"1.000000:0"]


def test_a_bad_class_count_is_invalid_argument(server: ServerThread) -> None:
    request = service_pb2.ModelInferRequest(model_name="plain")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.ones(2, dtype=np.float32).tobytes())
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["classification"].string_param = "3"
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("invalid value type for 'classification' parameter for "
                                   "tensor 'OUTPUT0', expected int64_param.")


# -- CUDA shared memory, TraceSetting, LogSettings -------------------------------------------


def test_cuda_shared_memory_answers_as_with_nothing_registered(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert not client.get_cuda_shared_memory_status().regions
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("never-registered")
    with pytest.raises(InferenceServerException) as missing:
        client.get_cuda_shared_memory_status("ghost")
    assert str(missing.value.status()) == "StatusCode.NOT_FOUND"
    assert "Unable to find cuda shared memory region: 'ghost'" in missing.value.message()
    with pytest.raises(InferenceServerException) as register:
        client.register_cuda_shared_memory("region", b"AAAA", 0, 64)
    assert str(register.value.status()) == "StatusCode.UNIMPLEMENTED"
    assert "system shared memory" in register.value.message()


def test_trace_setting_reports_tracing_off_and_refuses_to_turn_it_on(
    client: grpcclient.InferenceServerClient,
) -> None:
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"] == {"value": ["OFF"]}
    assert client.update_trace_settings(settings={"trace_level": ["OFF"]},
                                        as_json=True)["settings"] == settings
    for change in ({"trace_level": ["TIMESTAMPS"]}, {"trace_rate": "1"}):
        with pytest.raises(InferenceServerException) as err:
            client.update_trace_settings(model_name="plain", settings=change)
        assert str(err.value.status()) == "StatusCode.FAILED_PRECONDITION"
        assert "--trace-config" in err.value.message()


def probed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "server.test_probe"]


def test_log_settings_report_and_change_the_logging(
    client: grpcclient.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    start = client.get_log_settings(as_json=True)["settings"]
    assert start == {"log_file": {"string_param": ""}, "log_info": {"bool_param": True},
                     "log_warning": {"bool_param": True}, "log_error": {"bool_param": True},
                     "log_verbose_level": {"uint32_param": 0},
                     "log_format": {"string_param": "text"}}
    probe = logging.getLogger("server.test_probe")
    try:
        now = client.update_log_settings({"log_verbose_level": 1, "log_info": False},
                                         as_json=True)["settings"]
        assert now["log_verbose_level"] == {"uint32_param": 1}
        assert now["log_info"] == {"bool_param": False}
        assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
        caplog.clear()
        probe.debug("verbose on")
        probe.info("info off")
        probe.warning("warning on")
        assert probed(caplog) == ["verbose on", "warning on"]
        for bad in ({"log_file": "/tmp/peregrine.log"}, {"log_format": "ISO8601"}):
            with pytest.raises(InferenceServerException) as err:
                client.update_log_settings(bad)
            assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT"
            assert next(iter(bad)) in err.value.message()
        assert client.get_log_settings(as_json=True)["settings"] == now  # nothing applied
    finally:
        client.update_log_settings({"log_verbose_level": 0, "log_info": True})
    assert client.get_log_settings(as_json=True)["settings"] == start
    caplog.clear()
    probe.info("info on")
    probe.debug("verbose off")
    assert probed(caplog) == ["info on"]


def test_server_metadata_lists_the_extensions(client: grpcclient.InferenceServerClient) -> None:
    assert {"classification", "logging"} <= set(client.get_server_metadata().extensions)

