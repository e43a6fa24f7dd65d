"""Many replicas, one proxy: separate `proxy serve` processes on separate ports with one Redis
and one store keep every limit, budget and idempotency promise together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, OTHER_CLIENT_KEY, XFFUW_KEYS, Sims
from helpers import (
    ADMIN,
    ADMIN_KEY,
    admin_get,
    free_port,
    most_in_any_window,
    post_chat,
    post_image,
    spawn,
    wait_healthy,
    wait_until,
    write_config,
)
from redis.exceptions import RedisError
from stores import PgServer, pg_server

from proxy.pool import fingerprint
from proxy.shared import HOLD_LIFE
from proxy.sim.assets import PNG_BYTES

__all__ = ["pg_server"]  # a fixture, imported for pytest to find
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SLOW_KEY = "xf_shared_slow_key_4444"  # a key of its own upstream table, limited to LIMIT a WINDOW
LIMIT, WINDOW = 8, 2.0
WIDE_KEY = "xf_shared_wide_key_7777"  # a key of its own upstream table, limited to WIDE_LIMIT a WINDOW
WIDE_LIMIT = 120  # wide enough for the next call's slot to be taken ahead (AHEAD_SHARE x 2 replicas)
FAY_KEY = "sk-test-fay-rpm-8888"  # a client limited to FAY_RPM requests a minute: taken ahead too
FAY_RPM = 150
DORA_KEY = "sk-test-dora-rpm-5555"  # a client limited to DORA_RPM requests a minute
DORA_RPM = 6
ERIN_KEY = "sk-test-erin-budget-6666"  # a client with a budget of 10 (20 chats at 0.5)
PUBLIC_URL = "https://proxy.example.test"


def redis_or_skip(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:  # any failure to reach it
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} is not reachable in CI: {exc!r}")
        pytest.skip(f"no Redis at {url} ({exc.__class__.__name__}); set REDIS_URL to run the shared-state tests")


def forget_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def replica_config(sims: Sims, store: Path, prefix: str, redis_url: str = REDIS_URL, **tasks: Any) -> dict[str, Any]:
    sims.xffuw.keys[SLOW_KEY] = sims.xffuw.keys[WIDE_KEY] = 1_000.0
    return {
        "server": {"public_url": PUBLIC_URL},
        "clients": [{"name": "alice", "key": CLIENT_KEY}, {"name": "bob", "key": OTHER_CLIENT_KEY},
                    {"name": "dora", "key": DORA_KEY, "rpm": DORA_RPM}, {"name": "fay", "key": FAY_KEY, "rpm": FAY_RPM},
                    {"name": "erin", "key": ERIN_KEY, "budget": 10}],
        "providers": {
            "xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": list(XFFUW_KEYS)},
            "fengyuan": {"base_url": sims.fengyuan_url, "keys": list(FENGYUAN_KEYS)},
            "slow": {"type": "xffuw", "base_url": f"{sims.xffuw_url}/api/v1/", "queue_timeout": 0.3,
                     "rate_window": WINDOW, "key": [{"value": SLOW_KEY, "rpm": LIMIT}]},
            "wide": {"type": "xffuw", "base_url": f"{sims.xffuw_url}/api/v1/", "queue_timeout": 0.3,
                     "rate_window": WINDOW, "key": [{"value": WIDE_KEY, "rpm": WIDE_LIMIT}]},
        },
        "tasks": {"poll_interval": 0.2, "first_poll": 0.1, "timeout": 20, **tasks},
        "images": {"response_format": {"gpt-image-*": "url"}},
        "admin": {"keys": [ADMIN_KEY]},
        "shared": {"redis_url": redis_url, "prefix": prefix, "lease": 2.0},
        "storage": {"path": str(store)},
        "log": {"format": "json"},
    }


class Replicas:
    def __init__(self, processes: list[subprocess.Popen[str]], folder: Path, config: dict[str, Any]) -> None:
        self.processes, self.folder, self.config = processes, folder, config
        self.urls: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, count: int) -> list[str]:
        path = write_config(self.folder, self.config)
        started = []
        for _ in range(count):
            port = free_port()
            proc = spawn(self.processes, "serve", "--config", str(path), "--port", str(port))
            started.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in started:
            wait_healthy(url, proc)
            self.urls.append(url)
            self.procs.append(proc)
        return [url for url, _ in started]


@pytest.fixture
def replicas(processes: list[subprocess.Popen[str]], sims: Sims, tmp_path: Path) -> Iterator[Replicas]:
    redis_or_skip(REDIS_URL)
    prefix = f"xfp-test-{uuid.uuid4().hex[:12]}"
    group = Replicas(processes, tmp_path, replica_config(sims, tmp_path / "store.sqlite3", prefix))
    yield group
    forget_prefix(REDIS_URL, prefix)


def test_three_replicas_keep_a_key_and_a_client_under_their_limits(replicas: Replicas, sims: Sims) -> None:
    urls = replicas.start(3)
    with ThreadPoolExecutor(12) as pool:
        slow = list(pool.map(lambda i: post_chat(urls[i % 3], model="slow/gpt-4o-mini").status_code, range(30)))
        dora = list(pool.map(lambda i: post_chat(urls[i % 3], key=DORA_KEY).status_code, range(3 * DORA_RPM)))
    assert set(slow) <= {200, 429} and 200 in slow, slow
    keyed = [c.at for c in sims.xffuw.calls if c.key == SLOW_KEY]
    assert most_in_any_window(keyed, WINDOW) <= LIMIT, f"{len(keyed)} calls; at most {LIMIT} a {WINDOW:g} s"
    assert dora.count(200) == DORA_RPM, dora


def test_live_counts_every_replicas_answers(replicas: Replicas, sims: Sims) -> None:
    urls = replicas.start(2)
    for url, chats in ((urls[0], 3), (urls[1], 2)):
        for _ in range(chats):
            assert post_chat(url).status_code == 200
    assert post_chat(urls[1], model="no-such-model").status_code in (400, 404)

    def totals(url: str) -> tuple[str, int, int]:
        series = admin_get(url, "/admin/live").json()
        data = series["data"]
        return series["scope"], sum(b["requests"] for b in data), sum(b["refused"] for b in data)

    for url in urls:  # each replica's counts reach Redis within a beat
        wait_until(lambda u=url: totals(u) == ("proxy", 6, 1), timeout=10, what=f"6 answers counted on {url}")


def redis_commands(prefix: str, action: Callable[[], Any], settle: float = 0.3) -> list[str]:
    """The commands Redis ran on `prefix`'s keys while `action` ran, and `settle` seconds
    after (Redis's MONITOR: other tests' commands are told apart by their prefix)."""
    import redis.asyncio as aredis

    async def watch() -> list[str]:
        client = aredis.Redis.from_url(REDIS_URL)
        seen: list[str] = []

        async def read(monitor: Any) -> None:
            while True:
                command = (await monitor.next_command())["command"]
                if prefix in command:
                    seen.append(command)

        with contextlib.suppress(RedisError):  # the monitor's connection, cut when reading stops
            async with client.monitor() as monitor:
                reader = asyncio.ensure_future(read(monitor))
                await asyncio.sleep(0.1)  # MONITOR is in force
                await asyncio.to_thread(action)
                await asyncio.sleep(settle)
                reader.cancel()
        await client.aclose()
        return seen

    return asyncio.run(watch())


def test_a_request_counts_its_client_and_its_key_in_one_round_trip(replicas: Replicas, sims: Sims) -> None:
    """A client with an rpm calling a key with a limit: one atomic script a request, which also
    tells Redis when the request before it landed."""
    (url,) = replicas.start(1)
    prefix = replicas.config["shared"]["prefix"]
    statuses: list[int] = []

    def chats() -> None:
        statuses.extend(post_chat(url, key=DORA_KEY, model="slow/gpt-4o-mini").status_code for _ in range(5))

    commands = redis_commands(prefix, chats)
    assert statuses == [200] * 5
    key = f"slow:{fingerprint(SLOW_KEY)}"
    scripts = [c for c in commands if c.startswith("EVALSHA") and (key in c or "client:dora" in c)]
    both = [c for c in scripts if "client:dora" in c and key in c]
    assert len(both) == 5, scripts  # each request: its client's window and its key's, together
    # and nothing more, but the model list's call (read with the first request) and the last
    # landing, told a moment later: each earlier one went with the next request's script
    assert len(scripts) <= 7, "\n".join(c[:60] + " ... " + c[-90:] for c in scripts)


def test_a_client_rpm_counts_requests_refused_before_any_upstream_call(replicas: Replicas, sims: Sims) -> None:
    urls = replicas.start(2)
    for i in range(DORA_RPM):
        refused = httpx.post(f"{urls[i % 2]}/v1/chat/completions", headers={"authorization": f"Bearer {DORA_KEY}"},
                             json={"model": "gpt-4o-mini"}, timeout=30)
        assert refused.status_code == 400, refused.text
    time.sleep(0.3)  # each is counted as it ends, a moment after its answer went out
    over = post_chat(urls[0], key=DORA_KEY)
    assert over.status_code == 429, over.text
    assert "dora" in over.json()["error"]["message"]
    assert sims.xffuw.count("chat") == 0


def test_a_request_for_several_images_counts_once_in_its_client_rpm(replicas: Replicas, sims: Sims) -> None:
    sims.xffuw.task_seconds = 0.05
    urls = replicas.start(2)
    images = httpx.post(f"{urls[0]}/v1/images/generations", headers={"authorization": f"Bearer {DORA_KEY}"},
                        json={"model": "gpt-image-2", "prompt": "three cats", "n": 3}, timeout=30)
    assert images.status_code == 200, images.text
    assert len(images.json()["data"]) == 3
    assert [post_chat(urls[i % 2], key=DORA_KEY).status_code for i in range(DORA_RPM)] == [200] * (DORA_RPM - 1) + [429]
    submitted = sims.xffuw.count("image")
    # over its rpm, a request for several images is refused whole: none of its calls goes out
    over = httpx.post(f"{urls[1]}/v1/images/generations", headers={"authorization": f"Bearer {DORA_KEY}"},
                      json={"model": "gpt-image-2", "prompt": "three more cats", "n": 3}, timeout=30)
    assert over.status_code == 429, over.text
    assert sims.xffuw.count("image") == submitted


def test_a_budget_holds_across_replicas(replicas: Replicas, sims: Sims) -> None:
    urls = replicas.start(2)
    with ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(lambda i: post_chat(urls[i % 2], key=ERIN_KEY, content=f"{i} [delay=0.2]"), range(30)))
    assert sum(r.status_code == 200 for r in replies) <= 20
    report = httpx.get(f"{urls[0]}/admin/usage", params={"client": "erin"}, headers=ADMIN, timeout=10).json()
    assert report["total"]["cost"] <= 10.0, report


def test_a_dead_replicas_budget_holds_lapse_within_seconds(replicas: Replicas) -> None:
    """Twenty slow chats on the first replica hold erin's whole budget (10, at 0.5 each); once
    it is killed, its holds lapse (10 s unrenewed) and the second serves her again."""
    first, second = replicas.start(2)
    with ThreadPoolExecutor(20) as pool:
        for i in range(20):
            pool.submit(post_chat, first, f"{i} [delay=60]", key=ERIN_KEY)
        wait_until(lambda: post_chat(second, key=ERIN_KEY).status_code == 429, 10, "the budget to be held")
        held, spent = erin_budget(second)  # the console's budgets show the first replica's holds
        assert held > 0 and held + spent == 10  # what the probes above did not spend is held
        time.sleep(HOLD_LIFE + 1)  # a live replica renews its holds: they outlast HOLD_LIFE
        assert post_chat(second, key=ERIN_KEY).status_code == 429
        replicas.procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: post_chat(second, key=ERIN_KEY).status_code == 200, 20, "the holds to lapse")
        assert time.monotonic() - killed <= 10 + 3  # HOLD_LIFE and a beat, not the request's longest wait
    # the holds lapse within a beat of each other (each renewed, or made, in its own second)
    wait_until(lambda: erin_budget(second)[0] == 0, 3, "every hold to lapse")


def erin_budget(url: str) -> tuple[float, float]:
    """erin's budget as /admin/budgets shows it: (held, spent)."""
    budgets = httpx.get(f"{url}/admin/budgets", headers=ADMIN, timeout=10).json()["data"]
    row = next(b for b in budgets if b["client"] == "erin")
    return float(row["held"]), float(row["spent"])


