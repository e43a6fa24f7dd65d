"""A real proxy on each store: [storage] url on PostgreSQL serves images and chats and reports
them in /admin/usage, a task left unfinished by one proxy is resumed by the next, two replicas
on one database share usage and budgets, and /admin/usage?split_by= answers per pair of
dimensions (JSON and CSV) on both stores."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import msgspec
import openai
import pytest
from conftest import RunningProxy, Sims
from helpers import ADMIN_KEY, admin_get, admin_request, post_image, usage_report, wait_until
from stores import PgServer, pg_server, store_kind
from test_durability import short_grace, wait_task_final

from proxy.store import UNFINISHED, TaskRecord

__all__ = ["pg_server", "store_kind"]


def on(config: dict[str, Any], url: str) -> dict[str, Any]:
    config["storage"] = {"url": url}
    config["admin"] = {"keys": [ADMIN_KEY]}
    return config


def postgres_tasks(url: str) -> list[TaskRecord]:
    """The task rows, as another replica sees them."""
    async def read() -> list[bytes]:
        db = await asyncpg.connect(url, timeout=5)
        try:
            return [r[0] for r in await db.fetch("SELECT record FROM tasks ORDER BY id")]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await db.close()

    return [msgspec.msgpack.decode(blob, type=TaskRecord) for blob in asyncio.run(read())]


def test_a_proxy_on_postgresql_serves_and_reports_usage(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                       proxy_config: dict[str, Any], sims: Sims,
                                                       pg_server: PgServer) -> None:
    url = pg_server.fresh_schema()
    proxy = start_proxy(on(proxy_config, url))
    client = proxy.client()
    image = client.images.with_raw_response.generate(model="gpt-image-2", prompt="一只橘猫")
    image_url = (image.parse().data or [])[0].url
    assert image_url
    (task_id,) = image.headers["x-proxy-task-ids"].split(",")
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "你好"}])
    assert answer.choices[0].message.content

    report = usage_report(proxy)
    assert [(r["group"], r["requests"], r["failed"]) for r in report["data"]] == [("alice", 2, 0)]
    assert report["total"]["requests"] == 2 and report["total"]["cost"] > 0
    today = dt.datetime.now(dt.UTC).date().isoformat()
    by_model = usage_report(proxy, group_by="day", split_by="model")
    assert by_model["split_by"] == "model"
    assert [(r["group"], r["split"], r["requests"]) for r in by_model["data"]] == [
        (today, "gpt-4o-mini", 1), (today, "gpt-image-2", 1)]
    # the task is in PostgreSQL, final (written a moment after the answer)
    final = wait_until(lambda: [t for t in postgres_tasks(url) if t.state == "succeeded"], 3, "the final state")
    assert [t.id for t in final] == [task_id]
    assert final[0].urls == [image_url]


def test_a_task_left_unfinished_is_resumed_by_the_next_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                             proxy_config: dict[str, Any], sims: Sims,
                                                             pg_server: PgServer) -> None:
    url = pg_server.fresh_schema()
    on(proxy_config, url)
    first = start_proxy(proxy_config)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_image, first.url, "a long night [delay=3]")
        (record,) = wait_until(lambda: postgres_tasks(url), 3, "the stored task")
        short_grace(first)
        first.server.stop()
        try:
            pending.result()
        except httpx.HTTPError:
            pass  # cut by the stop
    (left,) = postgres_tasks(url)
    assert left.state in UNFINISHED, "the task was final before the restart: the test proves nothing"
    assert left.owner is None, "a graceful stop releases its tasks for the next process"

    second = start_proxy(proxy_config)
    view = wait_task_final(second.url, record.id, timeout=8)
    (task,) = sims.xffuw.tasks.values()
    assert view["status"] == "succeeded", view
    assert view["data"] == [{"url": f"{sims.xffuw_url}/files/xf-{task.id}.png"}]
    assert sims.xffuw.count("image") == 1  # resumed, not submitted again
    (stored,) = wait_until(lambda: [t for t in postgres_tasks(url) if t.state == "succeeded"], 3, "the final state")
    assert stored.owner not in (None, left.owner)
    report = usage_report(second)
    assert [(r["group"], r["requests"], r["failed"]) for r in report["data"]] == [("alice", 1, 0)]


def test_admin_usage_split_by(start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any],
                              sims: Sims, store_kind: str, request: pytest.FixtureRequest) -> None:
    if store_kind == "postgres":
        on(proxy_config, request.getfixturevalue("pg_server").fresh_schema())
    else:
        proxy_config["admin"] = {"keys": [ADMIN_KEY]}
    proxy = start_proxy(proxy_config)
    alice, bob = proxy.client(), proxy.client("sk-test-bob-9876543210")
    for who, model in ((alice, "gpt-4o-mini"), (alice, "gpt-4o-mini"), (alice, "deepseek-chat"),
                       (bob, "gpt-4o-mini")):
        who.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    report = usage_report(proxy, group_by="client", split_by="model")
    assert [(r["group"], r["split"], r["requests"]) for r in report["data"]] == [
        ("alice", "deepseek-chat", 1), ("alice", "gpt-4o-mini", 2), ("bob", "gpt-4o-mini", 1)]
    assert report["total"]["requests"] == 4
    plain = usage_report(proxy, group_by="client")
    assert "split_by" not in plain and all("split" not in r for r in plain["data"])

    csv_text = admin_get(proxy, "/admin/usage", group_by="model", split_by="client", format="csv").text
    table = list(csv.reader(io.StringIO(csv_text)))
    assert table[0] == ["model", "client", "requests", "cost", "failed"]
    assert [row[:3] for row in table[1:]] == [["deepseek-chat", "alice", "1"], ["gpt-4o-mini", "alice", "2"],
                                             ["gpt-4o-mini", "bob", "1"]]
    for bad in ("planet", "day", "client"):  # unknown, not a split, or the grouping itself
        reply = admin_request(proxy, "GET", "/admin/usage", group_by="client", split_by=bad)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "split_by"


def test_two_replicas_on_one_database_share_usage_and_budgets(
        start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any], sims: Sims,
        pg_server: PgServer) -> None:
    on(proxy_config, pg_server.fresh_schema())
    proxy_config["clients"][0]["budget"] = 1.0  # a gpt-4o-mini chat costs 0.5 on the simulator
    a, b = start_proxy(proxy_config), start_proxy(proxy_config)
    chat: Any = [{"role": "user", "content": "hi"}]
    a.client().chat.completions.create(model="gpt-4o-mini", messages=chat)
    b.client("sk-test-bob-9876543210").chat.completions.create(model="gpt-4o-mini", messages=chat)
    a.client().chat.completions.create(model="gpt-4o-mini", messages=chat)

    def both(proxy: RunningProxy) -> Any:
        rows = {r["group"]: r["requests"] for r in usage_report(proxy)["data"]}
        return rows if rows == {"alice": 2, "bob": 1} else None

    wait_until(lambda: both(a) and both(b), 3, "each replica's usage in the other's report")
    with pytest.raises(openai.RateLimitError) as refused:  # alice spent her budget on a: b knows it
        b.client().chat.completions.create(model="gpt-4o-mini", messages=chat)
    assert refused.value.status_code == 429 and refused.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert sims.xffuw.count("chat") == 3
