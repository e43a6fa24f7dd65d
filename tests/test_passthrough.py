"""[auth] passthrough under careless and hostile use: probing keys through the proxy is
limited per address, a made-up key sees no model list and adds no metrics series, and a task
started with someone's own key survives a restart."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from conftest import RunningProxy, Sims
from helpers import (
    ADMIN,
    AUTH,
    admin_get,
    error_of,
    fast_tasks,
    logged_requests,
    post_image,
    task_ids,
    wait_until,
    with_admin,
)
from test_admin import metric_samples, sample

from proxy.clients import OWN_KEY_CHECKS, PASSTHROUGH_FAILURES
from proxy.pool import fingerprint

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


def own(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def upstream_checks(sims: Sims, prefix: str) -> int:
    return sum(1 for c in sims.xffuw.calls if c.endpoint == "models" and (c.key or "").startswith(prefix))


def test_a_made_up_own_key_sees_no_models_and_its_verdict_is_kept(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(proxy_config)
    for path in ("/models", "/models/gpt-4o-mini", "/models", "/models/fengyuan/image_generation"):
        error = error_of(httpx.get(proxy.base_url + path, headers=own("xf_made_up_1234")), 401)
        assert error["code"] == "invalid_api_key" and "xffuw refused the key" in error["message"], error
        assert "xf_made_up_1234" not in error["message"]
    assert upstream_checks(sims, "xf_made_up_") == 1, "the verdict is kept: asked once"


def test_an_own_key_sees_its_upstreams_models_once_accepted(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(proxy_config)
    listed = [httpx.get(proxy.base_url + "/models", headers=own(OWN_KEY)) for _ in range(3)]
    assert [r.status_code for r in listed] == [200] * 3, listed[0].text
    models = listed[0].json()["data"]
    assert models and {m["owned_by"] for m in models} == {"xffuw"}
    everyone = httpx.get(proxy.base_url + "/models", headers=AUTH).json()["data"]
    assert {m["owned_by"] for m in everyone} > {"xffuw"}  # the proxy's clients see every upstream
    assert httpx.get(proxy.base_url + "/models/gpt-4o-mini", headers=own(OWN_KEY)).status_code == 200
    elsewhere = httpx.get(proxy.base_url + "/models/fengyuan/image_generation", headers=own(OWN_KEY))
    assert error_of(elsewhere)["param"] == "model"  # served by another upstream than the key's
    assert upstream_checks(sims, OWN_KEY) == 1, "the verdict is kept: asked once"


def test_a_flood_of_made_up_own_keys_costs_a_bounded_number_of_upstream_calls(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(proxy_config)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: httpx.get(proxy.base_url + "/models", headers=own(f"xf_flood_{i:04d}")),
                                range(60)))
    assert {r.status_code for r in replies} == {401, 429}
    assert all(error_of(r, r.status_code)["code"] in ("invalid_api_key", "rate_limit_exceeded") for r in replies)
    assert upstream_checks(sims, "xf_flood_") <= min(OWN_KEY_CHECKS, PASSTHROUGH_FAILURES)


def test_own_keys_share_one_metrics_series_and_keep_their_fingerprint_in_the_log_and_usage(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims,
        capsys: Any) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(with_admin(proxy_config))
    assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=own(OWN_KEY)).status_code == 200
    for i in range(40):
        httpx.get(proxy.base_url + "/models", headers=own(f"xf_series_{i:04d}_abc"))
    mine = f"own-key:{fingerprint(OWN_KEY)}"
    [logged] = [e for e in logged_requests(capsys, 41) if e["path"] == "/v1/chat/completions"]
    assert logged["client"] == mine
    usage = wait_until(lambda: admin_get(proxy, "/admin/usage").json()["data"], what="the own key's usage")
    assert [row["group"] for row in usage] == [mine]

    def counted() -> dict[Any, float] | None:  # the counter is bumped after the answer is sent
        found = metric_samples(httpx.get(proxy.url + "/metrics", headers=ADMIN).text)
        refused = sum(v for (name, labels), v in found.items() if name == "proxy_requests_total"
                      and dict(labels)["status"] in ("401", "429"))
        return found if refused == 40 else None

    found = wait_until(counted, what="every refused request counted")
    series = [dict(labels) for (name, labels), _ in found.items() if name == "proxy_requests_total"]
    assert {s["client"] for s in series} <= {"own-key", ""}, series  # "": refused before it was identified
    assert sample(found, "proxy_requests_total", client="own-key", model="gpt-4o-mini", status="200") == 1
    assert len(series) <= 4, series  # own-key 200 and 401, 429, and the /metrics reads


def test_made_up_keys_from_an_address_do_not_lock_out_an_own_key_its_upstream_accepted(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    fast_tasks(proxy_config, sims)
    proxy_config["auth"] = {"passthrough": True}
    proxy = start_proxy(proxy_config)
    (task_id,) = task_ids(post_image(proxy.url, "my own heron", model="gpt-image-2", headers=own(OWN_KEY)))
    # the same address (behind a load balancer: everyone's) probes keys until both its limits are reached
    probes = [httpx.get(proxy.base_url + "/models", headers=own(f"xf_probe_{i:04d}")).status_code
              for i in range(max(OWN_KEY_CHECKS, PASSTHROUGH_FAILURES) + 2)]
    assert probes[:PASSTHROUGH_FAILURES] == [401] * PASSTHROUGH_FAILURES and probes[-1] == 429, probes
    since = len(sims.xffuw.calls)
    listed = httpx.get(proxy.base_url + "/models", headers=own(OWN_KEY))
    assert listed.status_code == 200, listed.text  # a new check for it, past the limit for new keys
    assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=own(OWN_KEY)).status_code == 200
    view = httpx.get(f"{proxy.base_url}/tasks/{task_id}", headers=own(OWN_KEY))
    assert view.status_code == 200, view.text
    for reply in (httpx.get(proxy.base_url + "/models", headers=own("xf_probe_more")),
                  httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=own("xf_probe_more"))):
        assert error_of(reply, 429)["code"] == "rate_limit_exceeded"
    assert not [c for c in sims.xffuw.calls[since:] if (c.key or "").startswith("xf_probe_")], "probing went on"