def test_a_replica_started_beside_a_running_one_serves_its_limited_key(replicas: Replicas) -> None:
    """The running replica's last save of its key windows is no crash: the new one serves."""
    (first,) = replicas.start(1)
    assert post_chat(first, model="slow/gpt-4o-mini").status_code == 200
    (second,) = replicas.start(1)
    assert post_chat(second, model="slow/gpt-4o-mini").status_code == 200


def test_a_key_disabled_through_one_replica_is_refused_by_the_other_within_a_second(
        replicas: Replicas, sims: Sims) -> None:
    first, second = replicas.start(2)
    assert post_chat(second).status_code == 200
    refused = fingerprint(XFFUW_KEYS[0])
    reply = httpx.post(f"{first}/admin/keys/{refused}/disable", headers=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    began = time.monotonic()

    def disabled_there() -> bool:
        keys = httpx.get(f"{second}/admin/keys", headers=ADMIN, timeout=10).json()["data"]
        return any(k["fingerprint"] == refused and k["state"] == "disabled" for k in keys)

    wait_until(disabled_there, 3, "the other replica to see the key disabled")
    assert time.monotonic() - began <= 1.5
    seen = len(sims.xffuw.calls)
    for i in range(4):
        assert post_chat(second, content=f"after {i}").status_code == 200
    assert {c.key for c in list(sims.xffuw.calls)[seen:] if c.endpoint == "chat"} == {XFFUW_KEYS[1]}
    # enabled through the other replica: back in the first one's pool
    reply = httpx.post(f"{second}/admin/keys/{refused}/enable", headers=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    wait_until(lambda: all(k["state"] == "active" for k in
                           httpx.get(f"{first}/admin/keys", headers=ADMIN, timeout=10).json()["data"]
                           if k["fingerprint"] == refused), 3, "the first replica to see the key enabled")


def test_a_reload_through_one_replica_reloads_every_replica(replicas: Replicas) -> None:
    first, second = replicas.start(2)
    newcomer = "sk-test-newcomer-reload-1"
    assert post_chat(second, key=newcomer).status_code == 401
    replicas.config["clients"].append({"name": "newcomer", "key": newcomer})
    write_config(replicas.folder, replicas.config)  # the file both replicas were started from
    reply = httpx.post(f"{first}/admin/reload", headers=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    wait_until(lambda: post_chat(second, key=newcomer).status_code == 200, 3, "the other replica to re-read its file")


def test_an_idempotency_key_repeated_on_another_replica_pays_once(replicas: Replicas, sims: Sims) -> None:
    first, second = replicas.start(2)
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "idempotency-key": "across-replicas"}
    body = {"model": "gpt-image-2", "prompt": "a slow fox [delay=1]"}
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(httpx.post, f"{first}/v1/images/generations", json=body, headers=headers, timeout=30)
        wait_until(lambda: sims.xffuw.count("image") == 1, 5, "the first submit")
        two = pool.submit(httpx.post, f"{second}/v1/images/generations", json=body, headers=headers, timeout=30)
        a, b = one.result(), two.result()
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["data"] == b.json()["data"]
    assert sims.xffuw.count("image") == 1
    # a chat too: the repeat waits for the first rather than 409
    chat_headers = {"idempotency-key": "chat-across-replicas"}
    with ThreadPoolExecutor(2) as pool:
        c1 = pool.submit(post_chat, first, "slow [delay=1]", headers=chat_headers)
        wait_until(lambda: sims.xffuw.count("chat") == 1, 5, "the first chat")
        c2 = pool.submit(post_chat, second, "slow [delay=1]", headers=chat_headers)
        r1, r2 = c1.result(), c2.result()
    assert r1.status_code == r2.status_code == 200 and r1.content == r2.content, (r1.text, r2.text)
    assert sims.xffuw.count("chat") == 1


def test_an_upload_through_one_replica_is_served_by_the_other(replicas: Replicas, sims: Sims) -> None:
    first, second = replicas.start(2)
    reply = httpx.post(f"{first}/v1/images/edits", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                       data={"prompt": "make it blue", "model": "gpt-image-2"},
                       files=[("image", ("cat.png", PNG_BYTES, "image/png"))], timeout=30)
    assert reply.status_code == 200, reply.text
    assert sims.xffuw.last_image_body is not None
    (url,) = sims.xffuw.last_image_body["images"]
    served = httpx.get(second + url.removeprefix(PUBLIC_URL), timeout=10)
    assert served.status_code == 200 and served.content == PNG_BYTES


def test_a_conversation_started_on_one_replica_continues_on_the_other(replicas: Replicas, sims: Sims) -> None:
    first, second = replicas.start(2)
    alice, bob = ({"authorization": f"Bearer {key}"} for key in (CLIENT_KEY, OTHER_CLIENT_KEY))
    started = httpx.post(f"{first}/v1/responses", headers=alice, timeout=30,
                         json={"model": "gpt-4o-mini", "input": "remember the word heron"})
    assert started.status_code == 200, started.text
    rid = started.json()["id"]
    went_on = httpx.post(f"{second}/v1/responses", headers=alice, timeout=30,
                         json={"model": "gpt-4o-mini", "input": "which word?", "previous_response_id": rid})
    assert went_on.status_code == 200, went_on.text
    assert sims.xffuw.last_chat_body is not None
    sent = [m["content"] for m in sims.xffuw.last_chat_body["messages"]]
    assert sent[0] == "remember the word heron" and sent[-1] == "which word?" and len(sent) == 3
    assert httpx.get(f"{second}/v1/responses/{rid}", headers=bob, timeout=10).status_code == 404
    assert httpx.get(f"{second}/v1/responses/{rid}", headers=alice, timeout=10).json()["id"] == rid
    assert httpx.delete(f"{second}/v1/responses/{rid}", headers=alice, timeout=10).status_code == 200
    assert httpx.get(f"{first}/v1/responses/{rid}", headers=alice, timeout=10).status_code == 404


def test_a_replica_killed_mid_task_has_its_task_finished_by_another(replicas: Replicas, sims: Sims) -> None:
    first, second = replicas.start(2)
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{first}/v1/images/generations", headers=headers, timeout=30,
                              json={"model": "gpt-image-2", "prompt": "outlives its replica [delay=3]"})
        wait_until(lambda: sims.xffuw.count("image") == 1, 5, "the submit")
        time.sleep(0.3)  # the task is in the store
        replicas.procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            pending.result()
    board = httpx.get(f"{second}/admin/tasks", headers=ADMIN, timeout=10).json()
    [task_id] = [t["id"] for t in board["waiting"] + board["finished"]]

    def finished_on(url: str) -> bool:
        view = httpx.get(f"{url}/v1/tasks/{task_id}", headers=headers, timeout=10).json()
        return view.get("status") == "succeeded"

    wait_until(lambda: finished_on(second), 15, "the other replica to adopt and finish the task")
    # adopted within one lease (2 s) of the death, give or take the heartbeat (1 s) that notices
    [polls] = sims.xffuw.polled.values()
    adopted = min(at for at in polls if at > killed)
    assert adopted - killed <= 2.0 + 1.0 + 0.5, f"first poll after the death {adopted - killed:.2f} s later"
    (third,) = replicas.start(1)
    assert finished_on(third)
    assert sims.xffuw.count("image") == 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A Redis of this test's own, to stop and start under load."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed in CI")
        pytest.skip("redis-server is not installed here")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _pings(redis_url), 5, "the test's own Redis")

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    start()
    yield f"redis://127.0.0.1:{port}/0", stop, start
    stop()


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def test_redis_stopped_mid_load_answers_no_5xx_and_loses_no_paid_task(
        processes: list[subprocess.Popen[str]], sims: Sims, tmp_path: Path,
        own_redis: tuple[str, Callable[[], None], Callable[[], None]]) -> None:
    url, stop, start = own_redis
    group = Replicas(processes, tmp_path, replica_config(sims, tmp_path / "store.sqlite3", "down", url))
    first, second = group.start(2)
    time.sleep(1.2)  # a heartbeat (1 s): each replica knows of the other, so limits split two ways
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(post_image, (first, second)[i % 2], f"through an outage {i} [delay=0.5]")
                   for i in range(8)]
        time.sleep(0.2)
        stop()
        pending += [pool.submit(post_image, (first, second)[i % 2], f"through an outage {i} [delay=0.5]")
                    for i in range(8, 16)]
        chats = [pool.submit(post_chat, (first, second)[i % 2]) for i in range(8)]
        replies = [f.result() for f in pending + chats]
    assert all(r.status_code < 500 for r in replies), [r.text for r in replies if r.status_code >= 500]
    assert sum(r.status_code == 200 for r in replies) == len(replies)
    health = httpx.get(f"{first}/healthz", timeout=5).json()
    assert health["shared"] == "down"
    metrics = httpx.get(f"{first}/metrics", headers=ADMIN, timeout=5).text
    assert re.search(r"^proxy_shared_state_up 0(\.0)?$", metrics, re.M), metrics[:2000]
    assert sims.xffuw.count("image") == 16
    # the budget (10: twenty chats) is split across the two replicas while they cannot share holds
    wait_until(lambda: httpx.get(f"{second}/healthz", timeout=5).json()["shared"] == "down", 5, "both alone")
    with ThreadPoolExecutor(30) as pool:
        budgeted = list(pool.map(lambda i: post_chat((first, second)[i % 2], key=ERIN_KEY, content=f"{i} [delay=0.5]"),
                                 range(30)))
    assert {r.status_code for r in budgeted} == {200, 429}
    assert sum(r.status_code == 200 for r in budgeted) <= 20, "more chats answered than the budget pays for"
    start()
    wait_until(lambda: httpx.get(f"{first}/healthz", timeout=5).json()["shared"] == "up", 5, "sharing again")


