"""Ten times the work per upstream key: one Fengyuan list call polls many tasks, what the list
does not answer is polled alone, a key's polls share its window without a 429, and a model's
learnt durations place its first poll."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims
from helpers import AUTH, image_burst, wait_until

FY_IMAGE = "fengyuan/image_generation"


def fengyuan_only(config: dict[str, Any], **table: Any) -> None:
    config["providers"] = {"fengyuan": {**config["providers"]["fengyuan"], **table}}
    config["aliases"] = {}
    config["tasks"] = {"poll_interval": 0.2, "first_poll": 0.1, "timeout": 20}


def answered(results: list[Any]) -> list[str]:
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    return [r.data[0].url for r in results]


def test_one_list_call_answers_many_tasks_across_pages(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    fengyuan_only(proxy_config)
    sims.fengyuan.task_seconds = 0.6
    sims.fengyuan.list_page_max = 5  # twelve tasks: three pages
    proxy = start_proxy(proxy_config)
    urls = answered(image_burst(proxy, 12))
    assert len(set(urls)) == 12
    assert sims.fengyuan.count("invoke") == 12
    lists, details = sims.fengyuan.count("task_list"), sims.fengyuan.count("task")
    assert lists >= 3 and details == 0, (lists, details)
    assert lists < 12 * 0.6 / 0.2, "not fewer calls than one poll per task"


@pytest.mark.parametrize("envelope", ["documented", "observed"])
def test_the_list_is_read_in_both_envelopes(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                            proxy_config: dict[str, Any], sims: Sims, envelope: str) -> None:
    fengyuan_only(proxy_config)
    sims.fengyuan.envelope = envelope  # type: ignore[assignment]
    proxy = start_proxy(proxy_config)
    assert len(answered(image_burst(proxy, 4))) == 4
    assert sims.fengyuan.count("task") == 0 and sims.fengyuan.count("task_list") >= 1


def test_a_task_the_list_does_not_show_is_polled_alone(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    fengyuan_only(proxy_config)
    proxy = start_proxy(proxy_config)
    sims.fengyuan.list_hidden = {"task_" + __import__("hashlib").sha1(b"0:1").hexdigest()[:10]}  # the first task
    urls = answered(image_burst(proxy, 3))
    assert len(urls) == 3
    details = [c for c in sims.fengyuan.calls if c.endpoint == "task"]
    assert details, "the hidden task was never polled on its own"
    assert sims.fengyuan.count("task_list") >= 1


@pytest.mark.parametrize("broken", ["missing", "garbled"])
def test_a_key_without_a_usable_list_is_polled_task_by_task(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims,
        broken: str, capfd: pytest.CaptureFixture[str]) -> None:
    fengyuan_only(proxy_config)
    if broken == "missing":
        sims.fengyuan.list_enabled = False  # 404
    else:
        sims.fengyuan.list_garbled = True  # an answer of no known shape
    proxy = start_proxy(proxy_config)
    assert len(answered(image_burst(proxy, 4))) == 4
    assert len(answered(image_burst(proxy, 2, prompt="again"))) == 2
    assert sims.fengyuan.count("task_list") == 1, "the list was asked again after it proved unusable"
    assert sims.fengyuan.count("task") >= 6
    said = [json.loads(line) for line in capfd.readouterr().err.splitlines()
            if line.startswith("{") and "task_list_unavailable" in line]
    assert len(said) == 1 and said[0]["key"] and FENGYUAN_KEYS[0] not in json.dumps(said)


def test_a_starved_key_causes_no_429_and_loses_no_task(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """Twenty tasks on a key of 12 calls per 2 s, every request timing out first: the tasks go on,
    each is answered later, none is given up, and the upstream never answers 429."""
    window = 2.0
    sims.fengyuan.rate_window = window
    sims.fengyuan.rate_limit_normal = 12
    sims.fengyuan.list_enabled = False  # the hard case: a poll per task
    sims.fengyuan.task_seconds = 0.5
    fengyuan_only(proxy_config, rate_window=window, rpm=12, queue_timeout=30)
    proxy_config["tasks"] = {"poll_interval": 0.2, "first_poll": 0.1, "timeout": 1.0, "late_poll_interval": 0.4}
    proxy = start_proxy(proxy_config)
    results = image_burst(proxy, 20)
    timed_out = [r for r in results if isinstance(r, BaseException)]
    others = [r for r in timed_out if getattr(r, "status_code", None) != 504]
    assert not others, others[:3]
    ids = [tid for r in timed_out for tid in r.response.headers["x-proxy-task-ids"].split(",")]  # type: ignore[union-attr]
    def all_done() -> bool:
        return all(httpx.get(f"{proxy.base_url}/tasks/{tid}", headers=AUTH).json()["status"] == "succeeded"
                   for tid in ids)

    deadline = time.monotonic() + 30
    while not all_done():
        assert time.monotonic() < deadline, "a timed-out task was never finished"
        time.sleep(0.3)
    assert sims.fengyuan.rate_limited_count == 0
    assert sims.fengyuan.count("invoke") == 20


def test_a_models_learnt_duration_places_its_first_poll(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.task_seconds = 1.0
    proxy_config["tasks"] = {"poll_interval": 0.2, "first_poll": 0.05, "timeout": 20}
    proxy = start_proxy(proxy_config)
    answered(image_burst(proxy, 5, model="gpt-image-2", prompt="learn"))  # five durations: enough to learn
    before = sims.xffuw.count("task")
    assert before >= 5 * 3, "the first tasks were polled from first_poll on"
    answered(image_burst(proxy, 5, model="gpt-image-2", prompt="learnt"))
    polls = sims.xffuw.count("task") - before
    assert polls <= 5 * 2 and polls < before, f"{polls} polls for 5 tasks of a model whose duration is known"


def test_a_task_the_upstream_forgot_fails_after_a_few_polls(proxy: RunningProxy, sims: Sims) -> None:
    sims.xffuw.task_seconds = 30

    def forget() -> None:
        wait_until(lambda: sims.xffuw.tasks, 5, "the task")
        sims.xffuw.tasks.clear()  # task.php answers "task not found" from now on

    with ThreadPoolExecutor(1) as pool:
        pool.submit(forget)
        reply = httpx.post(f"{proxy.base_url}/images/generations", headers=AUTH, timeout=30,
                           json={"model": "gpt-image-2", "prompt": "forgotten", "response_format": "url"})
    error = reply.json()["error"]
    assert reply.status_code == 502 and error["code"] == "upstream_task_failed", reply.text
    assert "no longer knows" in error["message"]
    assert sims.xffuw.count("task") <= 6


def test_a_restart_keeps_counting_a_keys_window(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    """The upstream still counts the calls the last process made: the next one must too."""
    window = 20.0  # longer than a stop and a start take
    sims.xffuw.rate_limit, sims.xffuw.rate_window = 6, window
    proxy_config["providers"]["xffuw"].update(keys=[XFFUW_KEYS[0]], rate_window=window, rpm=6, queue_timeout=0.2)
    first = start_proxy(proxy_config)
    client = first.client()
    statuses = []
    for i in range(6):  # the catalogue read and five chats fill the window
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{i}"}])
            statuses.append(200)
        except Exception as exc:
            statuses.append(getattr(exc, "status_code", 0))
    first.server.stop()
    second = start_proxy(proxy_config)
    for i in range(3):
        try:
            second.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{i}"}])
        except Exception as exc:
            assert getattr(exc, "status_code", 0) == 429, exc  # the proxy's own 429: it waits for room
    assert sims.xffuw.rate_limited_count == 0, "the restarted proxy pushed the key past its limit"
    assert 200 in statuses
