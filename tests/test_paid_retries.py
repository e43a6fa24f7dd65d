"""A stock OpenAI SDK retries a 5xx, a timeout or a dropped connection twice, with no
Idempotency-Key. After anything the upstream may have charged for, the proxy says
`x-should-retry: false`; a retry the SDK makes anyway (its own timeout) is matched to the
attempt before it and answered from it. Either way the upstream is paid once."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from conftest import RunningProxy, Sims
from helpers import AUTH, error_of, free_port, post_image, task_ids, wait_until

from proxy.api import idempotency
from proxy.api.idempotency import key_digest
from proxy.store.sqlite import SQLiteStore

CHAT = [{"role": "user", "content": "hello"}]


def stock_sdk(proxy: RunningProxy, timeout: float = 30.0) -> openai.OpenAI:
    """The SDK as a user has it: default max_retries (2), nothing else changed."""
    return openai.OpenAI(base_url=proxy.base_url, api_key=AUTH["authorization"].split()[1], timeout=timeout)


def test_the_sdk_has_the_retries_these_tests_rely_on() -> None:
    assert openai.OpenAI(api_key="x").max_retries == 2


# ---- x-should-retry: false after a possible charge ---------------------------------------


def test_a_task_timeout_is_not_retried_by_the_sdk(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                  proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 0.6}
    proxy = start_proxy(proxy_config)
    with pytest.raises(openai.InternalServerError) as caught:
        stock_sdk(proxy).images.generate(model="gpt-image-2", prompt="a slow one [delay=30]")
    error = caught.value
    assert error.status_code == 504 and error.response.headers["x-should-retry"] == "false"
    assert error.body["code"] == "upstream_timeout"  # type: ignore[index]
    (task_id,) = task_ids(error.response)
    assert f"GET /v1/tasks/{task_id}" in error.body["message"]  # type: ignore[index]
    assert sims.xffuw.count("image") == 1, "the SDK's retries paid for more tasks"


def test_a_garbage_chat_answer_is_not_retried_by_the_sdk(proxy: RunningProxy, sims: Sims) -> None:
    stock_sdk(proxy).models.list()  # the catalogue is known: only the chat meets the fault
    sims.xffuw.faults.garbage_rate = 1.0  # a 200 with a body cut short: the call arrived, maybe charged
    with pytest.raises(openai.InternalServerError) as caught:
        stock_sdk(proxy).chat.completions.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sims.xffuw.count("chat") == 1


def test_an_html_500_chat_answer_is_not_retried_by_the_sdk(proxy: RunningProxy, sims: Sims) -> None:
    stock_sdk(proxy).models.list()
    sims.xffuw.faults.error_rate = 1.0
    with pytest.raises(openai.InternalServerError) as caught:
        stock_sdk(proxy).chat.completions.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sims.xffuw.count("chat") == 1


def test_a_5xx_chat_answer_says_do_not_retry(proxy: RunningProxy, sims: Sims) -> None:
    stock_sdk(proxy).models.list()
    sims.xffuw.faults.down = True  # 503 HTML: the call arrived, so it may have been charged
    reply = httpx.post(proxy.base_url + "/chat/completions", headers=AUTH,
                       json={"model": "gpt-4o-mini", "messages": CHAT}, timeout=10)
    assert error_of(reply, 502)["code"] == "upstream_error"
    assert reply.headers["x-should-retry"] == "false"


def test_an_upstream_never_reached_leaves_the_retry_to_the_client(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """Connection refused: nothing was paid, so the SDK may retry (no x-should-retry: false)."""
    proxy_config["providers"]["xffuw"]["base_url"] = f"http://127.0.0.1:{free_port()}/api/v1/"
    proxy_config["aliases"] = {}
    proxy = start_proxy(proxy_config)
    reply = httpx.post(proxy.base_url + "/chat/completions", headers=AUTH,
                       json={"model": "xffuw/gpt-4o-mini", "messages": CHAT}, timeout=10)
    assert reply.status_code == 502, reply.text
    assert reply.headers.get("x-should-retry") != "false"


# ---- an SDK's retry after its own timeout is answered from the first attempt ---------------


def test_a_chat_retried_after_the_sdk_timed_out_is_paid_once(proxy: RunningProxy, sims: Sims) -> None:
    sdk = stock_sdk(proxy, timeout=1.0)  # the upstream takes 1.5 s: the first attempt times out
    reply = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "slow [delay=1.5]"}])
    assert reply.retries_taken >= 1
    assert reply.headers.get("idempotent-replayed") == "true"
    assert reply.parse().choices[0].message.content.endswith("slow [delay=1.5]")
    assert sims.xffuw.count("chat") == 1, "the SDK's retry paid for a second chat"


def test_an_image_retried_after_the_sdk_timed_out_is_paid_once(proxy: RunningProxy, sims: Sims) -> None:
    sdk = stock_sdk(proxy, timeout=1.0)
    reply = sdk.images.with_raw_response.generate(model="gpt-image-2", prompt="a slow cat [delay=2]")
    assert reply.retries_taken >= 1
    assert reply.parse().data[0].url.startswith(sims.xffuw_url)  # type: ignore[index, union-attr]
    assert sims.xffuw.count("image") == 1, "the SDK's retry paid for a second task"


def test_the_async_sdk_retry_is_matched_too(proxy: RunningProxy, sims: Sims) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AUTH["authorization"].split()[1],
                                      timeout=1.0) as sdk:
            reply = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "async slow [delay=1.5]"}])
            return reply.choices[0].message.content or ""

    assert asyncio.run(run()).endswith("async slow [delay=1.5]")
    assert sims.xffuw.count("chat") == 1


def test_the_same_request_sent_again_on_purpose_is_a_new_request(proxy: RunningProxy, sims: Sims) -> None:
    """A first attempt (retry count 0) is never matched: asking twice means paying twice."""
    sdk = stock_sdk(proxy)
    first = sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    second = sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    assert first.id != second.id
    assert sims.xffuw.count("chat") == 2


def test_identical_requests_at_once_are_each_their_own(proxy: RunningProxy, sims: Sims) -> None:
    sdk = stock_sdk(proxy)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "same [delay=0.3]"}]), range(8)))
    assert len({r.id for r in replies}) == 8
    assert sims.xffuw.count("chat") == 8


def test_a_retry_after_a_free_refusal_runs_again(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    """A retry whose first attempt cost nothing (every key short: 429) is a new call."""
    proxy_config["providers"]["xffuw"]["recheck_after"] = 0.01
    proxy = start_proxy(proxy_config)
    body = {"model": "gpt-4o-mini", "messages": CHAT}
    headers = {**AUTH, "x-stainless-retry-count": "0"}
    sims.xffuw.keys = {k: 0.0 for k in sims.xffuw.keys}  # every key short: 429 insufficient_quota
    assert httpx.post(proxy.base_url + "/chat/completions", json=body, headers=headers).status_code == 429
    sims.xffuw.keys = {k: 1000.0 for k in sims.xffuw.keys}
    time.sleep(0.05)
    retry = httpx.post(proxy.base_url + "/chat/completions", json=body,
                       headers={**headers, "x-stainless-retry-count": "1"})
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers, retry.text


# ---- Idempotency-Key records ----------------------------------------------------------------


def test_an_idempotency_key_longer_than_255_characters_is_400(proxy: RunningProxy, sims: Sims) -> None:
    reply = post_image(proxy.url, "a fox", headers={"idempotency-key": "k" * 256})
    error = error_of(reply, 400)
    assert error["param"] == "Idempotency-Key" and "255" in error["message"]
    assert len(reply.content) < 1000
    assert sims.xffuw.count("image") == 0
    assert post_image(proxy.url, "a fox", headers={"idempotency-key": "k" * 255}).status_code == 200


def test_a_refusal_before_any_upstream_call_is_not_kept(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                        proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0].update(budget=1.0)  # one gpt-image-2 costs 2: refused before any call
    proxy = start_proxy(proxy_config)
    for i in range(5):
        reply = post_image(proxy.url, "a fox", headers={"idempotency-key": f"refused-{i}"})
        assert error_of(reply, 429)["code"] == "insufficient_quota"
    ok = post_image(proxy.url, "a fox", model="flux-schnell", headers={"idempotency-key": "paid"})  # costs 1
    assert ok.status_code == 200, ok.text

    async def kept() -> list[bool]:
        store = SQLiteStore(proxy_config["storage"]["path"])
        try:
            return [await store.idempotency_get("alice", key_digest(k)) is not None
                    for k in ("refused-0", "refused-4", "paid")]
        finally:
            await store.close()

    assert asyncio.run(kept()) == [False, False, True]


def test_concurrent_repeats_of_one_key_wait_rather_than_409(proxy: RunningProxy, sims: Sims) -> None:
    key = {"idempotency-key": "many-at-once"}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post_image(proxy.url, "one boat [delay=0.5]", headers=key), range(8)))
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies if r.status_code != 200]
    assert len({r.content for r in replies}) == 1
    assert sims.xffuw.count("image") == 1


@contextlib.contextmanager
def loop_paused(proxy: RunningProxy) -> Iterator[None]:
    """The proxy's event loop held still while the block runs: what is sent meanwhile reaches
    it as one burst, read in the order it was sent."""
    loop = proxy.server.loop
    assert loop is not None
    paused, resume = threading.Event(), threading.Event()

    def hold() -> None:
        paused.set()
        resume.wait(10)

    loop.call_soon_threadsafe(hold)
    assert paused.wait(5)
    try:
        yield
    finally:
        resume.set()


def test_the_first_body_is_replayed_while_other_bodies_of_its_key_are_refused(proxy: RunningProxy,
                                                                             sims: Sims) -> None:
    """A request with another body holds the key in this process while it asks the store whose
    key it is: a repeat of the first body arriving meanwhile is still the first's repeat (200,
    replayed), not a 409 idempotency_key_reused, and the upstream is paid once."""
    key = {"idempotency-key": "one-key-three-bodies"}
    first = post_image(proxy.url, "the first body", headers=key)
    assert first.status_code == 200, first.text
    # another body first, then repeats of the first while that one asks the store
    prompts = ["another body", "the first body", "the first body", "a third body", "the first body"] * 3
    connections = [http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=30) for _ in prompts]
    for connection in connections:  # each connection open and served once: the burst is only requests
        connection.request("GET", "/healthz")
        connection.getresponse().read()
    # the bytes post_image sends: the first body is the same body to the byte
    bodies = [httpx.Request("POST", proxy.url, json={"model": "gpt-image-2", "prompt": p}).content for p in prompts]
    with loop_paused(proxy):
        for connection, body in zip(connections, bodies, strict=True):
            connection.request("POST", "/v1/images/generations", headers={**AUTH, **key}, body=body)
    replies = [connection.getresponse() for connection in connections]
    for prompt, reply in zip(prompts, replies, strict=True):
        body = reply.read()
        if prompt == "the first body":
            assert reply.status == 200, body
            assert reply.headers["idempotent-replayed"] == "true" and body == first.content
        else:
            assert reply.status == 409 and json.loads(body)["error"]["code"] == "idempotency_key_reused", body
        reply.close()
    assert sims.xffuw.count("image") == 1


def test_a_shutdown_answer_after_a_paid_submit_says_do_not_retry(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy = start_proxy(proxy_config)
    proxy.server.server.config.timeout_graceful_shutdown = 0.3
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_image, proxy.url, "across a stop [delay=5]")
        wait_until(lambda: sims.xffuw.count("image") == 1, 5, "the submit")
        time.sleep(0.2)
        proxy.server.stop()
        reply = pending.result()
    error = error_of(reply, 503)
    assert reply.headers["x-should-retry"] == "false"
    (task_id,) = task_ids(reply)
    assert f"GET /v1/tasks/{{id}} for {task_id}" in error["message"]


def test_a_large_answer_is_not_stored_but_rebuilt_from_its_tasks(
        proxy: RunningProxy, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images as base64 may be megabytes: the record keeps the task ids, and a repeat builds
    the same answer again from the tasks, paying nothing more."""
    import proxy.api.idempotency as idempotency

    monkeypatch.setattr(idempotency, "MAX_KEPT_BODY", 100)  # any image answer is "large" now
    key = {"idempotency-key": "large-answer"}
    first = post_image(proxy.url, "a big one", headers=key, response_format="b64_json")
    assert first.status_code == 200, first.text
    second = post_image(proxy.url, "a big one", headers=key, response_format="b64_json")
    assert second.status_code == 200 and second.headers["idempotent-replayed"] == "true"
    assert second.json()["data"] == first.json()["data"]
    assert sims.xffuw.count("image") == 1

    async def stored() -> bytes:
        store = SQLiteStore(proxy_config_path(proxy))
        try:
            record = await store.idempotency_get("alice", key_digest("large-answer"))
            assert record is not None and record.task_ids
            return record.body
        finally:
            await store.close()

    assert asyncio.run(stored()) == b""


