"""The console's Live counts (proxy/live.py): what each process adds to Redis once a beat, and
the series made of every replica's counts plus its own not yet sent. Pure; milliseconds."""

from __future__ import annotations

import pytest

from proxy.live import BUCKET, SPAN, LiveCounts, buckets

NOW = 1_800_000_005.0
THIS = int(NOW // BUCKET)


@pytest.mark.parametrize(("statuses", "counts"), [
    ([200], [1, 0, 0]),
    ([200, 400, 429], [3, 0, 2]),
    ([500, 502, 0], [3, 3, 0]),  # 0: no answer started
    ([200, 404, 503, 0, 201], [5, 2, 1]),
])
def test_what_a_process_sends_is_what_it_answered_since_it_last_sent(statuses: list[int], counts: list[int]) -> None:
    live = LiveCounts()
    for status in statuses:
        live.add(status, NOW)
    assert live.take_unsent(NOW) == {THIS: counts}
    assert live.take_unsent(NOW) == {}  # sent once
    assert live.series(NOW)[-1] == (THIS * BUCKET, *counts)  # its own series keeps them


def test_counts_redis_did_not_take_go_with_the_next_and_old_ones_are_dropped() -> None:
    live = LiveCounts()
    live.add(200, NOW - SPAN - BUCKET)  # older than the series reaches
    live.add(500, NOW - BUCKET)
    taken = live.take_unsent(NOW)
    assert taken == {THIS - 1: [1, 1, 0]}
    live.add(200, NOW)
    live.give_back(taken)
    assert live.take_unsent(NOW) == {THIS - 1: [1, 1, 0], THIS: [1, 0, 0]}


def test_the_proxy_wide_series_is_redis_totals_plus_what_this_process_has_not_sent() -> None:
    live = LiveCounts()
    live.add(200, NOW)
    live.add(400, NOW)
    series = live.with_unsent({THIS: [10, 1, 2], THIS - 3: [4, 0, 0], THIS - 999: [7, 7, 7]}, NOW)
    assert len(series) == SPAN // BUCKET and [at for at, *_ in series] == [b * BUCKET for b in buckets(NOW)]
    assert series[-1] == (THIS * BUCKET, 12, 1, 3)
    assert series[-4] == ((THIS - 3) * BUCKET, 4, 0, 0)
    assert sum(r for _, r, _, _ in series) == 16  # a bucket outside the span is not shown


def test_counts_kept_for_redis_never_outgrow_the_span_while_redis_is_away() -> None:
    live = LiveCounts()
    for hour in range(48):  # two days of answers, none taken
        live.add(200, NOW + hour * 3600)
    assert len(live._unsent) == 1  # an hour is past the span: only the last bucket is kept
    assert live.take_unsent(NOW + 47 * 3600) == {THIS + 47 * 3600 // BUCKET: [1, 0, 0]}
