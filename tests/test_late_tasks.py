"""A paid task is never given up while the upstream may still finish it: after a request's
timeout (504) its tasks go on being polled, more slowly, until final or `give_up_after`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from conftest import RunningProxy, Sims
from helpers import AUTH, admin_get, error_of, post_image, task_ids, wait_until, with_admin

LATE = {"poll_interval": 0.05, "first_poll": 0.05, "timeout": 0.5, "late_poll_interval": 0.2}


def task_view(proxy: RunningProxy, task_id: str) -> dict[str, Any]:
    reply = httpx.get(f"{proxy.base_url}/tasks/{task_id}", headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_a_task_finishing_after_its_request_timed_out_is_kept_and_billed(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = dict(LATE)
    proxy = start_proxy(with_admin(proxy_config))
    reply = post_image(proxy.url, "a slow heron [delay=1.2]")
    error = error_of(reply, 504)
    (task_id,) = task_ids(reply)
    assert "keeps running" in error["message"] and reply.headers["x-should-retry"] == "false"
    assert task_view(proxy, task_id)["status"] in ("pending", "running")
    done = wait_until(lambda: (v := task_view(proxy, task_id))["status"] == "succeeded" and v, 5, "the late end")
    assert done["data"][0]["url"].startswith(sims.xffuw_url)
    assert sims.xffuw.count("image") == 1
    polls = sims.xffuw.count("task")
    assert polls <= 2 + 1.2 / 0.05, polls  # slower once late: not every poll_interval
    report = wait_until(lambda: (r := admin_get(proxy.url, "/admin/usage").json())["data"] and r, 3, "usage")
    assert report["total"] == {"requests": 1, "cost": 2.0, "failed": 0}


def test_a_repeat_with_the_same_key_answers_the_late_result(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = dict(LATE)
    proxy = start_proxy(proxy_config)
    key = {"idempotency-key": "late-heron"}
    first = post_image(proxy.url, "a slow heron [delay=1.5]", headers=key)
    assert first.status_code == 504
    again = post_image(proxy.url, "a slow heron [delay=1.5]", headers=key)  # still running: 504 again
    assert again.status_code == 504 and task_ids(again) == task_ids(first), again.text
    final = wait_until(lambda: (r := post_image(proxy.url, "a slow heron [delay=1.5]", headers=key)).status_code
                       == 200 and r, 5, "the repeat's result")
    assert final.json()["data"][0]["url"].startswith(sims.xffuw_url)
    replay = post_image(proxy.url, "a slow heron [delay=1.5]", headers=key)
    assert replay.content == final.content and replay.headers["idempotent-replayed"] == "true"
    assert sims.xffuw.count("image") == 1


def test_a_task_is_given_up_only_after_give_up_after(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = {**LATE, "give_up_after": 1.2 / 3600}  # 1.2 s
    proxy = start_proxy(with_admin(proxy_config))
    reply = post_image(proxy.url, "never ends [never]")
    (task_id,) = task_ids(reply)
    assert reply.status_code == 504 and task_view(proxy, task_id)["status"] in ("pending", "running")
    view = wait_until(lambda: (v := task_view(proxy, task_id))["status"] == "timeout" and v, 5, "the give-up")
    assert view["error"]["code"] == "upstream_timeout" and "given up" in view["error"]["message"]
    report = wait_until(lambda: (r := admin_get(proxy.url, "/admin/usage").json())["total"]["failed"] == 0
                        and r["data"] and r, 3, "usage")
    assert report["total"]["requests"] == 1


def test_a_late_task_is_resumed_after_a_restart(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = dict(LATE)
    first = start_proxy(proxy_config)
    reply = post_image(first.url, "slow across a restart [delay=2]")
    (task_id,) = task_ids(reply)
    assert reply.status_code == 504
    first.server.stop()
    second = start_proxy(proxy_config)
    view = wait_until(lambda: (v := task_view(second, task_id))["status"] == "succeeded" and v, 6, "the result")
    assert view["data"][0]["url"].startswith(sims.xffuw_url)
    assert sims.xffuw.count("image") == 1
