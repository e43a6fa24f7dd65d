"""The usage ledger at a million rows, on each store: how fast usage records go through the
store's write queue, and how fast /admin/usage answers over them.

    .venv/bin/python bench/store_usage.py                 # 1,000,000 rows into SQLite and PostgreSQL
    .venv/bin/python bench/store_usage.py --rows 100000   # smaller
    .venv/bin/python bench/store_usage.py --only sqlite

For each store: the rows go in through `add_usage` (the proxy's own path: queued, written
every FLUSH_AFTER in one transaction with their daily rollups), 2,000 records per turn of the
event loop, in time order over 90 days: 20 clients using 3 of 10 models each, each model on
one of 2 upstreams (about 60 rollup rows a day). Then each query is timed twice, one at a
time: through the store method the admin route calls (`store.usage`, in this process), and
through the real route, `GET /admin/usage` over HTTP to a real proxy (`proxy serve`, its own
process) on that store. For comparison, the query the proxy ran before rollups (a GROUP BY
over every raw row) is timed on the database directly.

PostgreSQL comes from DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test); the
benchmark creates a database of its own there and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
from lib.numbers import pct, table
from lib.procs import Procs, free_port, wait_ready
from lib.targets import PROXY, to_toml

from proxy.store import Store, UsageRecord
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

DAY = 86400
ADMIN = "adm-bench-store-0123456789"
CLIENTS = [f"client-{n:02d}" for n in range(20)]
MODELS = [f"model-{n}" for n in range(10)]
UPSTREAMS = ["xffuw", "fengyuan"]
PER_TURN = 2000
BEFORE = {  # what /admin/usage ran before rollups: every raw row grouped
    "sqlite": "SELECT {g}, COUNT(*), SUM(cost), SUM(outcome = 'failed') FROM usage GROUP BY 1",
    "postgres": "SELECT {g}, COUNT(*), SUM(cost), COUNT(*) FILTER (WHERE outcome = 'failed') FROM usage GROUP BY 1",
}
DAY_EXPR = {"sqlite": "date(at, 'unixepoch')", "postgres": "floor(at / 86400)"}


def records(n: int, now: float, seed: int = 1) -> list[UsageRecord]:
    """In time order, as a proxy writes them; each model lives on one upstream, and each client
    uses three models."""
    rng = random.Random(seed)
    start = now - 90 * DAY
    upstream = {model: UPSTREAMS[i % len(UPSTREAMS)] for i, model in enumerate(MODELS)}
    favourites = {client: rng.sample(MODELS, 3) for client in CLIENTS}
    times = sorted(start + rng.random() * 90 * DAY for _ in range(n))
    rows = []
    for i, at in enumerate(times):
        client = rng.choice(CLIENTS)
        model = rng.choice(favourites[client])
        rows.append(UsageRecord(at=at, client=client, model=model, upstream=upstream[model], key="0123456789ab",
                                cost=rng.choice((0.5, 1.0, 2.0, 20.0)),
                                outcome="failed" if rng.random() < 0.03 else "ok", kind="chat", request_id=f"req_{i}"))
    return rows


async def load(store: Store, rows: list[UsageRecord]) -> float:
    """Records per second through add_usage, until the last one is committed."""
    started = time.perf_counter()
    for i in range(0, len(rows), PER_TURN):
        for record in rows[i:i + PER_TURN]:
            store.add_usage(record)
        await asyncio.sleep(0)  # a turn of the loop: the flush timer runs when it is due
    await store.spent("nobody", 0)  # every read runs after the writes queued before it
    return len(rows) / (time.perf_counter() - started)


async def before_rollups(kind: str, where: str, group: str, runs: int) -> list[float]:
    """The pre-rollup query, timed on the store's database directly."""
    sql = BEFORE[kind].format(g=DAY_EXPR[kind] if group == "day" else group)
    times = []
    if kind == "sqlite":
        import sqlite3

        with sqlite3.connect(where) as db:
            for _ in range(runs):
                t = time.perf_counter()
                db.execute(sql).fetchall()
                times.append(time.perf_counter() - t)
        return times
    db = await asyncpg.connect(where)
    try:
        for _ in range(runs):
            t = time.perf_counter()
            await db.fetch(sql)
            times.append(time.perf_counter() - t)
    finally:
        await db.close()
    return times


