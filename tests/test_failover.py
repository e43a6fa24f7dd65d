"""The key pool: failover past bad keys, setting them aside, bringing them back, spreading
load, never paying twice, and polling with the key that made the task."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims
from helpers import calls_by_key, chat, fast_tasks
from openai_spec import validate_error

from proxy.sim.fengyuan import FengyuanKey

K0, K1 = XFFUW_KEYS
FY_IMAGE = "fengyuan/image_generation"
FY_BROKE = "sk-fy-test-key-broke-4444"
FY_SECOND = "sk-fy-test-key-second-5555"


def started(start_proxy: Callable[..., RunningProxy], config: dict[str, Any]) -> openai.OpenAI:
    return start_proxy(config).client()


# ---- an invalid key ----------------------------------------------------------------


def test_failover_past_an_invalid_key_which_is_then_disabled(start_proxy: Callable[..., RunningProxy],
                                                             proxy_config: dict[str, Any], sims: Sims) -> None:
    bad = "xf_unknown_to_sim_9999"
    proxy_config["providers"]["xffuw"]["keys"] = [bad, K0]
    client = started(start_proxy, proxy_config)
    chat(client)
    # The invalid key was tried at most once (whichever call came first: catalogue or chat)...
    assert sims.xffuw.count(key=bad) == 1
    for i in range(4):
        chat(client, f"again {i}")
    # ...and never again.
    assert sims.xffuw.count(key=bad) == 1
    assert calls_by_key(sims.xffuw, "chat") == {K0: 5} or calls_by_key(sims.xffuw, "chat") == {K0: 5, bad: 1}
    assert sims.xffuw.keys[K0] == pytest.approx(1000 - 5 * 0.5)


def test_chat_fails_over_when_a_key_is_revoked_and_never_uses_it_again(client: openai.OpenAI, sims: Sims) -> None:
    chat(client)  # catalogue loaded, both keys fine
    del sims.xffuw.keys[K0]  # revoked upstream; K1 stays good
    before = calls_by_key(sims.xffuw, "chat")
    for i in range(4):
        chat(client, f"after revoke {i}")
    after = calls_by_key(sims.xffuw, "chat")
    revoked_calls = after.get(K0, 0) - before.get(K0, 0)
    assert revoked_calls <= 1  # one failed try at most, then it is disabled
    assert after.get(K1, 0) - before.get(K1, 0) == 4  # every chat answered by the good key
    for i in range(3):
        chat(client, f"later {i}")
    assert calls_by_key(sims.xffuw, "chat").get(K0, 0) == after.get(K0, 0)


# ---- an exhausted key --------------------------------------------------------------


def test_exhausted_key_is_set_aside_then_rechecked_after_top_up(start_proxy: Callable[..., RunningProxy],
                                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["providers"]["xffuw"]["recheck_after"] = 1.0
    client = started(start_proxy, proxy_config)
    sims.xffuw.keys[K0] = 0.0
    chat(client, "one")
    chat(client, "two")  # round robin: one of these two reaches K0, which is short
    assert calls_by_key(sims.xffuw, "chat").get(K0, 0) <= 1
    assert sims.xffuw.keys[K1] == pytest.approx(1000 - 2 * 0.5)  # both chats paid by K1
    tried = calls_by_key(sims.xffuw, "chat").get(K0, 0)
    for i in range(3):
        chat(client, f"aside {i}")
    assert calls_by_key(sims.xffuw, "chat").get(K0, 0) == tried  # set aside: not retried
    assert sims.xffuw.keys[K1] == pytest.approx(1000 - 5 * 0.5)
    sims.xffuw.keys[K0] = 100.0  # topped up
    time.sleep(1.1)  # past recheck_after
    for i in range(4):
        chat(client, f"back {i}")
    # K0 pays again and takes its share of the four, not one probe only.
    assert sims.xffuw.keys[K0] <= 100.0 - 2 * 0.5
    assert calls_by_key(sims.xffuw, "chat").get(K0, 0) >= tried + 2


# ---- a rate-limited key ------------------------------------------------------------


def test_failover_past_a_rate_limited_key_until_its_retry_after(client: openai.OpenAI, sims: Sims) -> None:
    chat(client)  # catalogue loaded
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 5, 2.0
    # Use up K0's window directly at the sim: the proxy does not know, the sim answers 429.
    for _ in range(5):
        httpx.get(f"{sims.xffuw_url}/api/v1/models.php", headers={"authorization": f"Bearer {K0}"})
    began = time.monotonic()
    chat(client, "a")
    chat(client, "b")  # one of the two reaches K0 and gets 429 with Retry-After: 2
    refused = [c for c in sims.xffuw.calls if c.endpoint == "chat" and c.key == K0]
    assert [c.status for c in refused] == [429]
    chat(client, "c")
    chat(client, "d")
    assert time.monotonic() - began < 1.5  # served by K1 at once, not queued behind K0
    assert [c for c in sims.xffuw.calls if c.endpoint == "chat" and c.key == K0] == refused  # K0 rests
    assert sims.xffuw.rate_limited_count == 1
    time.sleep(max(0.0, 2.2 - (time.monotonic() - refused[0].at)))  # Retry-After has passed
    for i in range(4):
        chat(client, f"after {i}")
    back = [c.status for c in sims.xffuw.calls if c.endpoint == "chat" and c.key == K0 and c.at > refused[0].at]
    assert back and all(status == 200 for status in back), back
    assert sims.xffuw.rate_limited_count == 1


# ---- round robin -------------------------------------------------------------------


def test_round_robin_spreads_chats_evenly(client: openai.OpenAI, sims: Sims) -> None:
    chat(client, "warm")
    before = calls_by_key(sims.xffuw, "chat")
    for i in range(4):
        chat(client, f"rr {i}")
    after = calls_by_key(sims.xffuw, "chat")
    spread = {key: after.get(key, 0) - before.get(key, 0) for key in XFFUW_KEYS}
    assert spread == {K0: 2, K1: 2}


def test_round_robin_spreads_images_evenly(client: openai.OpenAI, sims: Sims) -> None:
    client.models.list()
    for i in range(4):
        assert client.images.generate(model="flux-schnell", prompt=f"cat {i}").data[0].url
    assert calls_by_key(sims.xffuw, "image") == {K0: 2, K1: 2}


# ---- Fengyuan ----------------------------------------------------------------------


@pytest.mark.parametrize("envelope", ["observed", "documented"])
def test_fengyuan_failover_past_a_credits_short_key(start_proxy: Callable[..., RunningProxy],
                                                    proxy_config: dict[str, Any], sims: Sims, envelope: str) -> None:
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    sims.fengyuan.keys[FY_BROKE] = FengyuanKey(credits=100.0)
    proxy_config["providers"]["fengyuan"]["keys"] = [FY_BROKE, FENGYUAN_KEYS[0]]
    fast_tasks(proxy_config, sims, task_seconds=0.1)
    client = started(start_proxy, proxy_config)
    # Once the proxy has read both keys' credits, FY_BROKE's run short behind its back: only
    # the invoke's answer (HTTP 200 + code 40001 when observed, 403 when documented) tells.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not all(sims.fengyuan.count("user_info", k)
                                                  for k in (FY_BROKE, FENGYUAN_KEYS[0])):
        time.sleep(0.02)
    sims.fengyuan.keys[FY_BROKE].credits = 5.0  # one image costs 20
    for i in range(3):
        result = client.images.generate(model=FY_IMAGE, prompt=f"一只橘猫 {i}")
        assert result.data[0].url and result.data[0].url.startswith("http")
    invokes = calls_by_key(sims.fengyuan, "invoke")
    assert invokes.get(FENGYUAN_KEYS[0]) == 3
    assert invokes.get(FY_BROKE) == 1  # refused once, then set aside
    refused = [c.status for c in sims.fengyuan.calls if c.endpoint == "invoke" and c.key == FY_BROKE]
    assert refused == [200 if envelope == "observed" else 403]
    assert sims.fengyuan.keys[FY_BROKE].credits == 5.0
    assert sims.fengyuan.keys[FENGYUAN_KEYS[0]].credits == 100_000.0 - 3 * 20


# ---- never pay twice ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["error_rate", "garbage_rate", "drop_after_rate"])
def test_chat_post_is_never_retried_on_another_key(client: openai.OpenAI, sims: Sims, fault: str) -> None:
    chat(client)  # catalogue loaded
    before = sims.xffuw.count("chat")
    balances = dict(sims.xffuw.keys)
    setattr(sims.xffuw.faults, fault, 1.0)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, "pay once")
    assert caught.value.status_code == 502
    validate_error({"error": caught.value.body})
    assert caught.value.body["code"] == "upstream_error"
    assert sims.xffuw.count("chat") == before + 1
    if fault == "drop_after_rate":  # the upstream did the work and charged for it: once
        assert sum(balances.values()) - sum(sims.xffuw.keys.values()) == pytest.approx(0.5)


@pytest.mark.parametrize("fault", ["error_rate", "garbage_rate", "drop_after_rate"])
def test_xffuw_image_post_is_never_retried_on_another_key(client: openai.OpenAI, sims: Sims, fault: str) -> None:
    client.models.list()
    setattr(sims.xffuw.faults, fault, 1.0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model="gpt-image-2", prompt="pay once")
    assert caught.value.status_code == 502
    validate_error({"error": caught.value.body})
    assert sims.xffuw.count("image") == 1
    if fault == "drop_after_rate":
        assert len(sims.xffuw.tasks) == 1


@pytest.mark.parametrize("fault", ["error_rate", "garbage_rate", "drop_after_rate"])
def test_fengyuan_invoke_is_never_retried_on_another_key(start_proxy: Callable[..., RunningProxy],
                                                         proxy_config: dict[str, Any], sims: Sims, fault: str) -> None:
    sims.fengyuan.keys[FY_SECOND] = FengyuanKey(credits=1000.0)
    proxy_config["providers"]["fengyuan"]["keys"] = [FENGYUAN_KEYS[0], FY_SECOND]
    client = started(start_proxy, proxy_config)
    client.models.list()
    setattr(sims.fengyuan.faults, fault, 1.0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model=FY_IMAGE, prompt="pay once")
    assert caught.value.status_code == 502
    validate_error({"error": caught.value.body})
    assert sims.fengyuan.count("invoke") == 1


def test_a_read_timeout_after_sending_is_not_retried(start_proxy: Callable[..., RunningProxy],
                                                     proxy_config: dict[str, Any], sims: Sims) -> None:
    """A read timeout is no proof the upstream did not take (and charge) the call."""
    proxy_config["providers"]["xffuw"]["read_timeout"] = 0.3
    client = started(start_proxy, proxy_config)
    chat(client)
    before = sims.xffuw.count("chat")
    begin = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, "slow [delay=1.0]")
    assert caught.value.status_code in (502, 504), caught.value.body
    validate_error({"error": caught.value.body})
    assert time.monotonic() - begin < 0.9  # one timeout, not one per key
    time.sleep(0.9)  # let the slow upstream call finish and be recorded
    assert sims.xffuw.count("chat") == before + 1


def test_connection_refused_is_retried_on_another_key_because_nothing_was_sent(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """The converse: a refused connection proves nothing was sent, so moving on is safe; with
    the whole upstream down the answer is a quick 502, not a hang."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proxy_config["providers"]["xffuw"]["base_url"] = f"http://127.0.0.1:{port}/api/v1/"
    client = started(start_proxy, proxy_config)
    begin = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="xffuw/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_error"
    assert time.monotonic() - begin < 5