def proxy_config_path(proxy: RunningProxy) -> str:
    return str(proxy.server.server.config.app.state.runtime.config.storage.path)  # type: ignore[union-attr]


LONG_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "长" * 400_000}]}  # 1.2 MB, echoed


def long_chat(proxy: RunningProxy, **headers: str) -> httpx.Response:
    """A chat whose answer is over a mebibyte."""
    reply = httpx.post(proxy.url + "/v1/chat/completions", headers={**AUTH, **headers}, json=LONG_CHAT, timeout=30)
    assert reply.status_code != 200 or len(reply.content) > 1024 * 1024
    return reply


def test_a_chat_answer_over_a_mebibyte_is_kept_for_its_repeat(proxy: RunningProxy, sims: Sims) -> None:
    """No tasks stand behind a chat answer: were it not kept, a repeat would pay again."""
    first = long_chat(proxy, **{"idempotency-key": "a-long-chat"})
    second = long_chat(proxy, **{"idempotency-key": "a-long-chat"})
    assert first.status_code == 200
    assert second.status_code == 200 and second.headers["idempotent-replayed"] == "true"
    assert second.json()["choices"] == first.json()["choices"]
    assert sims.xffuw.count("chat") == 1, "the repeat paid for a second chat"


def test_a_paid_chat_answer_too_large_to_keep_answers_its_repeat_409_not_a_second_payment(
        proxy: RunningProxy, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, "MAX_KEPT_UNREBUILDABLE", 1024 * 1024)  # 32 MiB in use: a smaller answer
    assert long_chat(proxy, **{"idempotency-key": "a-chat-too-long-to-keep"}).status_code == 200
    second = long_chat(proxy, **{"idempotency-key": "a-chat-too-long-to-keep"})
    assert error_of(second, 409)["code"] == "idempotency_answer_not_kept"
    assert second.headers["idempotent-replayed"] == "true" and second.headers["x-should-retry"] == "false"
    assert sims.xffuw.count("chat") == 1, "the repeat paid for a second chat"
    assert long_chat(proxy, **{"idempotency-key": "a-new-key"}).status_code == 200
    assert sims.xffuw.count("chat") == 2
    # an SDK's own retry (no key) of an attempt whose answer was too large: told, not paid again
    assert long_chat(proxy, **{"x-stainless-retry-count": "0"}).status_code == 200
    retried = long_chat(proxy, **{"x-stainless-retry-count": "1"})
    assert error_of(retried, 409)["code"] == "idempotency_answer_not_kept"
    assert "new request" in error_of(retried, 409)["message"] and retried.headers["x-should-retry"] == "false"
    assert sims.xffuw.count("chat") == 3
