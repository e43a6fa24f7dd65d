"""Budgets hold under concurrency: a request reserves its expected cost before it calls an
upstream, so requests sent at once never spend more together than the budget allows."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from conftest import RunningProxy, Sims
from helpers import AUTH, admin_get, fast_tasks, with_admin


def spent(proxy: RunningProxy) -> float:
    return float(admin_get(proxy.url, "/admin/usage", group_by="client").json()["total"]["cost"])


def test_thirty_images_at_once_spend_no_more_than_the_budget(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    fast_tasks(proxy_config, sims)
    proxy_config["clients"][0]["budget"] = 10  # gpt-image-2 costs 2: five fit
    proxy = start_proxy(with_admin(proxy_config))
    with ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(lambda i: httpx.post(
            proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
            json={"model": "gpt-image-2", "prompt": f"cat {i} [delay=0.3]"}), range(30)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) == 5 and statuses.count(429) == 25, statuses
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in replies if r.status_code == 429)
    assert sims.xffuw.count("image") == 5
    assert spent(proxy) == 10.0


def test_fifty_chats_at_once_spend_no_more_than_the_budget(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 10  # gpt-4o-mini costs 0.5: twenty fit
    proxy = start_proxy(with_admin(proxy_config))
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda i: httpx.post(
            proxy.base_url + "/chat/completions", headers=AUTH, timeout=30,
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i} [delay=0.2]"}]}),
            range(50)))
    assert sum(r.status_code == 200 for r in replies) == 20
    assert sims.xffuw.count("chat") == 20
    assert spent(proxy) == 10.0


def test_a_hold_is_released_when_the_call_cost_nothing(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 2  # exactly one gpt-image-2
    proxy = start_proxy(with_admin(proxy_config))
    blocked = httpx.post(proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
                         json={"model": "gpt-image-2", "prompt": "a cat [blocked]"})  # refused upstream, unpaid
    assert blocked.status_code == 400, blocked.text
    ok = httpx.post(proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
                    json={"model": "gpt-image-2", "prompt": "a cat"})
    assert ok.status_code == 200, ok.text
    again = httpx.post(proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
                       json={"model": "gpt-image-2", "prompt": "a cat"})
    assert again.status_code == 429 and "held" not in again.json()["error"]["message"]
    assert spent(proxy) == 2.0


def test_n_images_hold_n_times_the_price(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                         proxy_config: dict[str, Any], sims: Sims) -> None:
    fast_tasks(proxy_config, sims)
    proxy_config["clients"][0]["budget"] = 5
    proxy = start_proxy(with_admin(proxy_config))
    three = httpx.post(proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
                       json={"model": "gpt-image-2", "prompt": "three", "n": 3})
    assert three.status_code == 429 and "would cost 6" in three.json()["error"]["message"]
    two = httpx.post(proxy.base_url + "/images/generations", headers=AUTH, timeout=30,
                     json={"model": "gpt-image-2", "prompt": "two", "n": 2})
    assert two.status_code == 200, two.text
    assert sims.xffuw.count("image") == 2
