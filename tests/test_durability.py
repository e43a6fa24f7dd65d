"""Paid work is never lost and never paid twice: every upstream task is in the store before
the proxy waits on it, survives a client that goes away and a restart, an Idempotency-Key
repeat never submits again, and SIGTERM lets requests in flight finish."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, OTHER_CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import error_of, free_port, post_image, task_ids, wait_until
from openai_spec import validate_error, validate_images_response

from proxy.api.idempotency import key_digest
from proxy.pool import fingerprint
from proxy.store import UNFINISHED, IdempotencyRecord, TaskRecord

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
BOB = {"authorization": f"Bearer {OTHER_CLIENT_KEY}"}
FY_IMAGE = "fengyuan/image_generation"
ROOT = Path(__file__).resolve().parent.parent


# ---- helpers --------------------------------------------------------------------------


def store_path(config: dict[str, Any]) -> str:
    return str(config["storage"]["path"])


def sqlite_tasks(path: str) -> list[TaskRecord]:
    """Every task record in the SQLite file, read as another process would (read-only)."""
    if not Path(path).exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        try:
            rows = db.execute("SELECT record FROM tasks ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
    return [msgspec.msgpack.decode(row[0], type=TaskRecord) for row in rows]


def stored_owners(path: str) -> dict[str, str | None]:
    """Task id -> the process that polls it, as the store's `owner` column says (a graceful
    stop clears it: the task is free for the next process to claim)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return dict(db.execute("SELECT id, owner FROM tasks").fetchall())


def stored_idempotency(path: str) -> dict[tuple[str, str], IdempotencyRecord]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute("SELECT client, key, record FROM idempotency").fetchall()
    return {(c, k): msgspec.msgpack.decode(r, type=IdempotencyRecord) for c, k, r in rows}