def test_two_replicas_on_postgresql_and_redis_act_as_one(processes: list[subprocess.Popen[str]], sims: Sims,
                                                         tmp_path: Path, pg_server: PgServer) -> None:
    """The deployment of compose.yaml: one PostgreSQL, one Redis, two replicas."""
    redis_or_skip(REDIS_URL)
    prefix = f"xfp-test-{uuid.uuid4().hex[:12]}"
    config = replica_config(sims, tmp_path / "unused.sqlite3", prefix)
    config["storage"] = {"url": pg_server.fresh_schema()}
    group = Replicas(processes, tmp_path, config)
    try:
        first, second = group.start(2)
        assert post_chat(first, content="on the first").status_code == 200
        assert post_chat(second, content="on the second").status_code == 200
        for url in (first, second):  # usage from both, in either (each writes its own within a moment)
            wait_until(lambda url=url: httpx.get(f"{url}/admin/usage", params={"client": "alice"}, headers=ADMIN,
                                                 timeout=10).json()["total"]["requests"] == 2, 3, "usage of both")
        with ThreadPoolExecutor(24) as pool:  # a budget of 10 (twenty chats) holds across both
            replies = list(pool.map(lambda i: post_chat((first, second)[i % 2], f"{i}", key=ERIN_KEY), range(24)))
        assert sum(r.status_code == 200 for r in replies) <= 20
        # a task started on the first, finished by the second after the first died: recorded once
        headers = {"authorization": f"Bearer {OTHER_CLIENT_KEY}"}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{first}/v1/images/generations", headers=headers, timeout=30,
                                  json={"model": "gpt-image-2", "prompt": "outlives [delay=2]"})
            wait_until(lambda: sims.xffuw.count("image") == 1, 5, "the submit")
            time.sleep(0.3)
            group.procs[0].send_signal(signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                pending.result()

        def bob_usage() -> dict[str, Any]:
            return httpx.get(f"{second}/admin/usage", params={"client": "bob"}, headers=ADMIN, timeout=10).json()

        wait_until(lambda: sims.xffuw.count("task") and bob_usage()["total"]["requests"] == 1, 15, "the usage")
        wait_until(lambda: any(t.endpoint == "file" for t in sims.xffuw.calls) or
                   _task_done(second, headers), 15, "the adopted task to finish")
        assert bob_usage()["total"] == {"requests": 1, "cost": 2.0, "failed": 0}
        assert sims.xffuw.count("image") == 1
    finally:
        forget_prefix(REDIS_URL, prefix)


def _task_done(url: str, headers: dict[str, str]) -> bool:
    report = httpx.get(f"{url}/admin/usage", params={"client": "bob", "group_by": "model"}, headers=ADMIN,
                       timeout=10).json()
    return bool(report["data"]) and report["total"]["failed"] == 0 and _bob_task_succeeded(url)


def _bob_task_succeeded(url: str) -> bool:
    board = httpx.get(f"{url}/admin/tasks", headers=ADMIN, timeout=10).json()
    return any(t["client"] == "bob" and t["state"] == "succeeded" for t in board["finished"])


def test_a_spend_that_bypassed_redis_counts_once_the_store_knows_it() -> None:
    """A replica cut off from Redis for a while spends from its own part; its spend reaches the
    store, and the next hold anywhere counts it: Redis takes the store's spend when it is more."""
    redis_or_skip(REDIS_URL)
    from proxy.shared import Shared

    prefix = f"xfp-test-{uuid.uuid4().hex[:12]}"

    async def holds() -> list[tuple[bool, float, float]]:
        shared = Shared(REDIS_URL, prefix, "test")
        await shared.start()
        try:
            args = {"budget": 10.0, "expected": 1.0, "period_ends": time.time() + 3600}
            first = await shared.reserve("erin", 0.0, known_spent=2.0, hold="a", **args)
            # 6.0 more was spent by a replica without Redis: the store knows 8.0 now
            second = await shared.reserve("erin", 0.0, known_spent=8.0, hold="b", **args)
            third = await shared.reserve("erin", 0.0, known_spent=8.0, hold="c", **args)
            return [first, second, third]
        finally:
            await shared.close()

    try:
        first, second, third = asyncio.run(holds())
    finally:
        forget_prefix(REDIS_URL, prefix)
    assert first == (True, 2.0, 0.0)
    assert second == (True, 8.0, 1.0)  # 8 spent, 1 held, 1 more fits in 10
    assert third == (False, 8.0, 2.0)  # 8 + 2 held + 1 > 10: refused


def test_wide_windows_take_the_next_slot_ahead_and_still_hold_across_replicas(replicas: Replicas,
                                                                              sims: Sims) -> None:
    """A client and a key whose limits are wide: the next call's slot is taken ahead (no wait on
    Redis), yet two replicas together never go past either limit."""
    urls = replicas.start(2)
    with ThreadPoolExecutor(12) as pool:
        keyed = list(pool.map(lambda i: post_chat(urls[i % 2], model="wide/gpt-4o-mini").status_code, range(400)))
        fay = list(pool.map(lambda i: post_chat(urls[i % 2], key=FAY_KEY).status_code, range(2 * FAY_RPM)))
    calls = [c.at for c in sims.xffuw.calls if c.key == WIDE_KEY]
    assert most_in_any_window(calls, WINDOW) <= WIDE_LIMIT, f"{len(calls)} calls; at most {WIDE_LIMIT} a {WINDOW:g} s"
    assert set(keyed) <= {200, 429} and keyed.count(200) >= WIDE_LIMIT // 2, keyed
    assert set(fay) <= {200, 429}, fay
    assert FAY_RPM - 2 <= fay.count(200) <= FAY_RPM  # a slot or two may be left ready, unused


def test_a_slot_taken_ahead_is_used_by_the_next_call_or_given_back() -> None:
    redis_or_skip(REDIS_URL)
    import redis.asyncio as aredis

    from proxy.shared import BEAT, LANDING_DELAY, Shared, Window
    from proxy.shared.ahead import READY_LIFE

    prefix = f"xfp-test-{uuid.uuid4().hex[:12]}"

    async def run() -> dict[str, Any]:
        shared = Shared(REDIS_URL, prefix, "test")
        await shared.start()
        calls = shared.key("calls", "wide")
        try:
            wide, narrow = Window("wide", 1_000, 60.0), Window("narrow", 10, 60.0)
            seen: dict[str, Any] = {}
            async def members(count: int, within: float) -> set[str]:
                """The window's members once there are `count` of them (or as they are after `within` s)."""
                deadline = time.monotonic() + within
                while True:
                    found = {m.decode() for m in await shared.client.zrange(calls, 0, -1)}
                    if len(found) == count or time.monotonic() > deadline:
                        return found
                    await asyncio.sleep(0.02)

            first, _, _ = await shared.take(wide)
            await shared.take(narrow)
            seen["ahead"] = await members(2, READY_LIFE / 2) - {first}
            second, _, _ = await shared.take(wide)
            seen["second"] = second
            seen["narrow"] = await shared.client.zcard(shared.key("calls", "narrow"))
            seen["taken_after"] = len(await members(3, READY_LIFE / 2))  # the slot after that, taken ahead
            seen["left"] = await members(2, 2 * (READY_LIFE + BEAT) + LANDING_DELAY + 3)
            seen["first"] = first
        finally:
            await shared.close()
        # a process that stops gives back the slot it took ahead, even one still being taken
        closing = Shared(REDIS_URL, prefix, "test-2")
        await closing.start()
        last, _, _ = await closing.take(Window("wide", 1_000, 60.0))
        await closing.close()
        client = aredis.Redis.from_url(REDIS_URL)
        seen["after_close"] = {m.decode() for m in await client.zrange(calls, 0, -1)}
        await client.aclose()
        seen["last"] = last
        return seen

    try:
        seen = asyncio.run(run())
    finally:
        forget_prefix(REDIS_URL, prefix)
    assert len(seen["ahead"]) == 1  # the next call's slot, counted before that call is asked for
    assert seen["second"] in seen["ahead"]  # and the next call took it, without a round trip of its own
    assert seen["narrow"] == 1  # a narrow window takes nothing ahead
    assert seen["taken_after"] == 3
    assert seen["left"] == {seen["first"], seen["second"]}  # and, unused, given back
    assert seen["after_close"] == {seen["first"], seen["second"], seen["last"]}
