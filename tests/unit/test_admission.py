"""server.admission.Admission: the server-wide counts under their bounds."""

from __future__ import annotations

import pytest

from server.admission import Admission, Bounds
from server.errors import BoundExceeded


def admission(refused: list[str] | None = None) -> Admission:
    bounds = Bounds(max_inflight_requests=2, max_inflight_per_stream=1, max_streams=1,
                    max_queued_bytes=100)
    return Admission(bounds, (refused if refused is not None else []).append)


def test_requests_are_admitted_up_to_the_bound_and_released() -> None:
    counts = admission()
    counts.admit(10)
    counts.admit(20)
    assert (counts.inflight, counts.queued_bytes) == (2, 30)
    with pytest.raises(BoundExceeded) as refused:
        counts.check_room()
    assert refused.value.bound == "max_inflight_requests"
    assert refused.value.message == "server has 2 requests in flight (--max-inflight-requests)"
    with pytest.raises(BoundExceeded):
        counts.admit(1)
    assert (counts.inflight, counts.queued_bytes) == (2, 30)  # a refusal changes nothing
    counts.release_requests(1)
    counts.release_bytes(10)
    counts.admit(5)
    assert (counts.inflight, counts.queued_bytes) == (2, 25)


def test_queued_bytes_are_bounded() -> None:
    counts = admission()
    counts.admit(60)
    with pytest.raises(BoundExceeded) as refused:
        counts.admit(41)
    assert refused.value.bound == "max_queued_bytes"
    assert refused.value.message == (
        "server holds 60 bytes of queued request data and the request brings 41 more; the "
        "bound is 100 (--max-queued-bytes)")
    counts.admit(40)
    assert counts.queued_bytes == 100


def test_streams_are_bounded() -> None:
    counts = admission()
    counts.open_stream()
    with pytest.raises(BoundExceeded) as refused:
        counts.open_stream()
    assert refused.value.message == "server has 1 streams open (--max-streams)"
    counts.close_stream()
    counts.open_stream()
    assert counts.streams == 1


def test_refusals_are_counted_by_bound() -> None:
    seen: list[str] = []
    counts = admission(seen)
    counts.refused("max_streams")
    counts.refused("max_queue_size")
    assert seen == ["max_streams", "max_queue_size"]
