"""The upstream key pool (issue 3): key tables with weights, the strategies, per-key rate
limits that count every call (polls and balance reads included), queueing up to
`queue_timeout`, `max_concurrent`, and key states coming back by themselves.

Time is scaled down: the simulators' and the proxy's rate windows are set to the same
short window, so "60 calls a minute" becomes "60 calls in a second or two"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from conftest import FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims
from helpers import (
    admin_keys,
    call_in_flight,
    calls_by_key,
    chat,
    fast_tasks,
    image_burst,
    in_background,
    most_in_any_window,
    one_call_at_a_time,
    wait_until,
    with_admin,
)
from openai_spec import validate_error

from proxy.pool import fingerprint
from proxy.sim.fengyuan import FengyuanKey

K0, K1 = XFFUW_KEYS
K2 = "xf_test_key_gamma_3333"
FY_NORMAL = FENGYUAN_KEYS[0]
FY_VIP = "sk-fy-test-key-vip-6666"
FY_POOR = "sk-fy-test-key-poor-7777"
FY_RICH = "sk-fy-test-key-rich-8888"
FY_IMAGE = "fengyuan/image_generation"


# ---- helpers -----------------------------------------------------------------------


def key_view(proxy: RunningProxy, secret: str) -> dict[str, Any]:
    return admin_keys(proxy)[fingerprint(secret)]


def fengyuan_table(config: dict[str, Any], keys: list[str], **table: Any) -> None:
    """The fengyuan table with `keys` and the settings in `table`; xffuw stays."""
    config["providers"]["fengyuan"] = {"base_url": config["providers"]["fengyuan"]["base_url"], "keys": keys,
                                       **table}


# ---- key tables, weights, strategies --------------------------------------------------


def test_round_robin_over_key_tables_spreads_chats_evenly(start_proxy: Callable[..., RunningProxy],
                                                           proxy_config: dict[str, Any], sims: Sims) -> None:
    xffuw = proxy_config["providers"]["xffuw"]
    del xffuw["keys"]
    xffuw["key"] = [{"value": K0}, {"value": K1, "weight": 1}]
    client = start_proxy(proxy_config).client()
    chat(client, "warm")  # catalogue loaded
    start = len(sims.xffuw.calls)
    for i in range(10):
        chat(client, f"rr {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 5, K1: 5}


def test_weights_are_respected(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                               sims: Sims) -> None:
    xffuw = proxy_config["providers"]["xffuw"]
    del xffuw["keys"]
    xffuw["key"] = [{"value": K0, "weight": 3}, {"value": K1, "weight": 1}]
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    chat(client, "warm")
    start = len(sims.xffuw.calls)
    for i in range(20):
        chat(client, f"weighted {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 15, K1: 5}
    assert key_view(proxy, K0)["weight"] == 3 and key_view(proxy, K1)["weight"] == 1


def test_least_busy_prefers_the_idle_key(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                         sims: Sims) -> None:
    proxy_config["providers"]["xffuw"]["strategy"] = "least_busy"
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    client.models.list()
    slow, box = in_background(lambda: chat(client, "[delay=1.5] slow"))
    busy = wait_until(lambda: [fp for fp, v in admin_keys(proxy).items() if v["in_flight"] == 1], what="a busy key")
    start = len(sims.xffuw.calls)
    for i in range(3):
        chat(client, f"quick {i}")
    quick = calls_by_key(sims.xffuw, "chat", start)
    assert len(quick) == 1 and sum(quick.values()) == 3, quick  # all three on one key...
    (idle,) = quick
    assert fingerprint(idle) not in busy  # ...the one without the slow call
    slow.join(10)
    assert "error" not in box, box
    last = [c for c in sims.xffuw.calls if c.endpoint == "chat"][-1]  # the slow one ends last
    assert last.key != idle and fingerprint(last.key) in busy
    assert all(v["in_flight"] == 0 for v in admin_keys(proxy).values())


def test_most_credits_picks_the_richer_fengyuan_key(start_proxy: Callable[..., RunningProxy],
                                                    proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.fengyuan.keys[FY_POOR] = FengyuanKey(credits=1_000.0)
    sims.fengyuan.keys[FY_RICH] = FengyuanKey(credits=5_000.0)
    fengyuan_table(proxy_config, [FY_POOR, FY_RICH], strategy="most_credits")
    fast_tasks(proxy_config, sims, poll_interval=0.1, timeout=20)
    proxy = start_proxy(with_admin(proxy_config))
    # Balances are read from /api/user/info at start.
    wait_until(lambda: all(v["credits"] is not None for v in admin_keys(proxy, "fengyuan").values()),
               what="credits read at start")
    views = admin_keys(proxy, "fengyuan")
    assert views[fingerprint(FY_POOR)]["credits"] == 1_000.0
    assert views[fingerprint(FY_RICH)]["credits"] == 5_000.0
    client = proxy.client()
    for i in range(3):
        assert client.images.generate(model=FY_IMAGE, prompt=f"橘猫 {i}").data[0].url
    assert calls_by_key(sims.fengyuan, "invoke") == {FY_RICH: 3}
    assert sims.fengyuan.keys[FY_RICH].credits == 5_000.0 - 3 * 20
    assert admin_keys(proxy)[fingerprint(FY_RICH)]["credits"] == pytest.approx(5_000.0 - 3 * 20)


# ---- per-key rate limits ------------------------------------------------------------


def test_seventy_fengyuan_images_on_one_non_vip_key_cause_no_upstream_429(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """The issue's test, time scaled: 60 calls per window on a non-VIP key, every call counted
    (invokes, task polls, /api/user/info reads); 70 concurrent image requests all answer 200
    and the simulator never had to refuse one call."""
    window = 1.5
    sims.fengyuan.rate_window = window
    assert sims.fengyuan.rate_limit_normal == 60
    fengyuan_table(proxy_config, [FY_NORMAL], rate_window=window, balance_interval=0.4)
    fast_tasks(proxy_config, sims, poll_interval=0.1, timeout=20)  # not instant: each image is polled at least once
    proxy = start_proxy(with_admin(proxy_config))
    wait_until(lambda: key_view(proxy, FY_NORMAL)["credits"] is not None, what="the balance read")
    assert key_view(proxy, FY_NORMAL)["rate_limit"] == 60

    began = time.monotonic()
    results = image_burst(proxy, 70, FY_IMAGE, "一只猫")
    elapsed = time.monotonic() - began
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r.data[0].url for r in results)
    assert sims.fengyuan.rate_limited_count == 0
    assert all(c.status == 200 for c in sims.fengyuan.calls if c.endpoint != "file")
    invokes, polls = sims.fengyuan.count("invoke"), sims.fengyuan.count("task") + sims.fengyuan.count("task_list")
    reads = sims.fengyuan.count("user_info")
    assert invokes == 70 and polls >= 1 and reads >= 2, (invokes, polls, reads)
    # More than 60 keyed calls were made, so the proxy must have spread them over windows.
    keyed = invokes + polls + reads
    assert elapsed >= (keyed // 60 - 1) * window, (elapsed, keyed)
    assert sims.fengyuan.keys[FY_NORMAL].credits == 100_000.0 - 70 * 20


def test_vip_fengyuan_key_gets_300_calls_per_window(start_proxy: Callable[..., RunningProxy],
                                                    proxy_config: dict[str, Any], sims: Sims) -> None:
    window = 5.0
    sims.fengyuan.rate_window = window
    sims.fengyuan.keys[FY_VIP] = FengyuanKey(credits=10_000.0, vip_level=1)
    fengyuan_table(proxy_config, [FY_VIP], rate_window=window)
    proxy = start_proxy(with_admin(proxy_config))
    view = wait_until(lambda: (v := key_view(proxy, FY_VIP))["vip_level"] == 1 and v, what="the VIP level read")
    assert view["rate_limit"] == 300

    results = image_burst(proxy, 100, FY_IMAGE, "[instant] 猫")
    assert not [r for r in results if isinstance(r, BaseException)]
    assert sims.fengyuan.rate_limited_count == 0
    invokes = [c.at for c in sims.fengyuan.calls if c.endpoint == "invoke" and c.key == FY_VIP]
    assert len(invokes) == 100
    # More than the normal 60 went out inside one window: only a VIP key may do that.
    assert most_in_any_window(invokes, window) > 60
    assert sims.fengyuan.keys[FY_VIP].credits == pytest.approx(10_000.0 - 100 * 16)  # VIP price: 20 x 0.8


def test_xffuw_rpm_per_key_is_respected(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                        sims: Sims) -> None:
    window = 1.0
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 4, window
    xffuw = proxy_config["providers"]["xffuw"]
    del xffuw["keys"]
    xffuw["key"] = [{"value": K0, "rpm": 4}]
    xffuw["rate_window"] = window
    proxy = start_proxy(proxy_config)

    async def burst() -> list[Any]:
        async with proxy.async_client() as client:
            return await asyncio.gather(*(client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(10)),
                return_exceptions=True)

    began = time.monotonic()
    results = asyncio.run(burst())
    elapsed = time.monotonic() - began
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sims.xffuw.rate_limited_count == 0
    assert sims.xffuw.count("chat", K0) == 10
    # 11 calls (the catalogue included) at 4 per window: at least two full windows waited.
    assert elapsed >= 2 * window, elapsed


def test_the_full_rpm_of_a_key_is_usable_at_once(start_proxy: Callable[..., RunningProxy],
                                                 proxy_config: dict[str, Any], sims: Sims) -> None:
    """rpm 3: the catalogue read and two chats go out at once; only the fourth call waits.
    (No call is counted that never reached the upstream.)"""
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 3, 5.0
    xffuw = proxy_config["providers"]["xffuw"]
    xffuw.update(keys=[K0], rpm=3, rate_window=5.0, queue_timeout=0.3)
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    time.sleep(0.3)  # the background loops have started
    client.models.list()
    chat(client, "one")
    chat(client, "two")
    assert sims.xffuw.count(key=K0) == 3
    assert key_view(proxy, K0)["calls_in_window"] == 3
    with pytest.raises(openai.RateLimitError):
        chat(client, "three")
    assert sims.xffuw.rate_limited_count == 0


# ---- queueing ----------------------------------------------------------------------


def test_every_key_at_its_limit_waits_queue_timeout_then_429(start_proxy: Callable[..., RunningProxy],
                                                             proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 2, 10.0
    proxy_config["providers"]["xffuw"].update(keys=[K0], rpm=2, rate_window=10.0, queue_timeout=0.5)
    client = start_proxy(proxy_config).client()
    refused = None
    for i in range(4):  # the catalogue read and one or two chats fill the key's window
        began = time.monotonic()
        try:
            chat(client, f"fill {i}")
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None
    assert time.monotonic() - began < 3.0  # not held for the window (10 s)
    validate_error({"error": refused.body})
    assert refused.status_code == 429
    assert refused.body["type"] == "requests" and refused.body["code"] == "rate_limit_exceeded"
    retry_after = int(refused.response.headers["retry-after"])
    assert 1 <= retry_after <= 11
    assert sims.xffuw.count(key=K0) <= 2  # the refused request never reached the upstream
    assert sims.xffuw.rate_limited_count == 0


def test_a_queued_request_succeeds_when_room_frees_in_time(start_proxy: Callable[..., RunningProxy],
                                                           proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 2, 1.0
    proxy_config["providers"]["xffuw"].update(keys=[K0], rpm=2, rate_window=1.0, queue_timeout=3.0)
    client = start_proxy(proxy_config).client()
    client.models.list()
    chat(client, "one")  # the window is full now
    began = time.monotonic()
    chat(client, "two")
    chat(client, "three")
    assert time.monotonic() - began >= 0.8  # waited for room instead of failing
    assert sims.xffuw.count("chat", K0) == 3
    assert sims.xffuw.rate_limited_count == 0


def test_max_concurrent_per_key(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                sims: Sims) -> None:
    one_call_at_a_time(proxy_config, K0, queue_timeout=0.6)
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    client.models.list()
    # A short call in flight: the next request waits for it, then goes.
    slow, box = call_in_flight(proxy, K0, lambda: chat(client, "[delay=0.4] short"))
    chat(client, "after the short one")
    slow.join(5)
    assert "error" not in box, box
    order = [c for c in sims.xffuw.calls if c.endpoint == "chat"]
    assert len(order) == 2 and order[0].at <= order[1].at  # never two at once: the waiting one ended last
    # A long call in flight: the next request gives up after queue_timeout with 429.
    slow, box = call_in_flight(proxy, K0, lambda: chat(client, "[delay=1.5] long"))
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, "while the long one runs")
    assert time.monotonic() - began >= 0.4  # waited queue_timeout...
    assert slow.is_alive() and not box  # ...but not for the long call to end
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert key_view(proxy, K0)["in_flight"] == 1
    slow.join(5)
    assert "error" not in box, box
    assert sims.xffuw.count("chat", K0) == 3


# ---- states ------------------------------------------------------------------------


def test_exhausted_fengyuan_key_recovers_by_itself_after_top_up(start_proxy: Callable[..., RunningProxy],
                                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.fengyuan.keys[FY_POOR] = FengyuanKey(credits=100.0)
    fengyuan_table(proxy_config, [FY_POOR], recheck_after=0.3, balance_interval=300)
    fast_tasks(proxy_config, sims, poll_interval=0.1, timeout=20)
    proxy = start_proxy(with_admin(proxy_config))
    wait_until(lambda: key_view(proxy, FY_POOR)["credits"] == 100.0, what="credits read at start")
    client = proxy.client()
    sims.fengyuan.keys[FY_POOR].credits = 0.0  # spent elsewhere: the proxy does not know yet
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model=FY_IMAGE, prompt="橘猫")
    assert caught.value.body["code"] == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    view = key_view(proxy, FY_POOR)
    assert view["state"] == "exhausted" and view["reason"]
    assert sims.fengyuan.count("invoke") == 1
    # Re-read while exhausted: still broke, so no invoke is wasted on it.
    wait_until(lambda: sims.fengyuan.count("user_info") >= 3, what="balance re-reads")
    assert key_view(proxy, FY_POOR)["credits"] == 0.0
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model=FY_IMAGE, prompt="橘猫 again")
    assert sims.fengyuan.count("invoke") == 1
    sims.fengyuan.keys[FY_POOR].credits = 500.0  # topped up
    view = wait_until(lambda: (v := key_view(proxy, FY_POOR))["state"] == "active" and v, what="recovery")
    assert view["credits"] == 500.0
    assert client.images.generate(model=FY_IMAGE, prompt="橘猫 back").data[0].url
    assert sims.fengyuan.count("invoke", FY_POOR) == 2
    assert sims.fengyuan.keys[FY_POOR].credits == 480.0


def test_exhausted_xffuw_key_lets_one_request_through_after_recheck_after(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["providers"]["xffuw"].update(keys=[K0], recheck_after=0.5)
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    client.models.list()
    sims.xffuw.keys[K0] = 0.0

    def refused() -> openai.RateLimitError:
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client, "short")
        assert caught.value.body["code"] == "insufficient_quota"
        return caught.value

    refused()
    assert sims.xffuw.count("chat", K0) == 1  # tried once, not twice on the same key
    assert key_view(proxy, K0)["state"] == "exhausted"
    refused()
    assert sims.xffuw.count("chat", K0) == 1  # set aside
    time.sleep(0.6)
    refused()
    assert sims.xffuw.count("chat", K0) == 2  # one request through after recheck_after...
    refused()
    assert sims.xffuw.count("chat", K0) == 2  # ...and aside again
    sims.xffuw.keys[K0] = 100.0
    time.sleep(0.6)
    chat(client, "back")
    chat(client, "and again")
    assert sims.xffuw.count("chat", K0) == 4
    assert key_view(proxy, K0)["state"] == "active"


def test_a_retry_never_lands_on_a_key_that_just_failed(start_proxy: Callable[..., RunningProxy],
                                                       proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.keys[K2] = 1_000.0
    proxy_config["providers"]["xffuw"]["keys"] = [K0, K1, K2]
    client = start_proxy(proxy_config).client()
    client.models.list()
    del sims.xffuw.keys[K0]  # revoked
    sims.xffuw.keys[K1] = 0.0  # broke
    failed: set[str | None] = set()
    for i in range(4):  # until both bad keys were tried once
        start = len(sims.xffuw.calls)
        chat(client, f"answer {i}")
        tried = [c for c in list(sims.xffuw.calls)[start:] if c.endpoint == "chat"]
        assert len({c.key for c in tried}) == len(tried), tried  # within one request, each key at most once
        assert tried[-1].key == K2 and tried[-1].status == 200
        assert not failed & {c.key for c in tried}, tried  # a key that failed before is not tried again
        failed |= {c.key for c in tried[:-1]}
        if failed == {K0, K1}:
            break
    assert failed == {K0, K1}
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(client, f"later {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K2: 4}  # the failed ones rest
    # The last key failing too: tried once, then the most hopeful error (one key is only broke).
    del sims.xffuw.keys[K2]
    start = len(sims.xffuw.calls)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, "nobody")
    assert caught.value.body["code"] == "insufficient_quota"
    assert calls_by_key(sims.xffuw, "chat", start) == {K2: 1}


def test_a_key_whose_known_credits_cannot_pay_is_never_tried(start_proxy: Callable[..., RunningProxy],
                                                              proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.fengyuan.keys[FY_POOR] = FengyuanKey(credits=15.0)  # an image costs 20
    fengyuan_table(proxy_config, [FY_POOR, FY_NORMAL])
    fast_tasks(proxy_config, sims, poll_interval=0.1, timeout=20)
    proxy = start_proxy(with_admin(proxy_config))
    wait_until(lambda: all(v["credits"] for v in admin_keys(proxy, "fengyuan").values()), what="credits read")
    client = proxy.client()
    for i in range(3):
        assert client.images.generate(model=FY_IMAGE, prompt=f"猫 {i}").data[0].url
    assert calls_by_key(sims.fengyuan, "invoke") == {FY_NORMAL: 3}  # not one request wasted on it
    assert sims.fengyuan.keys[FY_POOR].credits == 15.0


def test_fengyuan_retry_goes_to_another_key_each_time(start_proxy: Callable[..., RunningProxy],
                                                      proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.fengyuan.keys[FY_POOR] = FengyuanKey(credits=1_000.0)
    sims.fengyuan.keys[FY_RICH] = FengyuanKey(credits=1_000.0)
    fengyuan_table(proxy_config, [FY_POOR, FY_RICH])
    fast_tasks(proxy_config, sims, poll_interval=0.1, timeout=20)
    proxy = start_proxy(with_admin(proxy_config))
    wait_until(lambda: all(v["credits"] for v in admin_keys(proxy, "fengyuan").values()), what="credits read")
    sims.fengyuan.keys[FY_POOR].credits = sims.fengyuan.keys[FY_RICH].credits = 0.0
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client().images.generate(model=FY_IMAGE, prompt="猫")
    assert caught.value.body["code"] == "insufficient_quota"
    assert calls_by_key(sims.fengyuan, "invoke") == {FY_POOR: 1, FY_RICH: 1}