def get_task(url: str, task_id: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.get(f"{url}/v1/tasks/{task_id}", headers=headers, timeout=10)


def wait_task_final(url: str, task_id: str, timeout: float) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        reply = get_task(url, task_id)
        assert reply.status_code == 200, reply.text
        view = reply.json()
        return view if view["status"] not in UNFINISHED else None

    return wait_until(final, timeout, f"task {task_id} to be final")


def short_grace(running: RunningProxy, seconds: float = 0.2) -> None:
    """Requests still waiting after `seconds` are cut when the server stops (a deploy whose
    grace is shorter than the task), so the task outlives the process."""
    running.server.server.config.timeout_graceful_shutdown = seconds  # type: ignore[assignment]


# ---- the store --------------------------------------------------------------------------


def test_every_task_is_in_the_store_before_the_proxy_waits_on_it(proxy: RunningProxy, proxy_config: dict[str, Any],
                                                                  sims: Sims) -> None:
    path = store_path(proxy_config)
    with ThreadPoolExecutor(2) as pool:
        xf = pool.submit(post_image, proxy.url, "a slow fox [delay=2]", headers={"idempotency-key": "store-xf"})
        fy = pool.submit(post_image, proxy.url, "a slow kite [delay=2]", model=FY_IMAGE)
        records = wait_until(lambda: len(sqlite_tasks(path)) == 2 and sqlite_tasks(path), 3, "two stored tasks")
        assert not xf.done() and not fy.done(), "the proxy answered before the tasks were final"
        by_upstream = {r.upstream: r for r in records}
        assert set(by_upstream) == {"xffuw", "fengyuan"}
        (xf_task,) = sims.xffuw.tasks.values()
        (fy_task,) = sims.fengyuan.tasks.values()
        expected = {"xffuw": (xf_task.id, xf_task.key, "store-xf"), "fengyuan": (fy_task.id, fy_task.key, None)}
        for upstream, record in by_upstream.items():
            upstream_id, secret, idem = expected[upstream]
            assert record.client == "alice"
            assert record.request_id and record.request_id.startswith("req_")
            assert record.upstream_task_id == upstream_id
            assert record.key == fingerprint(secret)
            assert secret not in msgspec.json.encode(record).decode()  # a fingerprint, never the key
            assert record.state in UNFINISHED
            assert record.idempotency_key == idem
            assert record.urls == []
            assert record.created > 0 and record.deadline > record.created
        xf_reply, fy_reply = xf.result(), fy.result()
    for reply, upstream in ((xf_reply, "xffuw"), (fy_reply, "fengyuan")):
        assert reply.status_code == 200, reply.text
        validate_images_response(reply.json())
        record = by_upstream[upstream]
        assert task_ids(reply) == [record.id]
        assert reply.headers["x-request-id"] == record.request_id
    # The final state is written at once but not waited for (an answer does not wait on the
    # disk): another process reading the file may see it a moment after the answer.
    final = wait_until(lambda: all(r.state == "succeeded" for r in sqlite_tasks(path))
                     and {r.upstream: r for r in sqlite_tasks(path)}, 2, "the final states in the store")
    assert final["xffuw"].state == final["fengyuan"].state == "succeeded"
    assert final["xffuw"].urls == [d["url"] for d in xf_reply.json()["data"]]
    assert final["fengyuan"].urls == [d["url"] for d in fy_reply.json()["data"]]
    assert final["xffuw"].updated >= final["xffuw"].created


def test_client_disconnect_does_not_stop_the_task(proxy: RunningProxy, proxy_config: dict[str, Any],
                                                  sims: Sims) -> None:
    with pytest.raises(httpx.TimeoutException):
        post_image(proxy.url, "a patient heron [delay=2]", timeout=0.5)
    gone_at = time.monotonic()
    (record,) = sqlite_tasks(store_path(proxy_config))
    running = get_task(proxy.url, record.id)
    assert running.status_code == 200, running.text
    assert running.json()["status"] in UNFINISHED
    assert running.json()["object"] == "proxy.task"

    view = wait_task_final(proxy.url, record.id, timeout=5)
    (task,) = sims.xffuw.tasks.values()
    assert view["status"] == "succeeded", view
    assert view["data"] == [{"url": f"{sims.xffuw_url}/files/xf-{task.id}.png"}]
    assert view["id"] == record.id and view["model"] == "gpt-image-2" and view["upstream"] == "xffuw"
    assert "error" not in view
    assert [c for c in sims.xffuw.calls if c.endpoint == "task" and c.at > gone_at], "no poll after the client left"
    assert sims.xffuw.count("image") == 1
    (stored,) = sqlite_tasks(store_path(proxy_config))
    assert stored.state == "succeeded" and stored.urls == [view["data"][0]["url"]]

    # the task is alice's: bob (and anyone unauthenticated) cannot see it
    for headers, status in ((BOB, 404), ({}, 401)):
        error = error_of(get_task(proxy.url, record.id, headers), status)
        assert task.id not in error["message"] and sims.xffuw_url not in error["message"]
    assert error_of(get_task(proxy.url, "task_does_not_exist"), 404)["type"] == "invalid_request_error"


def test_restart_resumes_unfinished_tasks_without_a_second_submit(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    path = store_path(proxy_config)
    first = start_proxy(proxy_config)
    with ThreadPoolExecutor(1) as pool:
        pending: Future[httpx.Response] = pool.submit(post_image, first.url, "a long night [delay=3]")
        (record,) = wait_until(lambda: sqlite_tasks(path), 3, "the stored task")
        short_grace(first)
        first.server.stop()
        stopped_at = time.monotonic()
        try:
            pending.result()
        except httpx.HTTPError:
            pass  # cut by the stop: what the client saw is not this test's concern
    (left,) = sqlite_tasks(path)
    assert left.state in UNFINISHED, "the task was final before the restart: the test proves nothing"
    assert stored_owners(path)[left.id] is None, "a graceful stop releases its tasks for the next process"

    second = start_proxy(proxy_config)
    view = wait_task_final(second.url, record.id, timeout=6)
    (task,) = sims.xffuw.tasks.values()
    assert view["status"] == "succeeded", view
    assert view["data"] == [{"url": f"{sims.xffuw_url}/files/xf-{task.id}.png"}]
    polls_after = [c for c in sims.xffuw.calls if c.endpoint == "task" and c.at > stopped_at]
    assert polls_after, "the new process never polled the task"
    assert {c.key for c in polls_after} == {task.key}  # with the key that created it
    assert sims.xffuw.count("image") == 1
    (stored,) = sqlite_tasks(path)
    assert stored.state == "succeeded"
    assert stored_owners(path)[left.id] not in (None, left.owner)  # claimed by the new process


# ---- Idempotency-Key ------------------------------------------------------------------


def test_idempotent_repeat_gets_the_same_answer_without_a_second_call(proxy: RunningProxy, sims: Sims) -> None:
    key = {"idempotency-key": "order-1"}
    first = post_image(proxy.url, "a lighthouse", headers=key)
    second = post_image(proxy.url, "a lighthouse", headers=key)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.content == first.content
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert task_ids(second) == task_ids(first) and len(task_ids(first)) == 1
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert sims.xffuw.count("image") == 1

    # the key is the client's own: bob with the same key and body is a new request
    bob = httpx.post(proxy.url + "/v1/images/generations", headers={**BOB, **key},
                     json={"model": "gpt-image-2", "prompt": "a lighthouse"}, timeout=30)
    assert bob.status_code == 200 and "idempotent-replayed" not in bob.headers
    assert bob.json()["data"] != first.json()["data"]
    assert sims.xffuw.count("image") == 2


def test_concurrent_repeat_waits_on_the_same_task(proxy: RunningProxy, sims: Sims) -> None:
    key = {"idempotency-key": "order-concurrent"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_image, proxy.url, "a slow boat [delay=1]", headers=key)
        wait_until(lambda: sims.xffuw.count("image") == 1, 3, "the first submit")
        # the same key with another body while the first is running: a conflict, at once
        other = post_image(proxy.url, "another boat", headers=key, timeout=3)
        error = error_of(other, 409)
        assert (error["type"], error["code"]) == ("invalid_request_error", "idempotency_key_reused")
        second = pool.submit(post_image, proxy.url, "a slow boat [delay=1]", headers=key)
        replies = [first.result(), second.result()]
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert replies[0].content == replies[1].content
    assert replies[1].headers.get("idempotent-replayed") == "true"
    assert sims.xffuw.count("image") == 1


def test_used_key_with_another_body_is_409(proxy: RunningProxy, sims: Sims) -> None:
    key = {"idempotency-key": "order-409"}
    assert post_image(proxy.url, "a red barn", headers=key).status_code == 200
    for body in ({"model": "gpt-image-2", "prompt": "a blue barn"}, {"model": "gpt-image-2", "prompt": "a red barn",
                                                                     "n": 1}):
        reply = httpx.post(proxy.url + "/v1/images/generations", headers={**AUTH, **key}, json=body)
        error = error_of(reply, 409)
        assert (error["type"], error["code"]) == ("invalid_request_error", "idempotency_key_reused")
        assert error["message"]
    # the same key on another endpoint is another request too
    reply = httpx.post(proxy.url + "/v1/chat/completions", headers={**AUTH, **key},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert error_of(reply, 409)["code"] == "idempotency_key_reused"
    assert sims.xffuw.count("image") == 1 and sims.xffuw.count("chat") == 0


def _pipelined(url: str, requests: list[bytes]) -> list[bytes]:
    """Send raw HTTP/1.1 requests at once on one connection; their answers' status lines. The
    server starts the next the moment the last byte of the one before it is sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        received = b""
        while received.count(b"HTTP/1.1 ") < len(requests) or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", received)


def test_a_refused_request_does_not_use_up_the_key(proxy: RunningProxy, sims: Sims) -> None:
    def chat_request(key: str, body: bytes) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer " + CLIENT_KEY.encode()
                + b"\r\ncontent-type: application/json\r\nidempotency-key: " + key.encode()
                + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    # The corrected request is already waiting when the refusal's last byte goes out: the key
    # must be free by then.
    bad = b'{"model": "gpt-4o-mini"}'
    good = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    assert _pipelined(proxy.url, [chat_request("fix-at-once", bad), chat_request("fix-at-once", good)]) == [
        b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK"]
    key = {"idempotency-key": "order-retry-after-400"}
    bad_image = httpx.post(proxy.url + "/v1/images/generations", headers={**AUTH, **key}, json={"model": "gpt-image-2"})
    assert error_of(bad_image, 400)["param"] == "prompt"
    good_image = post_image(proxy.url, "a corrected prompt", headers=key)
    assert good_image.status_code == 200, good_image.text
    assert "idempotent-replayed" not in good_image.headers
    assert sims.xffuw.count("image") == 1 and sims.xffuw.count("chat") == 1


def test_idempotent_chat_is_answered_once(client: openai.OpenAI, sims: Sims) -> None:
    key = {"Idempotency-Key": "chat-once"}
    messages: Any = [{"role": "user", "content": "只回答一次"}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, extra_headers=key)
    second = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages,
                                                              extra_headers=key)
    assert second.http_response.content == first.http_response.content
    assert second.headers.get("idempotent-replayed") == "true"
    assert first.parse().id == second.parse().id
    assert sims.xffuw.count("chat") == 1


def test_a_failed_task_answer_is_kept_and_replayed(proxy: RunningProxy, sims: Sims) -> None:
    key = {"idempotency-key": "order-failed"}
    first = post_image(proxy.url, "this one fails [fail]", headers=key)
    error = error_of(first, 502)
    assert error["code"] == "upstream_task_failed"
    assert first.headers["x-should-retry"] == "false"
    (task_id,) = task_ids(first)
    assert task_id in error["message"]
    second = post_image(proxy.url, "this one fails [fail]", headers=key)
    assert second.status_code == 502
    assert second.content == first.content
    assert second.headers.get("idempotent-replayed") == "true"
    assert second.headers.get("x-should-retry") == "false"
    assert task_ids(second) == [task_id]
    assert sims.xffuw.count("image") == 1


def test_idempotent_repeat_after_a_restart_answers_from_the_resumed_task(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    path = store_path(proxy_config)
    key = {"idempotency-key": "order-across-restart"}
    first = start_proxy(proxy_config)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_image, first.url, "across a deploy [delay=2.5]", headers=key)
        (record,) = wait_until(lambda: sqlite_tasks(path), 3, "the stored task")
        time.sleep(0.2)  # the request has noted its task for the key
        short_grace(first)
        first.server.stop()
        try:
            pending.result()
        except httpx.HTTPError:
            pass
    assert sqlite_tasks(path)[0].state in UNFINISHED
    # what lets the repeat find the task: the key's record, with the task it started
    kept = stored_idempotency(path)
    stored_key = ("alice", key_digest("order-across-restart"))  # the key's hash, never the client's bytes
    assert stored_key in kept, "the stop dropped the Idempotency-Key record of a paid task"
    assert kept[stored_key].task_ids == [record.id]
    assert not any("order-across-restart" in k for _, k in kept)

    second = start_proxy(proxy_config)
    repeat = post_image(second.url, "across a deploy [delay=2.5]", headers=key)
    assert repeat.status_code == 200, repeat.text
    (task,) = sims.xffuw.tasks.values()
    assert repeat.json()["data"] == [{"url": f"{sims.xffuw_url}/files/xf-{task.id}.png"}]
    assert task_ids(repeat) == [record.id]
    assert sims.xffuw.count("image") == 1, "the repeat submitted a second, paid task"
    again = post_image(second.url, "across a deploy [delay=2.5]", headers=key)
    assert again.content == repeat.content and again.headers.get("idempotent-replayed") == "true"
    assert sims.xffuw.count("image") == 1


# ---- task ids in answers ---------------------------------------------------------------


def test_task_ids_header_and_retrieval(proxy: RunningProxy, sims: Sims) -> None:
    reply = post_image(proxy.url, "two of them", n=2)
    assert reply.status_code == 200, reply.text
    ids = task_ids(reply)
    assert len(ids) == 2 and len(set(ids)) == 2
    urls = [d["url"] for d in reply.json()["data"]]
    views = [get_task(proxy.url, i).json() for i in ids]
    assert [v["status"] for v in views] == ["succeeded", "succeeded"]
    assert [v["data"][0]["url"] for v in views] == urls


def test_failure_and_timeout_messages_name_the_task(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                    proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"]["timeout"] = 1
    running = start_proxy(proxy_config)
    failed = post_image(running.url, "doomed [fail]")
    error = error_of(failed, 502)
    (failed_id,) = task_ids(failed)
    assert error["code"] == "upstream_task_failed" and failed_id in error["message"]
    view = get_task(running.url, failed_id).json()
    assert view["status"] == "failed" and view["error"]["code"] == "upstream_task_failed"

    started = time.monotonic()
    slow = post_image(running.url, "endless [never]", model=FY_IMAGE)
    assert time.monotonic() - started < 4
    error = error_of(slow, 504)
    (slow_id,) = task_ids(slow)
    assert error["code"] == "upstream_timeout" and slow_id in error["message"]
    assert f"GET /v1/tasks/{slow_id}" in error["message"]  # the task goes on: where its result will be
    view = get_task(running.url, slow_id).json()
    assert view["status"] in UNFINISHED and "error" not in view


# ---- never pay twice ---------------------------------------------------------------------


def test_a_post_the_upstream_may_have_taken_is_not_retried_on_another_key(client: openai.OpenAI,
                                                                          sims: Sims) -> None:
    client.models.list()  # the catalogue is read before the upstream starts dropping
    sims.xffuw.faults.drop_after_rate = 1.0
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model="gpt-image-2", prompt="taken, then dropped")
    assert caught.value.status_code == 502
    validate_error({"error": caught.value.body})
    assert caught.value.body["code"] == "upstream_error"
    assert sims.xffuw.count("image") == 1
    assert len(sims.xffuw.tasks) == 1  # the upstream did the (paid) work once

    # the converse: a key the upstream refuses proves nothing was taken; the other key serves
    sims.xffuw.faults.drop_after_rate = 0.0
    del sims.xffuw.keys[XFFUW_KEYS[0]]
    before = sims.xffuw.count("image", key=XFFUW_KEYS[1])
    for _ in range(2):
        assert client.images.generate(model="gpt-image-2", prompt="served by the good key").data[0].url
    assert sims.xffuw.count("image", key=XFFUW_KEYS[1]) == before + 2
    assert len(sims.xffuw.tasks) == 3


# ---- graceful shutdown ------------------------------------------------------------------


def _serve(tmp_path: Path, sims: Sims, grace: float, port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    store = tmp_path / "served.sqlite3"
    config = tmp_path / "proxy.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
shutdown_grace = {grace}

[[clients]]
name = "alice"
key = "{CLIENT_KEY}"

[providers.xffuw]
base_url = "{sims.xffuw_url}/api/v1/"
keys = ["{XFFUW_KEYS[0]}"]

[providers.fengyuan]
base_url = "{sims.fengyuan_url}"
keys = ["{FENGYUAN_KEYS[0]}"]

[tasks]
poll_interval = 0.1
first_poll = 0.05
timeout = 30

[storage]
path = "{store}"

[log]
format = "json"
level = "warning"
""", encoding="utf-8")
    stderr = tmp_path / "stderr.log"
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr.open("wb"),
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, stderr.read_text()
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 15, "the proxy process to serve", interval=0.05)
    return process, store, stderr


def test_sigterm_lets_requests_in_flight_finish_and_leaves_the_rest_resumable(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims,
        tmp_path: Path) -> None:
    grace = 2.5
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, store, stderr = _serve(tmp_path, sims, grace, port)
    try:
        with ThreadPoolExecutor(2) as pool:
            finishing = pool.submit(post_image, url, "almost done [delay=1.2]")
            endless = pool.submit(post_image, url, "endless [never]", model=FY_IMAGE)
            wait_until(lambda: len(sqlite_tasks(str(store))) == 2, 3, "both tasks stored")
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            def refused() -> bool:
                try:
                    httpx.get(url + "/healthz", timeout=0.5)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:
                    return False
                return False

            wait_until(refused, 1.0, "new connections to be refused")
            assert not finishing.done(), "the request in flight was cut before its task finished"
            done = finishing.result(timeout=grace + 2)
            assert done.status_code == 200, done.text
            validate_images_response(done.json())
            process.wait(timeout=grace + 3)
            exited = time.monotonic() - signalled
            cut = endless.result(timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = stderr.read_text(errors="replace")
    assert process.returncode in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal it handled
    assert exited < grace + 1.5, f"exited {exited:.1f} s after SIGTERM with shutdown_grace = {grace}"
    records = {r.upstream: r for r in sqlite_tasks(str(store))}
    assert records["xffuw"].state == "succeeded"
    left = records["fengyuan"]
    assert left.state in UNFINISHED, left
    assert stored_owners(str(store))[left.id] is None, "not released for the next process"

    # resumable: the next process (in-process here, same store) takes the task over and polls it
    proxy_config["storage"]["path"] = str(store)
    resumed_at = time.monotonic()
    successor = start_proxy(proxy_config)
    wait_until(lambda: any(c.endpoint in ("task", "task_list") and c.at > resumed_at for c in sims.fengyuan.calls),
             3, "a poll from the next process")
    view = get_task(successor.url, left.id).json()
    assert view["status"] in UNFINISHED and view["upstream"] == "fengyuan"
    assert sims.fengyuan.count("invoke") == 1

    # the client whose task outlived the grace is told, in OpenAI's shape, where its result
    # will be -- not uvicorn's plain-text 500 with a traceback in the log
    assert cut.status_code in (503, 504), (cut.status_code, cut.headers.get("content-type"), cut.text)
    error = error_of(cut, cut.status_code)
    assert left.id in error["message"] and task_ids(cut) == [left.id]
    assert "Traceback" not in log, log

def test_fractional_shutdown_grace_is_not_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[server] shutdown_grace = 0.8` must give requests 0.8 s, not int(0.8) == 0 s."""
    from proxy import cli, server

    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nshutdown_grace = 0.8\n[[clients]]\nname = "a"\nkey = "{CLIENT_KEY}"\n'
                      f'[storage]\npath = "{tmp_path / "s.sqlite3"}"\n', encoding="utf-8")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(server, "run", lambda config: seen.update(vars(config)) or True)
    assert cli.main(["serve", "--config", str(config), "--port", "0"]) == 0
    assert seen["timeout_graceful_shutdown"] == pytest.approx(0.8)
