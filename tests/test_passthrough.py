"""[auth] passthrough under careless and hostile use: probing keys through the proxy is
limited per address, and a task started with someone's own key survives a restart."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from conftest import RunningProxy, Sims
from helpers import AUTH, error_of, post_image, task_ids, wait_until

from proxy.clients import PASSTHROUGH_FAILURES

OWN_KEY = "xf_own_key_of_erin_5555"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_refused_own_keys_from_one_address_are_limited(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(proxy_config)
    statuses = []
    for i in range(PASSTHROUGH_FAILURES + 5):
        reply = httpx.post(proxy.base_url + "/chat/completions", json=CHAT,
                           headers={"authorization": f"Bearer xf_guess_{i:04d}_abcdef"})
        statuses.append(reply.status_code)
    assert statuses == [401] * PASSTHROUGH_FAILURES + [429] * 5, statuses
    guesses = sum(1 for c in sims.xffuw.calls if c.endpoint == "chat" and (c.key or "").startswith("xf_guess_"))
    assert guesses == PASSTHROUGH_FAILURES, "probing went on past the limit"
    limited = httpx.post(proxy.base_url + "/chat/completions", json=CHAT,
                         headers={"authorization": "Bearer xf_guess_more_abcdef"})
    assert error_of(limited, 429)["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) > 0
    # the proxy's own clients at that address are not affected
    assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=AUTH).status_code == 200


def test_an_own_key_task_is_resumed_when_its_owner_asks_again_after_a_restart(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    proxy_config["auth"] = {"passthrough": True}
    own = {"authorization": f"Bearer {OWN_KEY}"}
    first = start_proxy(proxy_config)
    first.server.server.config.timeout_graceful_shutdown = 0.2
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_image, first.url, "my own heron [delay=2]", headers=own)
        wait_until(lambda: sims.xffuw.count("image") == 1, 5, "the submit")
        first.server.stop()
        reply = pending.result()
    (task_id,) = task_ids(reply)
    second = start_proxy(proxy_config)
    view = httpx.get(f"{second.base_url}/tasks/{task_id}", headers=AUTH)
    assert view.status_code == 404  # not alice's task
    polls = sims.xffuw.count("task")

    def owner_view() -> dict[str, Any]:
        reply = httpx.get(f"{second.base_url}/tasks/{task_id}", headers=own)
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    assert owner_view()["status"] in ("pending", "running"), "an own-key task was failed by the restart"
    done = wait_until(lambda: (v := owner_view())["status"] == "succeeded" and v, 6, "the resumed task")
    assert done["data"][0]["url"].startswith(sims.xffuw_url)
    assert sims.xffuw.count("task") > polls
    assert {c.key for c in sims.xffuw.calls if c.endpoint == "task"} == {OWN_KEY}
    assert sims.xffuw.count("image") == 1
