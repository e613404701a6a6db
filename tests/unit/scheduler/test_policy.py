"""server.scheduler.policy.decide: batch formation as a pure function of the queue front."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.scheduler.policy import (
    INLINE_MAX_BYTES,
    PAD_SLACK_ELEMENTS,
    WAIT_FOR_ARRIVALS,
    Decision,
    Extents,
    InlineCost,
    QueueWait,
    decide,
)

A = ("INPUT0", (16,))
B = ("INPUT0", (32,))
MS = 1_000_000


def entries(front: Iterable[tuple[int, Hashable]]) -> Iterator[tuple[int, Hashable, None]]:
    """A front of a model without ragged inputs (no extents)."""
    return ((rows, signature, None) for rows, signature in front)


def run(
    front: Sequence[tuple[int, Hashable]],
    *,
    batching: bool = True,
    max_batch_size: int = 8,
    preferred: Iterable[int] = (),
    delay_ns: int = 0,
    oldest_ns: int = 1_000 * MS,
    now_ns: int = 1_000 * MS,
) -> Decision:
    return decide(
        entries(front),
        oldest_enqueue_ns=oldest_ns,
        now_ns=now_ns,
        batching=batching,
        max_batch_size=max_batch_size,
        preferred_sizes=frozenset(preferred),
        max_delay_ns=delay_ns,
    )


# -- empty front -------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False])
@pytest.mark.parametrize("delay_ns", [0, 100 * MS])
def test_empty_front_waits_for_arrivals_without_a_timer(batching: bool, delay_ns: int) -> None:
    decision = run([], batching=batching, delay_ns=delay_ns, preferred=(4,))
    assert decision == WAIT_FOR_ARRIVALS
    assert decision.take == 0
    assert decision.wait_until_ns is None


# -- no batching -------------------------------------------------------------------------------


def test_no_batching_takes_exactly_one_request() -> None:
    assert run([(1, A), (1, A), (1, A)], batching=False) == Decision(take=1)


def test_no_batching_ignores_delay_preferred_sizes_and_rows() -> None:
    # A non-batching model (max_batch_size 0) dispatches one request at once, whatever the
    # delay, the preferred sizes or the (meaningless) row count say.
    decision = run(
        [(5, A), (1, B)], batching=False, max_batch_size=0, preferred=(2,), delay_ns=10**9,
        oldest_ns=0, now_ns=1,
    )
    assert decision == Decision(take=1)


def test_no_batching_consumes_only_the_first_item_of_the_front() -> None:
    consumed: list[int] = []

    def front() -> Iterator[tuple[int, Hashable]]:
        for i in range(5):
            consumed.append(i)
            yield (1, A)

    decide(entries(front()), oldest_enqueue_ns=0, now_ns=0, batching=False, max_batch_size=8,
           preferred_sizes=frozenset(), max_delay_ns=0)
    assert consumed == [0]


# -- eager batching (no delay) -------------------------------------------------------------------


def test_eager_takes_everything_queued_when_it_fits() -> None:
    assert run([(1, A), (2, A), (1, A)]) == Decision(take=3)


def test_single_request_goes_at_once_without_delay() -> None:
    assert run([(1, A)]) == Decision(take=1)


def test_fill_to_max_exactly_then_cut() -> None:
    # 3 + 5 = 8 rows = max: the batch closes and the rest waits for the next one.
    assert run([(3, A), (5, A), (1, A), (1, A)]) == Decision(take=2)


def test_rows_count_not_requests() -> None:
    # Four requests of 2 rows fill a max of 8; a fifth request does not join.
    assert run([(2, A)] * 5) == Decision(take=4)
    # Eight requests of 1 row fill the same batch.
    assert run([(1, A)] * 9) == Decision(take=8)


def test_next_request_that_does_not_fit_cuts_the_batch() -> None:
    # 5 + 4 > 8: the second request waits even though a later small one would fit.
    assert run([(5, A), (4, A), (1, A)]) == Decision(take=1)


def test_shape_change_cuts_the_batch() -> None:
    assert run([(1, A), (1, A), (1, B), (1, A)]) == Decision(take=2)


def test_shape_change_at_the_second_request() -> None:
    assert run([(1, A), (1, B)]) == Decision(take=1)


def test_first_request_alone_when_it_fills_max() -> None:
    assert run([(8, A), (1, A)]) == Decision(take=1)


def test_eager_ignores_preferred_sizes_without_delay() -> None:
    # Triton: with no queue delay, preferred sizes do not hold a batch back or cut it.
    assert run([(1, A)] * 3, preferred=(2, 4)) == Decision(take=3)
    assert run([(1, A)] * 5, preferred=(2, 4)) == Decision(take=5)


def test_signatures_compare_by_value() -> None:
    front = [(1, ("INPUT0", (16,))), (1, ("INPUT0", (16,))), (1, ("INPUT0", (17,)))]
    assert run(front) == Decision(take=2)


# -- with a queue delay --------------------------------------------------------------------------


def test_delay_not_elapsed_waits_until_oldest_plus_delay() -> None:
    decision = run([(1, A)], delay_ns=100 * MS, oldest_ns=5_000 * MS, now_ns=5_030 * MS)
    assert decision.take == 0
    assert decision.wait_until_ns == 5_100 * MS


def test_delay_wait_until_is_from_the_oldest_not_from_now() -> None:
    a = run([(1, A), (1, A)], delay_ns=100 * MS, oldest_ns=1_000 * MS, now_ns=1_001 * MS)
    b = run([(1, A), (1, A)], delay_ns=100 * MS, oldest_ns=1_000 * MS, now_ns=1_099 * MS)
    assert a == b == Decision(take=0, wait_until_ns=1_100 * MS)


def test_delay_elapsed_dispatches_everything_that_fits() -> None:
    decision = run([(1, A), (2, A)], delay_ns=100 * MS, oldest_ns=1_000 * MS,
                   now_ns=1_100 * MS)
    assert decision == Decision(take=2)
    later = run([(1, A), (2, A)], delay_ns=100 * MS, oldest_ns=1_000 * MS, now_ns=9_000 * MS)
    assert later == Decision(take=2)


def test_delay_one_ns_before_the_deadline_still_waits() -> None:
    decision = run([(1, A)], delay_ns=100 * MS, oldest_ns=0, now_ns=100 * MS - 1)
    assert decision == Decision(take=0, wait_until_ns=100 * MS)


def test_delay_full_batch_goes_at_once() -> None:
    decision = run([(4, A), (4, A)], delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=2)


def test_delay_batch_cut_by_shape_change_goes_at_once() -> None:
    decision = run([(1, A), (1, B)], delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=1)


def test_delay_batch_cut_by_next_not_fitting_goes_at_once() -> None:
    decision = run([(6, A), (3, A)], delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=1)


def test_delay_preferred_size_reached_goes_at_once() -> None:
    decision = run([(1, A)] * 4, preferred=(4,), delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=4)


def test_delay_preferred_size_not_reached_waits() -> None:
    decision = run([(1, A)] * 3, preferred=(4,), delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=0, wait_until_ns=100 * MS)


def test_delay_takes_the_largest_preferred_size_reached() -> None:
    # 5 rows queued, preferred {2, 4}: send 4 now, the fifth waits for its own batch.
    decision = run([(1, A)] * 5, preferred=(2, 4), delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=4)
    # 3 rows queued: 2 is the largest preferred size that can be formed.
    decision = run([(1, A)] * 3, preferred=(2, 4), delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=2)


def test_delay_preferred_counts_rows() -> None:
    # Rows 1 + 3 = 4 is the preferred size even though it is only two requests.
    decision = run([(1, A), (3, A), (1, A)], preferred=(4,), delay_ns=100 * MS, oldest_ns=0,
                   now_ns=1)
    assert decision == Decision(take=2)
    # Rows 3 + 2 skip over 4: no preferred size can be formed, so wait.
    decision = run([(3, A), (2, A)], preferred=(4,), delay_ns=100 * MS, oldest_ns=0, now_ns=1)
    assert decision == Decision(take=0, wait_until_ns=100 * MS)


def test_delay_preferred_size_only_counts_same_shape() -> None:
    decision = run([(1, A), (1, A), (1, B), (1, B)], preferred=(4,), delay_ns=100 * MS,
                   oldest_ns=0, now_ns=1)
    # The shape change closes the 2-row batch: it goes at once, unpadded to 4.
    assert decision == Decision(take=2)


def test_delay_elapsed_sends_beyond_the_preferred_size() -> None:
    # Once the delay is over, a batch that never formed a preferred size takes all that fits.
    decision = run([(3, A), (2, A)], preferred=(4,), delay_ns=100 * MS, oldest_ns=0,
                   now_ns=100 * MS)
    assert decision == Decision(take=2)


def test_delay_elapsed_with_a_preferred_size_formed_sends_the_preferred_size() -> None:
    # Current rule: a preferred size that can be formed wins even after the delay ran out
    # (Triton's code instead sends everything that fits once the delay is exceeded).
    decision = run([(1, A)] * 3, preferred=(2,), delay_ns=100 * MS, oldest_ns=0,
                   now_ns=500 * MS)
    assert decision == Decision(take=2)


def test_negative_delay_is_no_delay() -> None:
    assert run([(1, A)], delay_ns=-5, oldest_ns=0, now_ns=0) == Decision(take=1)


# -- properties ------------------------------------------------------------------------------------

SIGNATURES = st.sampled_from([A, B, ("INPUT0", (1, 2)), ()])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[int, Hashable]], int, frozenset[int], int,
                                         int, int, bool]:
    max_batch = draw(st.integers(1, 16))
    front: list[tuple[int, Hashable]] = draw(
        st.lists(st.tuples(st.integers(1, max_batch), SIGNATURES), max_size=12)
    )
    preferred = draw(st.frozensets(st.integers(1, max_batch), max_size=4))
    delay = draw(st.sampled_from([0, 1, 1_000, 100 * MS]))
    oldest = draw(st.integers(0, 10**12))
    now = oldest + draw(st.integers(0, 200 * MS))
    batching = draw(st.booleans())
    return front, max_batch, preferred, delay, oldest, now, batching


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_property_decisions_are_consistent(
    scenario: tuple[list[tuple[int, Hashable]], int, frozenset[int], int, int, int, bool],
) -> None:
    front, max_batch, preferred, delay, oldest, now, batching = scenario
    decision = decide(
        entries(front), oldest_enqueue_ns=oldest, now_ns=now, batching=batching,
        max_batch_size=max_batch, preferred_sizes=preferred, max_delay_ns=delay,
    )
    assert 0 <= decision.take <= len(front)
    if not front:
        assert decision == WAIT_FOR_ARRIVALS
        return
    if not batching:
        assert decision == Decision(take=1)
        return
    taken = front[: decision.take]
    assert sum(rows for rows, _ in taken) <= max_batch
    assert all(sig == front[0][1] for _, sig in taken)
    if decision.take == 0:
        # Only a configured delay that has not yet run out may hold requests back.
        assert delay > 0
        assert decision.wait_until_ns == oldest + delay
        assert now < oldest + delay
    else:
        assert decision.wait_until_ns is None
    total = sum(r for r, _ in taken)
    if delay > 0 and decision.take and total in preferred:
        # A preferred size was formed: it goes, and is the largest one that could be formed.
        running = 0
        for rows, sig in front[decision.take:]:
            if sig != front[0][1] or total + running + rows > max_batch:
                break
            running += rows
            assert total + running not in preferred
    elif delay == 0 or now >= oldest + delay:
        # Nothing to wait for: the batch is maximal, i.e. the next request (if any) could not
        # have joined it.
        assert decision.take >= 1
        if decision.take < len(front):
            rows, sig = front[decision.take]
            assert sig != front[0][1] or total + rows > max_batch


def test_delay_is_skipped_once_requests_stop_arriving() -> None:
    """One request at a time: waiting the delay would only add latency."""
    arriving = decide(
        entries([(1, ())]), oldest_enqueue_ns=0, now_ns=100, batching=True, max_batch_size=8,
        preferred_sizes=frozenset(), max_delay_ns=1_000, arriving=True,
    )
    assert arriving == Decision(take=0, wait_until_ns=1_000)
    quiet = decide(
        entries([(1, ()), (2, ())]), oldest_enqueue_ns=0, now_ns=100, batching=True,
        max_batch_size=8,
        preferred_sizes=frozenset(), max_delay_ns=1_000, arriving=False,
    )
    assert quiet == Decision(take=2)
    # Past the delay the batch goes even while requests keep arriving.
    late = decide(
        entries([(1, ())]), oldest_enqueue_ns=0, now_ns=1_000, batching=True, max_batch_size=8,
        preferred_sizes=frozenset(), max_delay_ns=1_000, arriving=True,
    )
    assert late == Decision(take=1)


# -- ragged padding ----------------------------------------------------------------------------

RAGGED = (("X", 2),)  # a ragged input of rank 2: any extents share the signature


def ragged(front: Sequence[tuple[int, Extents]], max_batch_size: int = 8) -> Decision:
    return decide(((rows, RAGGED, extents) for rows, extents in front), oldest_enqueue_ns=0,
                  now_ns=0, batching=True, max_batch_size=max_batch_size,
                  preferred_sizes=frozenset(), max_delay_ns=0)


def test_ragged_requests_of_crossed_extents_go_in_separate_batches() -> None:
    # [1, 1, 30000] and [1, 30000, 1]: together they would pad to 2 x 30000 x 30000 elements
    # (7.2 GB of FP32) for 60000 they carry.
    assert ragged([(1, ((1, 30000),)), (1, ((30000, 1),))]) == Decision(take=1)
    assert ragged([(1, ((30000, 1),)), (1, ((1, 30000),))]) == Decision(take=1)


def test_ragged_requests_of_similar_extents_share_a_batch() -> None:
    assert ragged([(1, ((2, 7),)), (1, ((7, 4),)), (2, ((4, 4),))]) == Decision(take=3)
    # Long rows of nearly one length: padding stays within twice what they carry.
    assert ragged([(1, ((1, 90_000),)), (1, ((1, 100_000),)), (1, ((1, 60_000),))]) \
        == Decision(take=3)


def test_padding_is_bounded_by_the_ratio_once_past_the_slack() -> None:
    long = PAD_SLACK_ELEMENTS * 4
    # Short rows beside a long one: one fits (2 x long padded, long + 1 carried), a second
    # would make the batch mostly padding (3 x long for long + 2), so the batch closes.
    front = [(1, ((long,),)), (1, ((1,),)), (1, ((1,),)), (1, ((1,),))]
    decision = ragged(front)
    assert decision == Decision(take=2)
    taken = front[: decision.take]
    carried = sum(rows * extents[0][0] for rows, extents in taken)
    assert len(taken) * long <= 2 * carried
    # The requests left over form their own batch.
    assert ragged(front[decision.take:]) == Decision(take=2)


def test_small_ragged_batches_pad_freely() -> None:
    assert ragged([(1, ((1,),)), (1, ((1000,),)), (1, ((3,),))]) == Decision(take=3)


def tiny() -> int:
    return 100


def test_inline_cost_learns_per_row_count() -> None:
    cost = InlineCost(inline_max_ns=100_000)
    assert not cost.runs_inline(1, tiny)  # nothing measured yet: hand the batch to a thread
    cost.observe(1, 30_000)
    assert cost.runs_inline(1, tiny)
    assert not cost.runs_inline(8, tiny)
    cost.observe(8, 900_000)
    assert not cost.runs_inline(8, tiny)
    for _ in range(30):  # batches of one became slow: stop running them inline
        cost.observe(1, 500_000)
    assert not cost.runs_inline(1, tiny)
    assert not InlineCost(inline_max_ns=0).runs_inline(1, tiny)


def test_a_big_batch_never_runs_inline_whatever_its_rows_predict() -> None:
    cost = InlineCost(inline_max_ns=100_000)
    for _ in range(50):  # a long run of cheap single-row batches
        cost.observe(1, 10_000)
    assert cost.runs_inline(1, lambda: INLINE_MAX_BYTES)
    assert not cost.runs_inline(1, lambda: INLINE_MAX_BYTES + 1)
    strict = InlineCost(inline_max_ns=100_000, max_bytes=0)
    strict.observe(1, 10_000)
    assert not strict.runs_inline(1, lambda: 1)


def test_input_bytes_are_not_counted_for_a_batch_predicted_slow() -> None:
    def counted() -> int:
        raise AssertionError("counted the bytes of a batch that goes to a thread anyway")

    assert not InlineCost(inline_max_ns=100_000).runs_inline(1, counted)


def test_queue_wait_predicts_nothing_before_a_batch_has_run() -> None:
    assert QueueWait(bound_ns=1, instances=1).predict_ns(1000) == 0.0


def test_queue_wait_is_rows_ahead_times_the_time_per_row_over_the_instances() -> None:
    wait = QueueWait(bound_ns=10_000_000, instances=2)
    wait.observe(rows=4, wall_ns=8_000_000)  # 2 ms a row on one instance: 1 ms with two
    assert wait.predict_ns(10) == pytest.approx(10_000_000)
    wait.observe(rows=0, wall_ns=50_000_000)  # no rows: nothing learnt
    assert wait.predict_ns(10) == pytest.approx(10_000_000)


def test_queue_wait_follows_a_model_that_slows_down() -> None:
    wait = QueueWait(bound_ns=1, instances=1)
    wait.observe(rows=1, wall_ns=1_000_000)
    for _ in range(30):
        wait.observe(rows=1, wall_ns=5_000_000)
    assert wait.predict_ns(1) == pytest.approx(5_000_000, rel=0.01)