# ---- polls use the creating key ----------------------------------------------------


def _windows(sim: Any, submit: str, poll: tuple[str, ...], requests: Callable[[int], None],
             count: int) -> list[tuple[str, set]]:
    """Run `count` sequential one-image requests; per request, the submit key and the poll keys."""
    found = []
    for i in range(count):
        start = len(sim.calls)
        requests(i)
        window = list(sim.calls)[start:]
        submits = [c.key for c in window if c.endpoint == submit]
        polls = {c.key for c in window if c.endpoint in poll}
        assert len(submits) == 1, window
        assert polls, window
        found.append((submits[0], polls))
    return found


def test_xffuw_polls_use_the_key_that_created_the_task(start_proxy: Callable[..., RunningProxy],
                                                       proxy_config: dict[str, Any], sims: Sims) -> None:
    fast_tasks(proxy_config, sims, task_seconds=0.1)
    client = started(start_proxy, proxy_config)
    client.models.list()
    sims.xffuw.error_status = 404  # a poll with the wrong key ("task not found") shows as a 404
    found = _windows(sims.xffuw, "image", ("task",),
                     lambda i: client.images.generate(model="gpt-image-2", prompt=f"猫 {i}"), 4)
    assert all(polls == {submit} for submit, polls in found), found
    assert {submit for submit, _ in found} == set(XFFUW_KEYS)  # both keys made tasks
    assert all(c.status == 200 for c in sims.xffuw.calls if c.endpoint == "task")