def serve(procs: Procs, storage: dict[str, Any], workdir: Path) -> str:
    """A real proxy on the store, in its own process: its URL."""
    port = free_port()
    config = workdir / f"proxy-{port}.toml"
    config.write_text(to_toml({"server": {"port": port}, "clients": [{"name": "bench", "key": "sk-bench-0123456789"}],
                               "admin": {"keys": [ADMIN]}, "log": {"level": "warning"}, "storage": storage}))
    log = workdir / f"proxy-{port}.log"
    wait_ready(procs.spawn([*PROXY, "serve", "--config", str(config)], log), port, "/healthz", 30, log, every=0.1)
    return f"http://127.0.0.1:{port}"


def time_route(url: str, params: dict[str, str], n: int) -> tuple[list[float], int]:
    times, rows = [], 0
    with httpx.Client(headers={"authorization": f"Bearer {ADMIN}"}, timeout=60) as client:
        for i in range(n + 10):
            t = time.perf_counter()
            reply = client.get(f"{url}/admin/usage", params=params)
            elapsed = time.perf_counter() - t
            reply.raise_for_status()
            rows = len(reply.json()["data"])
            if i >= 10:  # the first ones warm caches and connections
                times.append(elapsed)
    return times, rows


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.1f}"


async def open_store(kind: str, where: str) -> Store:
    return SQLiteStore(where) if kind == "sqlite" else await PostgresStore.open(where)


def queries_to_time(now: float) -> list[tuple[str, dict[str, str]]]:
    partial = str(now - 7.5 * DAY)  # not a midnight: 7 days from the rollups, the first half day from rows
    return [("group_by=day", {"group_by": "day"}), ("group_by=client", {"group_by": "client"}),
            ("group_by=day&since=(7.5 days ago)", {"group_by": "day", "since": partial}),
            ("group_by=day&split_by=client", {"group_by": "day", "split_by": "client"})]


async def time_store(store: Store, params: dict[str, str], n: int) -> list[float]:
    """The store method the admin route calls, in this process."""
    since = float(params["since"]) if "since" in params else None
    times = []
    for i in range(n + 10):
        t = time.perf_counter()
        await store.usage(client=None, model=None, since=since, until=None, group_by=params["group_by"],
                          split_by=params.get("split_by"))
        if i >= 10:
            times.append(time.perf_counter() - t)
    return times


def bench(kind: str, where: str, storage: dict[str, Any], rows: list[UsageRecord], queries: int,
          workdir: Path) -> list[str]:
    now = time.time()

    async def fill_and_time() -> tuple[float, list[list[float]]]:
        store = await open_store(kind, where)
        try:
            rate = await load(store, rows)
            return rate, [await time_store(store, params, queries) for _, params in queries_to_time(now)]
        finally:
            await store.close()

    rate, in_process = asyncio.run(fill_and_time())
    lines = [f"| {kind} | write: `add_usage` until committed, rollups included | {rate:,.0f} records/s | | |"]
    procs = Procs()
    try:
        url = serve(procs, storage, workdir)
        for (label, params), store_times in zip(queries_to_time(now), in_process, strict=True):
            times, n = time_route(url, params, queries)
            lines.append(f"| {kind} | `/admin/usage?{label}` ({n} rows) | | {ms(store_times, 50)} / "
                         f"{ms(store_times, 99)} | {ms(times, 50)} / {ms(times, 99)} |")
    finally:
        procs.stop_all()
    for group in ("day", "client"):
        times = asyncio.run(before_rollups(kind, where, group, 5))
        lines.append(f"| {kind} | before rollups: GROUP BY {group} over every raw row (SQL, 5 runs) | | "
                     f"{ms(times, 50)} / {max(times) * 1000:.0f} (max) | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200, help="timed requests per route")
    parser.add_argument("--only", choices=("sqlite", "postgres"))
    args = parser.parse_args()
    rows = records(args.rows, time.time())
    lines = table(["store", "what", "write rate", "store method p50 / p99 ms", "HTTP p50 / p99 ms"], [])
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "sqlite"):
            path = str(workdir / "usage.sqlite3")
            lines += bench("sqlite", path, {"path": path}, rows, args.queries, workdir)
        if args.only in (None, "postgres"):
            admin_url = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
            name = f"xfp_bench_{os.getpid()}"
            url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
            asyncio.run(_execute(admin_url, f'CREATE DATABASE "{name}"'))
            try:
                lines += bench("postgres", url, {"url": url}, rows, args.queries, workdir)
            finally:
                asyncio.run(_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(f"{args.rows:,} usage rows over 90 days ({len(CLIENTS)} clients, {len(MODELS)} models, "
          f"{len(UPSTREAMS)} upstreams); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))
    return 0


async def _execute(url: str, statement: str) -> None:
    db = await asyncpg.connect(url)
    try:
        await db.execute(statement)
    finally:
        await db.close()


if __name__ == "__main__":
    raise SystemExit(main())
