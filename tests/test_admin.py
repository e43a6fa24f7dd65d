"""Administration (issue 3): the admin key, /admin/keys (never a key), disable and enable,
/admin/reload and SIGHUP re-reading the config without dropping requests in flight, a bad
new config refused, /admin/usage and /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, OTHER_CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import (
    ADMIN_KEY,
    admin_keys,
    admin_request,
    call_in_flight,
    calls_by_key,
    chat,
    free_port,
    in_background,
    one_call_at_a_time,
    to_toml,
    usage_report,
    wait_until,
    with_admin,
)
from openai_spec import validate_error
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.config import load_config, sha256_hex
from proxy.pool import fingerprint
from proxy.server import BackgroundServer

K0, K1 = XFFUW_KEYS
FY_NORMAL = FENGYUAN_KEYS[0]
SECOND_ADMIN_KEY = "adm-test-second-9876543210"
CAROL_KEY = "sk-test-carol-5555555555"
REPO = Path(__file__).resolve().parent.parent


# ---- helpers -----------------------------------------------------------------------


class FileProxy(RunningProxy):
    path: Path

    def write(self, raw: dict[str, Any] | str) -> None:
        self.path.write_text(raw if isinstance(raw, str) else to_toml(raw), encoding="utf-8")

    def reload(self) -> httpx.Response:
        return admin_request(self, "POST", "/admin/reload")


@pytest.fixture
def file_proxy(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], FileProxy]]:
    """A proxy started from a TOML file (so /admin/reload can re-read it)."""
    started: list[BackgroundServer] = []

    def start(raw: dict[str, Any]) -> FileProxy:
        path = tmp_path / "proxy.toml"
        path.write_text(to_toml(raw), encoding="utf-8")
        server = BackgroundServer(create_app(load_config(path), path)).start()
        started.append(server)
        proxy = FileProxy(server.url, server)
        proxy.path = path
        return proxy

    yield start
    for server in started:
        server.stop()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


ADMIN_ROUTES = [("GET", "/admin/keys"), ("POST", f"/admin/keys/{fingerprint(K0)}/disable"),
                ("POST", f"/admin/keys/{fingerprint(K0)}/enable"), ("POST", "/admin/reload"),
                ("GET", "/admin/usage"), ("GET", "/admin/usage?format=csv"), ("GET", "/metrics")]


def secrets_of(config: dict[str, Any]) -> list[str]:
    found = [c["key"] for c in config["clients"] if c.get("key")] + list(config.get("admin", {}).get("keys", []))
    for table in config["providers"].values():
        found += list(table.get("keys", [])) + [k["value"] for k in table.get("key", [])]
    return found


# ---- the admin key -----------------------------------------------------------------


def test_without_an_admin_key_every_admin_route_answers_401(start_proxy: Callable[..., RunningProxy],
                                                            proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy = start_proxy(proxy_config)
    chat(proxy.client())
    for method, path in ADMIN_ROUTES:
        for key in (None, CLIENT_KEY, ADMIN_KEY):
            reply = admin_request(proxy, method, path, key)
            assert reply.status_code == 401, (method, path, key, reply.text)
            validate_error(reply.json())
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert "[admin]" in reply.json()["error"]["message"]
    # The disable above was refused: both keys still serve.
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(proxy.client(), f"still {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 2, K1: 2}


def test_a_wrong_admin_key_answers_401(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                       sims: Sims) -> None:
    proxy_config["admin"] = {"keys": [ADMIN_KEY], "keys_sha256": [sha256_hex(SECOND_ADMIN_KEY)]}
    proxy = start_proxy(proxy_config)
    for method, path in ADMIN_ROUTES:
        for key in (CLIENT_KEY, ADMIN_KEY + "x", sha256_hex(SECOND_ADMIN_KEY)):
            reply = admin_request(proxy, method, path, key)
            assert reply.status_code == 401, (method, path, key, reply.text)
            validate_error(reply.json())
            assert reply.json()["error"]["code"] == "invalid_api_key"
    assert admin_request(proxy, "GET", "/admin/keys").status_code == 200
    assert admin_request(proxy, "GET", "/metrics", SECOND_ADMIN_KEY).status_code == 200  # by its sha256
    # The admin key is not a client key.
    with pytest.raises(openai.AuthenticationError):
        chat(proxy.client(ADMIN_KEY))


# ---- /admin/keys, disable, enable --------------------------------------------------


def test_admin_keys_shows_each_key_by_fingerprint_and_never_a_secret(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 100
    proxy = start_proxy(with_admin(proxy_config))
    wait_until(lambda: admin_keys(proxy)[fingerprint(FY_NORMAL)]["credits"] is not None, what="credits")
    chat(proxy.client(), "warm")
    del sims.xffuw.keys[K0]  # revoked upstream
    for i in range(3):
        chat(proxy.client(), f"after {i}")
    views = admin_keys(proxy)
    assert set(views) == {fingerprint(K0), fingerprint(K1), fingerprint(FY_NORMAL)}
    fields = {"fingerprint", "provider", "state", "reason", "until", "in_flight", "requests", "failures",
              "credits", "vip_level"}
    assert all(fields <= set(v) for v in views.values()), views
    revoked, good, fy = views[fingerprint(K0)], views[fingerprint(K1)], views[fingerprint(FY_NORMAL)]
    assert (revoked["provider"], revoked["state"], revoked["failures"]) == ("xffuw", "disabled", 1)
    assert "invalid" in revoked["reason"].lower()
    assert (good["state"], good["reason"], good["until"], good["in_flight"]) == ("active", None, None, 0)
    assert good["requests"] >= 3
    assert (fy["provider"], fy["credits"], fy["vip_level"]) == ("fengyuan", 100_000.0, 0)
    # A key set aside for a while shows until when.
    sims.xffuw.keys[K1] = 0.0
    with pytest.raises(openai.RateLimitError):
        chat(proxy.client(), "broke")
    aside = admin_keys(proxy)[fingerprint(K1)]
    assert aside["state"] == "exhausted" and aside["until"] > time.time() + 200  # recheck_after 300
    # No admin answer carries a secret.
    bodies = [admin_request(proxy, method, path).text for method, path in ADMIN_ROUTES if path != "/admin/reload"]
    bodies.append(admin_request(proxy, "POST", "/admin/reload").text)  # refused: no config file
    bodies += [admin_request(proxy, "GET", "/admin/usage", group_by=g).text for g in ("model", "day", "upstream")]
    bodies.append(admin_request(proxy, "POST", "/admin/keys/nosuchkey/disable").text)
    for secret in secrets_of(proxy_config):
        for body in bodies:
            assert secret not in body, (secret, body[:300])


def test_disable_and_enable_a_key(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                  sims: Sims) -> None:
    proxy = start_proxy(with_admin(proxy_config))
    client = proxy.client()
    chat(client, "warm")
    reply = admin_request(proxy, "POST", f"/admin/keys/{fingerprint(K0)}/disable")
    assert reply.status_code == 200
    assert reply.json() == {"fingerprint": fingerprint(K0), "provider": "xffuw", "state": "disabled"}
    view = admin_keys(proxy)[fingerprint(K0)]
    assert view["state"] == "disabled" and view["reason"]
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(client, f"aside {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K1: 4}
    assert admin_request(proxy, "POST", f"/admin/keys/{fingerprint(K0)}/enable").json()["state"] == "active"
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(client, f"back {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 2, K1: 2}
    missing = admin_request(proxy, "POST", "/admin/keys/000000000000/enable")
    assert missing.status_code == 404
    validate_error(missing.json())
    assert missing.json()["error"]["code"] == "not_found"


def test_an_invalid_key_comes_back_by_enable_and_on_reload(file_proxy: Callable[..., FileProxy],
                                                           proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy = file_proxy(with_admin(proxy_config))
    client = proxy.client()
    chat(client, "warm")

    def revoke_until_disabled() -> None:
        del sims.xffuw.keys[K0]
        for i in range(2):
            chat(client, f"revoked {i}")
        assert admin_keys(proxy)[fingerprint(K0)]["state"] == "disabled"
        sims.xffuw.keys[K0] = 1_000.0  # the upstream accepts it again; the proxy does not know
        start = len(sims.xffuw.calls)
        for i in range(2):
            chat(client, f"still aside {i}")
        assert calls_by_key(sims.xffuw, "chat", start) == {K1: 2}

    revoke_until_disabled()
    assert admin_request(proxy, "POST", f"/admin/keys/{fingerprint(K0)}/enable").status_code == 200
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(client, f"enabled {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 2, K1: 2}

    revoke_until_disabled()
    reply = proxy.reload()
    assert reply.status_code == 200, reply.text
    assert admin_keys(proxy)[fingerprint(K0)]["state"] == "active"
    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(client, f"reloaded {i}")
    assert calls_by_key(sims.xffuw, "chat", start) == {K0: 2, K1: 2}


# ---- reload ------------------------------------------------------------------------


def test_reload_rereads_clients_keys_and_limits(file_proxy: Callable[..., FileProxy],
                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["providers"]["xffuw"]["keys"] = [K0]
    proxy = file_proxy(with_admin(proxy_config))
    chat(proxy.client(), "alice before")
    chat(proxy.client(OTHER_CLIENT_KEY), "bob before")
    with pytest.raises(openai.AuthenticationError):
        chat(proxy.client(CAROL_KEY))
    changed = json.loads(json.dumps(proxy_config))
    changed["clients"] = [{"name": "alice", "key": CLIENT_KEY, "models": ["deepseek-chat"], "rpm": 2},
                          {"name": "carol", "key": CAROL_KEY}]
    changed["providers"]["xffuw"]["keys"] = [K1]
    proxy.write(changed)
    reply = proxy.reload()
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "reloaded" and reply.json()["clients"] == 2
    chat(proxy.client(CAROL_KEY), "carol is new")  # a new client
    with pytest.raises(openai.AuthenticationError):  # a removed one
        chat(proxy.client(OTHER_CLIENT_KEY), "bob after")
    with pytest.raises(openai.PermissionDeniedError):  # new allowed models
        chat(proxy.client(), "alice after")
    chat(proxy.client(), "alice after", model="deepseek-chat")
    with pytest.raises(openai.RateLimitError) as caught:  # a new rpm (the 403 above counted too)
        chat(proxy.client(), "alice again", model="deepseek-chat")
    assert caught.value.body["code"] == "rate_limit_exceeded"
    xffuw = {fp for fp, v in admin_keys(proxy).items() if v["provider"] == "xffuw"}
    assert xffuw == {fingerprint(K1)}  # the new key list
    chats = [c.key for c in sims.xffuw.calls if c.endpoint == "chat"]
    assert chats == [K0, K0, K1, K1]


def test_a_bad_new_config_is_refused_and_the_old_one_keeps_serving(file_proxy: Callable[..., FileProxy],
                                                                   proxy_config: dict[str, Any],
                                                                   sims: Sims) -> None:
    proxy = file_proxy(with_admin(proxy_config))
    chat(proxy.client(), "before")
    bad = json.loads(json.dumps(proxy_config))
    bad["clients"].append({"name": "carol"})  # neither key nor key_sha256
    for text, reason in ((to_toml(bad), "clients[2]"),
                         ("[[clients]\nname = 'x'\n", "TOML"),
                         (to_toml({**bad, "clients": [{"name": "carol", "key": CAROL_KEY, "colour": "red"}]}),
                          "colour")):
        proxy.write(text)
        reply = proxy.reload()
        assert reply.status_code == 400, reply.text
        validate_error(reply.json())
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert reason in reply.json()["error"]["message"], reply.json()
        chat(proxy.client(), "old config")
        chat(proxy.client(OTHER_CLIENT_KEY), "old config")
        with pytest.raises(openai.AuthenticationError):
            chat(proxy.client(CAROL_KEY), "not in the old config")
    assert admin_request(proxy, "GET", "/admin/keys").status_code == 200  # the old admin key still holds


def test_reload_without_a_config_file_is_refused(start_proxy: Callable[..., RunningProxy],
                                                 proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy = start_proxy(with_admin(proxy_config))
    reply = admin_request(proxy, "POST", "/admin/reload")
    assert reply.status_code == 400
    validate_error(reply.json())
    chat(proxy.client())


def test_reload_adding_a_client_while_a_long_image_is_in_flight(file_proxy: Callable[..., FileProxy],
                                                                proxy_config: dict[str, Any],
                                                                sims: Sims) -> None:
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 20}
    proxy = file_proxy(with_admin(proxy_config))
    alice = proxy.client()
    alice.models.list()
    image, box = in_background(lambda: alice.images.generate(model="gpt-image-2", prompt="[delay=2] 一只慢猫"))
    wait_until(lambda: sims.xffuw.count("image") == 1 and sims.xffuw.count("task") >= 1, what="the task polled")
    added = json.loads(json.dumps(proxy_config))
    added["clients"].append({"name": "carol", "key": CAROL_KEY})
    proxy.write(added)
    assert proxy.reload().status_code == 200
    chat(proxy.client(CAROL_KEY), "carol at once")
    assert image.is_alive()  # carol was served while the image was still being made
    image.join(15)
    assert "error" not in box, box.get("error")
    assert box["result"].data[0].url
    task = next(iter(sims.xffuw.tasks.values()))
    assert {c.key for c in sims.xffuw.calls if c.endpoint == "task"} == {task.key}
    report = usage_report(proxy)
    assert {r["group"]: (r["requests"], r["failed"]) for r in report["data"]} == {"alice": (1, 0), "carol": (1, 0)}


def test_reload_while_a_chat_is_in_flight_leaves_the_key_free_afterwards(file_proxy: Callable[..., FileProxy],
                                                                        proxy_config: dict[str, Any],
                                                                        sims: Sims) -> None:
    one_call_at_a_time(proxy_config, K0, queue_timeout=1.0)
    proxy = file_proxy(with_admin(proxy_config))
    client = proxy.client()
    client.models.list()
    slow, box = call_in_flight(proxy, K0, lambda: chat(client, "[delay=1] slow"))
    assert proxy.reload().status_code == 200
    slow.join(10)
    assert "error" not in box, box.get("error")  # the chat in flight was not dropped
    chat(client, "the key is free again")  # max_concurrent 1: only if the ended call was released
    assert admin_keys(proxy)[fingerprint(K0)]["in_flight"] == 0


def test_sighup_rereads_the_config(proxy_config: dict[str, Any], sims: Sims, tmp_path: Path) -> None:
    path, log_path = tmp_path / "proxy.toml", tmp_path / "proxy.log"
    path.write_text(to_toml(with_admin(proxy_config)), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30, what="the proxy process")
        alice = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
        carol = openai.OpenAI(base_url=f"{url}/v1", api_key=CAROL_KEY, max_retries=0, timeout=30)
        chat(alice, "before")
        with pytest.raises(openai.AuthenticationError):
            chat(carol)
        added = json.loads(json.dumps(proxy_config))
        added["clients"].append({"name": "carol", "key": CAROL_KEY})
        path.write_text(to_toml(added), encoding="utf-8")
        os.kill(process.pid, signal.SIGHUP)

        def carol_in() -> bool:
            try:
                chat(carol, "carol")
                return True
            except openai.AuthenticationError:
                return False

        wait_until(carol_in, what="carol after SIGHUP")
        path.write_text("[[clients]\nbroken", encoding="utf-8")
        os.kill(process.pid, signal.SIGHUP)
        wait_until(lambda: "config_reload_refused" in log_path.read_text(errors="replace"), what="the refusal logged")
        assert process.poll() is None
        chat(alice, "after a bad file")
        chat(carol, "after a bad file")
        assert admin_request(url, "GET", "/admin/keys").status_code == 200
    finally:
        process.terminate()
        process.wait(20)


# ---- usage -------------------------------------------------------------------------


def test_usage_times_that_are_no_time_are_a_400_naming_them(start_proxy: Callable[..., RunningProxy],
                                                           proxy_config: dict[str, Any]) -> None:
    proxy = start_proxy(with_admin(proxy_config))
    for value in ("inf", "-inf", "nan", "1e400", "1e300", "-1e300", "abc", "1_0", "\u0661", " 1", "0x10"):
        for name in ("since", "until"):
            reply = admin_request(proxy, "GET", "/admin/usage", **{name: value})
            assert reply.status_code == 400, (name, value, reply.text)
            validate_error(reply.json())
            assert reply.json()["error"]["param"] == name
    for good in ("0", "1.5e9", "-86400.5", ".5", "2026-11-01", "2026-11-01T12:00+08:00"):
        assert admin_request(proxy, "GET", "/admin/usage", since=good, until=good).status_code == 200, good


# ---- metrics -----------------------------------------------------------------------


def test_metrics(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 1.0
    proxy_config["clients"][1]["budget"] = 10.0
    proxy_config["clients"][1]["budget_period"] = "daily"
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 20}
    proxy = start_proxy(with_admin(proxy_config))
    alice, bob = proxy.client(), proxy.client(OTHER_CLIENT_KEY)
    chat(alice, "one")
    chat(alice, "two")
    with pytest.raises(openai.RateLimitError):
        chat(alice, "over budget")
    with pytest.raises(openai.NotFoundError):
        chat(alice, model="no-such-model")
    image, box = in_background(lambda: bob.images.generate(model="gpt-image-2", prompt="[delay=1] 猫"))
    wait_until(lambda: sims.xffuw.count("image") == 1, what="the image task")
    admin_request(proxy, "POST", f"/admin/keys/{fingerprint(K0)}/disable")

    reply = admin_request(proxy, "GET", "/metrics")
    assert reply.headers.get_list("content-type") == ["text/plain; version=0.0.4; charset=utf-8"]
    during = metric_samples(reply.text)
    assert sample(during, "proxy_tasks_waiting") == 1
    image.join(10)
    assert "error" not in box, box.get("error")

    def scraped() -> dict[Any, float] | None:  # the request counter is bumped after the answer is sent
        found = metric_samples(admin_request(proxy, "GET", "/metrics").text)
        return found if sample(found, "proxy_requests_total", client="bob", model="gpt-image-2",
                               status="200") == 1 else None

    found = wait_until(scraped, what="bob's image counted")
    assert sample(found, "proxy_requests_total", client="alice", model="gpt-4o-mini", status="200") == 2
    assert sum(v for (name, labels), v in found.items() if name == "proxy_requests_total"
               and ("client", "alice") in labels and ("status", "429") in labels) == 1
    assert sum(v for (name, labels), v in found.items() if name == "proxy_requests_total"
               and ("client", "alice") in labels and ("status", "404") in labels) == 1
    latency = {dict(labels)["operation"]: v for (name, labels), v in found.items()
               if name == "proxy_upstream_latency_seconds_count" and ("upstream", "xffuw") in labels}
    chat_op = next(op for op in latency if "chat" in op)
    assert latency[chat_op] == 2
    assert sample(found, "proxy_upstream_latency_seconds_bucket", upstream="xffuw", operation=chat_op,
                  le="+Inf") == 2
    assert sum(v for (name, labels), v in found.items() if name == "proxy_upstream_latency_seconds_bucket"
               and ("operation", chat_op) in labels and dict(labels)["le"] == "10.0") == 2
    assert any("task" in op and v >= 1 for op, v in latency.items())  # polls are timed too
    assert not any(any(c.isdigit() for c in op) for op in latency)  # no task id makes a label
    assert sample(found, "proxy_upstream_keys", upstream="xffuw", state="active") == 1
    assert sample(found, "proxy_upstream_keys", upstream="xffuw", state="disabled") == 1
    assert sample(found, "proxy_upstream_keys", upstream="fengyuan", state="active") == 1
    assert sample(found, "proxy_upstream_keys", upstream="xffuw", state="cooling") == 0
    assert sample(found, "proxy_tasks_waiting") == 0
    assert sample(found, "proxy_budget_spent", client="alice") == 1.0
    assert sample(found, "proxy_budget_spent", client="bob") == 2.0
    assert sample(found, "proxy_budget_limit", client="bob") == 10.0
    text = admin_request(proxy, "GET", "/metrics").text
    for secret in secrets_of(proxy_config):
        assert secret not in text