@pytest.mark.parametrize("envelope", ["documented", "observed"])
def test_fengyuan_polls_use_the_key_that_created_the_task(start_proxy: Callable[..., RunningProxy],
                                                          proxy_config: dict[str, Any], sims: Sims,
                                                          envelope: str) -> None:
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    sims.fengyuan.observed_error_http = 404  # a poll with the wrong key shows as a 404 in both envelopes
    sims.fengyuan.keys[FY_SECOND] = FengyuanKey(credits=1000.0)
    proxy_config["providers"]["fengyuan"]["keys"] = [FENGYUAN_KEYS[0], FY_SECOND]
    fast_tasks(proxy_config, sims, task_seconds=0.1)
    client = started(start_proxy, proxy_config)
    client.models.list()
    found = _windows(sims.fengyuan, "invoke", ("task", "task_list"),
                     lambda i: client.images.generate(model=FY_IMAGE, prompt=f"猫 {i}"), 4)
    assert all(polls == {submit} for submit, polls in found), found
    assert {submit for submit, _ in found} == {FENGYUAN_KEYS[0], FY_SECOND}
    assert all(c.status == 200 for c in sims.fengyuan.calls if c.endpoint == "task")


def test_concurrent_tasks_on_two_keys_poll_with_their_own_keys(start_proxy: Callable[..., RunningProxy],
                                                               proxy_config: dict[str, Any], sims: Sims) -> None:
    fast_tasks(proxy_config, sims, task_seconds=0.1)
    client = started(start_proxy, proxy_config)
    client.models.list()
    sims.xffuw.error_status = 404  # a poll with the wrong key ("task not found") shows as a 404
    result = client.images.generate(model="gpt-image-2", prompt="两只猫", n=4)
    assert len(result.data) == 4
    creators = {task.key for task in sims.xffuw.tasks.values()}
    assert creators == set(XFFUW_KEYS)
    # Every poll found its task: none was made with the other key.
    assert all(c.status == 200 for c in sims.xffuw.calls if c.endpoint == "task")
    assert sims.xffuw.count("task") >= 4
