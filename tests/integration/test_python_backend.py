"""The Python backend end to end (issue 16): Triton-style model.py models, each instance in a
model process of its own, through a real server and tritonclient.

One server for the module serves ``counting`` (a batching model whose first input value picks
a misbehaviour: crash, hang, a TritonError, an exception, a BLS call), ``datatypes`` (echoes
every datatype), ``completed`` (inputs and outputs from its auto_complete_config), and models
that must fail to load, each with its reason: decoupled, a custom execution environment, an
initialize that raises.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests import python_models
from tests.integration.test_cli import Served, environment, free_port
from tests.integration.test_lifecycle import index, wait_until
from tests.server_harness import ServerThread

WIDTH = python_models.WIDTH
PROCESS_LOG = "server.backends.python.process"


#: /dev/shm files other tests of this project make as clients (named with their pid): test
#: runs beside this one may add or leave them while it runs.
CLIENT_REGION = re.compile(r"(peregrine-(test|codec|unit)|sigbus)-\d+")


def shm_entries() -> set[str]:
    """What the server could leave in /dev/shm: its files there (whatever their names, but
    the client regions of other tests), and the ones this process (the server's) maps."""
    named = {n for n in os.listdir("/dev/shm") if not CLIENT_REGION.match(n)} \
        if os.path.isdir("/dev/shm") else set()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return named | {line.split(None, 5)[-1].strip() for line in maps if "/dev/shm/" in line}


def mapped_model_memory() -> int:
    """The model processes' shared memories this (the server's) process has mapped."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sum(1 for line in maps if "memfd:peregrine-model " in line)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("python_models")
    python_models.counting_model(repo, "counting")
    python_models.datatypes_model(repo, "datatypes", shm_bytes=8192)
    python_models.python_model(repo, "completed", "max_batch_size: 0\n", """\
        import triton_python_backend_utils as pb_utils


        class TritonPythonModel:
            @staticmethod
            def auto_complete_config(config):
                config.add_input({"name": "X", "data_type": "TYPE_INT32", "dims": [2]})
                config.add_output({"name": "Y", "data_type": "TYPE_INT32", "dims": [2]})
                return config

            def execute(self, requests):
                return [pb_utils.InferenceResponse([pb_utils.Tensor(
                    "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + 1)])
                    for r in requests]
        """)
    python_models.python_model(repo, "chunked", """\
        max_batch_size: 8
        input [ { name: "X" data_type: TYPE_UINT8 dims: [ -1 ] } ]
        output [ { name: "REQUESTS" data_type: TYPE_INT64 dims: [ 1 ] } ]
        dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 200000 }
        parameters { key: "queue_delay" value { string_value: "fixed" } }
        parameters { key: "python_shm_bytes" value { string_value: "8192" } }
        """, """\
        import numpy as np
        import triton_python_backend_utils as pb_utils


        class TritonPythonModel:
            def execute(self, requests):
                return [pb_utils.InferenceResponse([pb_utils.Tensor(
                    "REQUESTS", np.full((1, 1), len(requests), np.int64))]) for _ in requests]
        """)
    tensors = ('max_batch_size: 0\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
               'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    never_runs = "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    python_models.python_model(repo, "decoupled",
                               tensors + "model_transaction_policy { decoupled: true }\n",
                               never_runs)
    python_models.python_model(
        repo, "own_env",
        tensors + 'parameters { key: "EXECUTION_ENV_PATH" value { string_value: "env.tgz" } }\n',
        never_runs)
    python_models.python_model(repo, "failing_init", tensors, """\
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("the weights file is corrupt")

            def execute(self, requests):
                return []
        """)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, strict_readiness=False) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def counting_data(first: float, rows: int = 1) -> np.ndarray:
    data = np.arange(rows * WIDTH, dtype=np.float32).reshape(rows, WIDTH) + 1
    data[0, 0] = first
    return data


def counting_inputs(first: float, rows: int = 1) -> list[grpcclient.InferInput]:
    data = counting_data(first, rows)
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def pid_of(client: grpcclient.InferenceServerClient) -> int:
    return int(client.infer("counting", counting_inputs(1.0)).as_numpy("PID")[0, 0])


async def test_a_batch_of_concurrent_requests_reaches_execute_as_several_requests(
    server: ServerThread,
) -> None:
    async with aioclient.InferenceServerClient(server.url) as aio:
        rows = [1, 2, 3, 1]
        inputs = [counting_inputs(float(10 * i + 1), n) for i, n in enumerate(rows)]
        results = await asyncio.gather(*(aio.infer("counting", i) for i in inputs))
    for i, (result, n) in enumerate(zip(results, rows, strict=True)):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                      counting_data(float(10 * i + 1), n) * 2)
    seen = [int(r.as_numpy("REQUESTS")[0, 0]) for r in results]
    # The fixed 200 ms queue delay holds the batch for its 4 requests: one execute call.
    assert max(seen) > 1, seen


def test_every_datatype_round_trips(client: grpcclient.InferenceServerClient) -> None:
    inputs, sent = [], {}
    for wire, numpy_type in python_models.DATATYPES.items():
        if wire == "BYTES":
            value = np.array([b"", b"a\x00b", "h\u00e9llo".encode()], dtype=object)
        elif wire == "BOOL":
            value = np.array([True, False, True])
        elif wire == "BF16":  # tritonclient takes and gives BF16 as float32
            value = np.array([0, 1, 127], dtype=np.float32)
        else:
            value = np.array([0, 1, 127], dtype=numpy_type)
        tensor = grpcclient.InferInput(f"IN_{wire}", [3], wire)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
        sent[wire] = value
    result = client.infer("datatypes", inputs)
    for wire, value in sent.items():
        got = result.as_numpy(f"OUT_{wire}")
        assert got.dtype == value.dtype, wire
        np.testing.assert_array_equal(got, value, err_msg=wire)
    # Only the outputs asked for come back.
    [one] = [t for t in inputs if t.name() == "IN_INT8"]
    only = client.infer("datatypes", [one], outputs=[grpcclient.InferRequestedOutput("OUT_INT8")])
    assert [o.name for o in only.get_response().outputs] == ["OUT_INT8"]


def test_a_request_larger_than_the_shared_memory_is_refused_naming_the_bound(
    client: grpcclient.InferenceServerClient,
) -> None:
    def uint8(name: str, count: int) -> grpcclient.InferInput:
        tensor = grpcclient.InferInput(name, [count], "UINT8")
        tensor.set_data_from_numpy(np.full(count, 7, np.uint8))
        return tensor

    flags = grpcclient.InferInput("IN_BOOL", [6000], "BOOL")
    flags.set_data_from_numpy(np.ones(6000, np.bool_))

    alone = client.infer("datatypes", [uint8("IN_UINT8", 6000)])
    assert alone.as_numpy("OUT_UINT8").sum() == 42000
    with pytest.raises(InferenceServerException) as caught:
        client.infer("datatypes", [uint8("IN_UINT8", 6000), flags])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED", caught.value.message()
    assert "python_shm_bytes" in caught.value.message()


async def test_a_batch_larger_than_the_shared_memory_goes_in_several_calls(
    server: ServerThread,
) -> None:
    """3000 bytes per request, an 8 KiB inputs region: at most two requests per call."""
    def request() -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("X", [1, 3000], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 3000), np.uint8))
        return [tensor]

    async with aioclient.InferenceServerClient(server.url) as aio:
        results = await asyncio.gather(*(aio.infer("chunked", request()) for _ in range(4)))
    seen = [int(r.as_numpy("REQUESTS")[0, 0]) for r in results]
    assert max(seen) <= 2, seen


def test_auto_complete_config_gives_the_tensors(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("completed").config
    assert [(t.name, list(t.dims)) for t in config.input] == [("X", [2])]
    x = grpcclient.InferInput("X", [2], "INT32")
    x.set_data_from_numpy(np.array([1, 2], np.int32))
    np.testing.assert_array_equal(client.infer("completed", [x]).as_numpy("Y"), [2, 3])


async def test_a_triton_error_fails_its_own_request_with_the_models_text(
    server: ServerThread,
) -> None:
    async with aioclient.InferenceServerClient(server.url) as aio:
        refused, fine = await asyncio.gather(
            aio.infer("counting", counting_inputs(python_models.REFUSE)),
            aio.infer("counting", counting_inputs(5.0)), return_exceptions=True)
    assert isinstance(refused, InferenceServerException)
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.message() == "value -3 refused"
    assert not isinstance(fine, BaseException)
    assert fine.as_numpy("OUTPUT0")[0, 0] == 10.0


def test_an_exception_from_execute_fails_the_batch_with_its_message(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("counting", counting_inputs(python_models.RAISE))
    assert caught.value.status() == "StatusCode.INTERNAL"
    assert caught.value.message() == "ValueError: execute blew up"


def test_a_bls_call_fails_with_what_is_not_supported(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("counting", counting_inputs(python_models.CALL_OTHER))
    assert "business logic scripting" in caught.value.message()
    assert "not supported by Peregrine's Python backend" in caught.value.message()


def test_unsupported_models_fail_to_load_with_the_reason(
    client: grpcclient.InferenceServerClient,
) -> None:
    states = index(client)
    state, reason = states[("decoupled", "")]
    assert state == "UNAVAILABLE" and "decoupled models" in reason, reason
    state, reason = states[("own_env", "")]
    assert state == "UNAVAILABLE" and "EXECUTION_ENV_PATH" in reason, reason
    state, reason = states[("failing_init", "1")]
    assert state == "UNAVAILABLE", reason
    assert "initialize failed: RuntimeError: the weights file is corrupt" in reason, reason


def test_the_models_output_goes_to_the_server_log_with_its_name(
    client: grpcclient.InferenceServerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=PROCESS_LOG)
    client.infer("counting", counting_inputs(python_models.SAY))
    wait_until(lambda: any(r.name == PROCESS_LOG and
                           r.getMessage() == "counting: executing 1 requests"
                           for r in caplog.records), "the model's print in the log")
    [record] = [r for r in caplog.records if r.getMessage() == "counting: executing 1 requests"]
    assert record.__dict__["model"] == "counting" and record.__dict__["stream"] == "stdout"


def test_a_crash_fails_its_request_and_the_instance_comes_back(
    client: grpcclient.InferenceServerClient,
) -> None:
    before = pid_of(client)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("counting", counting_inputs(python_models.CRASH))
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    message = caught.value.message()
    assert "model 'counting' version 1 instance 0" in message, message
    assert "exited with code 3" in message, message
    after = pid_of(client)  # waits for the new process
    assert after != before
    assert client.is_model_ready("counting")


def test_a_hang_times_out_and_the_process_is_replaced(
    client: grpcclient.InferenceServerClient,
) -> None:
    before = pid_of(client)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("counting", counting_inputs(python_models.HANG))
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "execution timeout of 1.5 s" in caught.value.message()
    assert pid_of(client) != before
    assert client.is_model_ready("counting")


def test_a_killed_process_leaves_no_shared_memory_and_is_replaced(
    client: grpcclient.InferenceServerClient,
) -> None:
    shm_before = shm_entries()
    mapped = mapped_model_memory()
    victim = pid_of(client)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: _answers_from_another(client, victim), "a new process answering")
    assert shm_entries() == shm_before
    assert mapped_model_memory() == mapped  # the dead one's memory unmapped, the new one's in


def _answers_from_another(client: grpcclient.InferenceServerClient, victim: int) -> bool:
    try:
        return pid_of(client) != victim
    except InferenceServerException:
        return False  # the kill landed under this request


def test_stopping_the_server_finalizes_and_leaves_nothing(tmp_path: Path) -> None:
    python_models.counting_model(tmp_path, "counting", instances=2, max_queue_delay_us=0)
    shm_before = shm_entries()
    mapped = mapped_model_memory()
    with ServerThread(tmp_path) as running, \
            grpcclient.InferenceServerClient(running.url) as client:
        pids = {pid_of(client) for _ in range(4)}
        assert mapped_model_memory() == mapped + 2
    assert mapped_model_memory() == mapped
    assert shm_entries() == shm_before
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_new_version_swaps_in_under_load_without_a_failure(tmp_path: Path) -> None:
    """Poll mode: version 2 appears; its process starts and initializes beside version 1's,
    the swap happens, version 1 drains and its process is finalized."""
    python_models.counting_model(tmp_path, "swapped", max_queue_delay_us=0)
    answered: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic(url: str) -> None:
        with grpcclient.InferenceServerClient(url) as own:
            while not stop.is_set():
                try:
                    result = own.infer("swapped", counting_inputs(2.0))
                except InferenceServerException as exc:
                    failures.append(exc.message())
                    continue
                assert result.as_numpy("OUTPUT0")[0, 0] == 4.0
                answered.append(int(result.get_response().model_version))

    with ServerThread(tmp_path, model_control_mode="poll", repository_poll_secs=0.2) as running:
        sender = threading.Thread(target=traffic, args=(running.url,), daemon=True)
        sender.start()
        wait_until(lambda: len(answered) > 5, "answers from version 1")
        python_models.counting_model(tmp_path, "swapped", max_queue_delay_us=0, version=2)
        wait_until(lambda: answered[-1:] == [2], "answers from version 2")
        count = len(answered)
        wait_until(lambda: len(answered) > count + 5, "more answers")
        stop.set()
        sender.join(timeout=30)
    assert failures == []
    assert answered[0] == 1 and set(answered) == {1, 2}
    switches = [b for a, b in itertools.pairwise(answered) if a != b]
    assert switches == [2]


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: whoever adopted it may not reap)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_server_takes_its_model_processes_with_it(tmp_path: Path) -> None:
    """`peregrine serve` killed -9 (no stop, no finalize): its model process goes within
    about a second (it watches its parent) and no shared memory is left."""
    python_models.counting_model(tmp_path, "counting", max_queue_delay_us=0)
    before = shm_entries()
    served = Served(["--model-repository", str(tmp_path), "--grpc-port", str(free_port()),
                     "--metrics-port", "0", "--log-format", "json"], environment())
    try:
        loaded = served.wait_for_event("python instance loaded")
        served.wait_for_event("server started")
        model = int(loaded["pid"])
        assert not _gone(model)
        served.proc.kill()
        served.proc.wait(timeout=10)
        wait_until(lambda: _gone(model), "the model process to exit", timeout=10)
    finally:
        served.stop()
    assert shm_entries() == before
