"""--trace-config, the trace context headers and the settings TraceSetting changes."""

from __future__ import annotations

import pytest

from server.errors import InvalidInput, NotAllowed, Unsupported
from server.settings import ServerSettings
from server.tracing.codec import stream_status
from server.tracing.config import Endpoint, parse_endpoint, parse_trace_config
from server.tracing.context import parse_traceparent, remote_parent
from server.tracing.settings import TraceSettings

OTEL = ("mode=opentelemetry", "level=TIMESTAMPS")
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_triton_defaults_and_every_setting() -> None:
    config = parse_trace_config(("mode=opentelemetry",))
    assert (config.timestamps, config.rate, config.count) == (False, 1000, -1)
    assert config.endpoint == Endpoint("http", "http://localhost:4318/v1/traces")
    assert config.resource == (("service.name", "peregrine"),)
    assert (config.max_queue_size, config.schedule_delay_ms,
            config.max_export_batch_size) == (2048, 5000, 512)
    config = parse_trace_config((*OTEL, "rate=100", "count=7", "opentelemetry,url=otel:4317",
                                 "opentelemetry,resource=service.name=ranker",
                                 "opentelemetry,resource=deployment=eu",
                                 "opentelemetry,bsp_max_queue_size=100",
                                 "opentelemetry,bsp_schedule_delay=20",
                                 "opentelemetry,bsp_max_export_batch_size=10"))
    assert (config.timestamps, config.rate, config.count) == (True, 100, 7)
    assert config.endpoint == Endpoint("grpc", "otel:4317")
    assert config.resource == (("service.name", "ranker"), ("deployment", "eu"))
    assert (config.max_queue_size, config.schedule_delay_ms,
            config.max_export_batch_size) == (100, 20, 10)
    # A queue smaller than the default batch makes the batch default to the queue.
    assert parse_trace_config((*OTEL, "opentelemetry,bsp_max_queue_size=8")
                              ).max_export_batch_size == 8


@pytest.mark.parametrize("url, endpoint", [
    ("127.0.0.1:4317", Endpoint("grpc", "127.0.0.1:4317")),
    ("http://collector:4317", Endpoint("grpc", "collector:4317")),
    ("https://collector:4317/", Endpoint("grpc", "collector:4317", secure=True)),
    ("http://collector:4318/v1/traces", Endpoint("http", "http://collector:4318/v1/traces")),
    ("https://collector/v1/traces",
     Endpoint("http", "https://collector/v1/traces", secure=True)),
])
def test_endpoints(url: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(url) == endpoint


@pytest.mark.parametrize("entries, words", [
    (("level=TIMESTAMPS",), "mode must be opentelemetry"),
    (("mode=triton",), "mode must be opentelemetry"),
    ((*OTEL, "triton,file=/tmp/trace.json"), "trace file mode is not offered"),
    ((*OTEL, "level=TENSORS"), "TENSORS is not supported"),
    ((*OTEL, "level=LOUD"), "OFF or TIMESTAMPS"),
    ((*OTEL, "rate=-1"), "rate must be at least 0"),
    ((*OTEL, "rate=often"), "rate must be an integer"),
    ((*OTEL, "count=-2"), "count must be at least -1"),
    ((*OTEL, "colour=red"), "unknown setting 'colour'"),
    ((*OTEL, "opentelemetry,rate=3"), "unknown setting 'rate'"),
    ((*OTEL, "jaeger,url=x:1"), "opentelemetry,<setting>=<value>"),
    ((*OTEL, "opentelemetry,resource=novalue"), "resource takes key=value"),
    ((*OTEL, "opentelemetry,url=ftp://x:1"), "url must be"),
    ((*OTEL, "opentelemetry,url=collector"), "names no port"),
    ((*OTEL, "opentelemetry,bsp_max_queue_size=4",
      "opentelemetry,bsp_max_export_batch_size=8"), "must not exceed"),
    ((*OTEL, "opentelemetry,bsp_schedule_delay=0"), "at least 1"),
])
def test_mistakes_are_named(entries: tuple[str, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_trace_config(entries)


def test_the_flag_is_checked_with_the_settings() -> None:
    assert ServerSettings().tracing is None
    settings = ServerSettings(trace_config=(*OTEL, "rate=10"))
    assert settings.tracing is not None and settings.tracing.rate == 10
    with pytest.raises(ValueError, match=r"trace_config: .*rate must be"):
        ServerSettings(trace_config=(*OTEL, "rate=x"))


def test_traceparent() -> None:
    parent = parse_traceparent(PARENT, "a=1")
    assert parent is not None
    assert parent.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert parent.span_id == 0xb7ad6b7169203331
    assert parent.sampled and parent.tracestate == "a=1"
    assert parse_traceparent(PARENT[:-2] + "00") is not None
    assert not parse_traceparent(PARENT[:-2] + "00").sampled  # type: ignore[union-attr]
    # A later version is read by its first four fields; version 00 has exactly four.
    assert parse_traceparent("01" + PARENT[2:] + "-later") is not None
    for bad in (PARENT.upper(), PARENT[:-1], PARENT + "-x", "ff" + PARENT[2:],
                "00-" + "0" * 32 + PARENT[35:], PARENT[:36] + "0" * 16 + PARENT[52:],
                PARENT.replace("-", "_"), "", "00-xyz"):
        assert parse_traceparent(bad) is None, bad
    assert parse_traceparent(PARENT, "s" * 600).tracestate == ""  # type: ignore[union-attr]


def test_remote_parent_from_metadata() -> None:
    parent = remote_parent((("user-agent", "x"), ("tracestate", "a=1"), ("traceparent", PARENT),
                            ("tracestate", "b=2")))
    assert parent is not None and parent.tracestate == "a=1,b=2"
    assert remote_parent((("user-agent", "x"),)) is None
    assert remote_parent(None) is None


def test_rate_and_count() -> None:
    settings = TraceSettings(parse_trace_config((*OTEL, "rate=3", "count=2")))
    assert [settings.by_rate() for _ in range(9)] == [False, False, True, False, False, True,
                                                       False, False, False]
    settings = TraceSettings(parse_trace_config((*OTEL, "rate=0")))
    assert not any(settings.by_rate() for _ in range(5))
    settings = TraceSettings(parse_trace_config(("mode=opentelemetry", "rate=1")))
    assert not settings.by_rate()  # level OFF


def test_updates_apply_whole_and_reset_to_the_start() -> None:
    settings = TraceSettings(parse_trace_config((*OTEL, "rate=3")))
    assert settings.report() == {"trace_mode": ["opentelemetry"], "trace_level": ["TIMESTAMPS"],
                                 "trace_rate": ["3"], "trace_count": ["-1"]}
    settings.update("", {"trace_rate": ["1"], "trace_count": ["4"], "trace_level": ["OFF"]})
    assert settings.report()["trace_level"] == ["OFF"] and not settings.by_rate()
    with pytest.raises(InvalidInput, match="trace_count"):
        settings.update("", {"trace_level": ["TIMESTAMPS"], "trace_count": ["x"]})
    assert settings.report()["trace_level"] == ["OFF"]  # nothing of a refused update applied
    settings.update("", {"trace_level": [], "trace_rate": [], "trace_count": []})
    assert settings.report()["trace_rate"] == ["3"] and settings.timestamps
    with pytest.raises(InvalidInput, match="one value"):
        settings.update("", {"trace_rate": ["1", "2"]})
    with pytest.raises(Unsupported, match="per-model"):
        settings.update("m", {"trace_rate": ["1"]})
    settings.update("m", {})  # reading a model's settings reads the global ones
    off = TraceSettings(None)
    assert off.report()["trace_level"] == ["OFF"] and not off.by_rate()
    off.update("m", {"trace_level": ["OFF"]})  # keeping it off is no change
    with pytest.raises(NotAllowed, match="--trace-config"):
        off.update("", {"trace_rate": ["1"]})


def test_stream_status_reads_the_servicers_form() -> None:
    import grpc

    assert stream_status("[NOT_FOUND] no model 'x'") == (grpc.StatusCode.NOT_FOUND,
                                                         "no model 'x'")
    assert stream_status("[BOGUS] x") == (grpc.StatusCode.UNKNOWN, "[BOGUS] x")
    assert stream_status("plain") == (grpc.StatusCode.UNKNOWN, "plain")


def test_without_the_extra_the_flag_says_what_to_install(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'peregrine\[tracing\]'"):
        ServerSettings(trace_config=OTEL)
