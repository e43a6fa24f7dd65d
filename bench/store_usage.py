"""Each store under the usage ledger (bench/README.md, "The usage ledger at a million rows"):
`--phase ledger` writes a million usage records through `add_usage` and times /admin/usage;
`--phase chat` runs the chat load on a proxy on each store, SIGTERMs it and counts the usage
rows against the answers (exit 1 if one is lost). PostgreSQL: a database of its own on
DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test), dropped at the end.

    .venv/bin/python bench/store_usage.py                 # both phases, both stores, 1,000,000 rows
    .venv/bin/python bench/store_usage.py --rows 100000 --only postgres
    .venv/bin/python bench/store_usage.py --phase chat --rounds 3
    .venv/bin/python bench/store_usage.py --quick         # 100,000 rows, 50 queries, 3 s of chat load
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
from lib import fmt, pct, table
from lib.loadclients import build_request, pyload
from lib.procs import Noise, cpu_seconds, wait_quiet
from lib.targets import CHAT_BODY, HEADERS, Session, Settings, Target, check_chat, proxy_config, start_proxy

from proxy.server import free_port
from proxy.store import Store, UsageRecord
from proxy.store.batching import FLUSH_AFTER
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

DAY, PER_TURN, CONNS = 86400, 2000, 64  # chat: connections, as bench/throughput.py
ADMIN = "adm-bench-store-0123456789"
CLIENTS = [f"client-{n:02d}" for n in range(20)]
MODELS = [f"model-{n}" for n in range(10)]
UPSTREAMS = ["xffuw", "fengyuan"]
BEFORE = {  # what /admin/usage ran before rollups: every raw row grouped
    "sqlite": "SELECT {g}, COUNT(*), SUM(cost), SUM(outcome = 'failed') FROM usage GROUP BY 1",
    "postgres": "SELECT {g}, COUNT(*), SUM(cost), COUNT(*) FILTER (WHERE outcome = 'failed') FROM usage GROUP BY 1",
}
DAY_EXPR = {"sqlite": "date(at, 'unixepoch')", "postgres": "floor(at / 86400)"}
COUNT = "SELECT (SELECT COUNT(*) FROM usage), (SELECT COALESCE(SUM(requests), 0) FROM usage_daily)"


def records(n: int, now: float, seed: int = 1) -> list[UsageRecord]:
    """In time order over 90 days, as a proxy writes them; each model lives on one upstream, and
    each client uses three models."""
    rng = random.Random(seed)
    upstream = {model: UPSTREAMS[i % len(UPSTREAMS)] for i, model in enumerate(MODELS)}
    favourites = {client: rng.sample(MODELS, 3) for client in CLIENTS}
    rows = []
    for i, at in enumerate(sorted(now - 90 * DAY + rng.random() * 90 * DAY for _ in range(n))):
        client = rng.choice(CLIENTS)
        model = rng.choice(favourites[client])
        rows.append(UsageRecord(at=at, client=client, model=model, upstream=upstream[model], key="0123456789ab",
                                cost=rng.choice((0.5, 1.0, 2.0, 20.0)),
                                outcome="failed" if rng.random() < 0.03 else "ok", kind="chat", request_id=f"req_{i}"))
    return rows


async def fill(store: Store, rows: list[UsageRecord]) -> float:
    """Records per second through add_usage, PER_TURN a turn of the loop, until the last is committed."""
    started = time.perf_counter()
    for i in range(0, len(rows), PER_TURN):
        for record in rows[i:i + PER_TURN]:
            store.add_usage(record)
        await asyncio.sleep(0)  # a turn of the loop: the flush timer runs when it is due
    await store.spent("nobody", 0)  # every read runs after the writes queued before it
    return len(rows) / (time.perf_counter() - started)


class Database:
    """One plain connection to a store's database (the benchmark's own reads, not the store's)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind, self.where = kind, where
        self.db: Any = None

    async def __aenter__(self) -> Database:
        self.db = sqlite3.connect(self.where) if self.kind == "sqlite" else await asyncpg.connect(self.where)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.kind == "sqlite":
            self.db.close()
        else:
            await self.db.close()

    async def fetch(self, sql: str) -> list[Any]:
        return self.db.execute(sql).fetchall() if self.kind == "sqlite" else await self.db.fetch(sql)

    async def count(self) -> tuple[int, int]:
        """Usage rows, and the requests their daily rollups add up to."""
        found = (await self.fetch(COUNT))[0]
        return int(found[0]), int(found[1])

    async def backends(self) -> list[int]:
        """The PostgreSQL server processes serving the proxy (SQLite: none, the proxy writes the file)."""
        return [] if self.kind == "sqlite" else [r[0] for r in await self.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]


async def time_store(store: Store, params: dict[str, str], n: int) -> list[float]:
    """The store method the admin route calls, in this process, after 10 untimed calls."""
    times = []
    for i in range(n + 10):
        t = time.perf_counter()
        await store.usage(client=None, model=None, since=float(params["since"]) if "since" in params else None,
                          until=None, group_by=params["group_by"], split_by=params.get("split_by"))
        times += [time.perf_counter() - t] if i >= 10 else []
    return times


def time_route(url: str, params: dict[str, str], n: int) -> tuple[list[float], int]:
    """GET /admin/usage over HTTP after 10 untimed requests (caches, connections): times, rows."""
    times, rows = [], 0
    with httpx.Client(headers={"authorization": f"Bearer {ADMIN}"}, timeout=60) as client:
        for i in range(n + 10):
            t = time.perf_counter()
            reply = client.get(f"{url}/admin/usage", params=params)
            times += [time.perf_counter() - t] if i >= 10 else []
            rows = len(reply.raise_for_status().json()["data"])
    return times, rows


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.1f}"


def serve(session: Session, storage: dict[str, Any], workdir: Path, stub: bool) -> Target:
    """A real proxy on the store, in its own process (with the bench stub as its xffuw for `stub`)."""
    config = proxy_config(free_port(), session.stub.port if stub else None, admin={"keys": [ADMIN]},
                          storage=storage)
    config["server"]["shutdown_grace"] = 5.0
    return start_proxy(session.procs, config, str(config["server"]["port"]), folder=workdir, every=0.1)[0]


def ledger(kind: str, where: str, storage: dict[str, Any], rows: list[UsageRecord], queries: int,
           session: Session, workdir: Path) -> list[str]:
    now = time.time()
    partial = str(now - 7.5 * DAY)  # not a midnight: 7 days from the rollups, the first half day from rows
    asked = [("group_by=day", {"group_by": "day"}), ("group_by=client", {"group_by": "client"}),
             ("group_by=day&since=(7.5 days ago)", {"group_by": "day", "since": partial}),
             ("group_by=day&split_by=client", {"group_by": "day", "split_by": "client"})]

    async def fill_and_time() -> tuple[float, list[list[float]]]:
        store = SQLiteStore(where) if kind == "sqlite" else await PostgresStore.open(where)
        try:
            return await fill(store, rows), [await time_store(store, params, queries) for _, params in asked]
        finally:
            await store.close()

    async def before_rollups(group: str) -> list[float]:
        """The pre-rollup query, 5 runs on the store's database directly."""
        times = []
        async with Database(kind, where) as db:
            for _ in range(5):
                t = time.perf_counter()
                await db.fetch(BEFORE[kind].format(g=DAY_EXPR[kind] if group == "day" else group))
                times.append(time.perf_counter() - t)
        return times

    rate, in_process = asyncio.run(fill_and_time())
    lines = [f"| {kind} | write: `add_usage` until committed, rollups included | {rate:,.0f} records/s | | |"]
    target = serve(session, storage, workdir, stub=False)
    try:
        for (label, params), store_times in zip(asked, in_process, strict=True):
            times, n = time_route(f"http://127.0.0.1:{target.port}", params, queries)
            lines.append(f"| {kind} | `/admin/usage?{label}` ({n} rows) | | {ms(store_times, 50)} / "
                         f"{ms(store_times, 99)} | {ms(times, 50)} / {ms(times, 99)} |")
    finally:
        session.stop(target)
    for group in ("day", "client"):
        times = asyncio.run(before_rollups(group))
        lines.append(f"| {kind} | before rollups: GROUP BY {group} over every raw row (SQL, 5 runs) | | "
                     f"{ms(times, 50)} / {max(times) * 1000:.0f} (max) | |")
    return lines


async def load_then_stop(kind: str, where: str, session: Session, target: Target, seconds: float,
                         warm: int) -> dict[str, Any]:
    """The chat load on the proxy, its usage rows counted as it starts and as it ends, and SIGTERM
    at once after the last count (the queue still holds what came since the last flush); then
    the rows the store holds."""
    async with Database(kind, where) as db:
        for _ in range(200):  # up to 10 s for the warm-up's records, so that the load's are counted alone
            if (before := (await db.count())[0]) >= warm:
                break
            await asyncio.sleep(FLUSH_AFTER / 4)
        noise, started = Noise(), time.monotonic()
        proxy0, db0 = cpu_seconds(target.pids()), {pid: cpu_seconds([pid]) for pid in await db.backends()}
        data = await pyload(target.port, build_request("POST", target.path, target.port, CHAT_BODY, HEADERS), CONNS,
                            seconds)
        elapsed = time.monotonic() - started
        proxy_cpu = cpu_seconds(target.pids()) - proxy0
        db_cpu = sum(cpu_seconds([pid]) - db0.get(pid, 0.0) for pid in await db.backends())
        other = max(0.0, noise.percent() - db_cpu / elapsed * 100)  # the database's servers are not our children
        at_end, stopping = (await db.count())[0], time.monotonic()
        code = session.procs.stop(target.proc, grace=10)
        stopped = time.monotonic() - stopping
        after, rolled = await db.count()
    return {"data": data, "before": before, "at_end": at_end, "code": code, "stopped": stopped, "other": other,
            "after": after, "rolled": rolled, "proxy_cpu": proxy_cpu, "db_cpu": db_cpu, "elapsed": elapsed}


def chat(kind: str, where: str, storage: dict[str, Any], session: Session, seconds: float,
         workdir: Path) -> tuple[list[str], bool]:
    """The table's row, and whether the store holds one usage record (and rollup) per answer."""
    target = serve(session, storage, workdir, stub=True)
    try:
        check_chat(target)
        raw = build_request("POST", target.path, target.port, CHAT_BODY, HEADERS)
        answered = 1 + asyncio.run(pyload(target.port, raw, CONNS, 1.0))["requests"]  # check_chat's and the warm-up's
        wait_quiet(session.s.quiet_wait, f"the chat load on {kind}")  # as bench/run.py: the neighbours settle
        r = asyncio.run(load_then_stop(kind, where, session, target, seconds, answered))
    finally:
        session.stop(target)  # a no-op when it has stopped
    data, cpu = r["data"], (r["proxy_cpu"], r["db_cpu"])
    answered += data["requests"]
    load_seconds = data["duration_us"] / 1e6
    exit_note = "" if r["code"] in (0, -signal.SIGTERM) else f" (exit {r['code']})"  # uvicorn re-raises SIGTERM
    return [kind, fmt((data["requests"] - data["non2xx"]) / load_seconds, 0),
            f"{data['percentiles']['50'] / 1000:.1f} / {data['percentiles']['99'] / 1000:.1f}",
            fmt(data["non2xx"] + data["timeout"]), fmt((r["at_end"] - r["before"]) / load_seconds, 0),
            fmt(answered - r["at_end"]), f"{r['stopped']:.2f}{exit_note}", fmt(answered),
            f"{r['after']:,} ({r['rolled']:,})", fmt(answered - r["after"]),
            " / ".join(f"{c / r['elapsed'] * 100:.0f}" for c in cpu),
            f"{sum(cpu) / max(1, data['requests']) * 1000:.2f}",
            f"{r['other']:.0f}"], r["after"] == r["rolled"] == answered


@contextmanager
def store_at(kind: str, workdir: Path, tag: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh store: (where it is, the proxy's [storage] for it), gone at the end."""
    if kind == "sqlite":
        path = workdir / f"{tag}.sqlite3"
        try:
            yield str(path), {"path": str(path)}
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    admin_url = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
    name = f"xfp_bench_{os.getpid()}_{tag}"
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))

    async def execute(statement: str) -> None:
        async with Database(kind, admin_url) as db:
            await db.db.execute(statement)

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield url, {"url": url}
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def machine() -> str:
    return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("all", "ledger", "chat"), default="all")
    parser.add_argument("--only", choices=("sqlite", "postgres"))
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 50 queries, 3 s of chat load")
    parser.add_argument("--rows", type=int, help="ledger rows (default 1,000,000)")
    parser.add_argument("--queries", type=int, help="ledger: timed requests per route (default 200)")
    parser.add_argument("--chat-seconds", type=float, help="chat: seconds of load per store (default 15)")
    parser.add_argument("--rounds", type=int, default=1, help="chat: the stores in turn, this many times")
    args = parser.parse_args()
    n_rows = args.rows or (100_000 if args.quick else 1_000_000)
    seconds = args.chat_seconds or (3.0 if args.quick else 15.0)
    stores = [kind for kind in ("sqlite", "postgres") if args.only in (None, kind)]
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp, \
            Session(Settings.quick() if args.quick else Settings()) as session:
        workdir, found, kept = Path(tmp), list[list[str]](), True
        if args.phase in ("all", "ledger"):
            rows = records(n_rows, time.time())
            lines = table(["store", "what", "write rate", "store method p50 / p99 ms", "HTTP p50 / p99 ms"], [])
            for kind in stores:
                with store_at(kind, workdir, "ledger") as (where, storage):
                    lines += ledger(kind, where, storage, rows, args.queries or (50 if args.quick else 200), session,
                                    workdir)
            print(f"{n_rows:,} usage rows over 90 days ({len(CLIENTS)} clients, {len(MODELS)} models, "
                  f"{len(UPSTREAMS)} upstreams); {machine()} at the end")
            print("\n".join(lines), flush=True)
        if args.phase in ("all", "chat"):
            print(f"\nchat: {CONNS} connections, {seconds:g} s per store, one proxy worker; {machine()} at the start",
                  flush=True)
            for _, kind in itertools.product(range(args.rounds), stores):
                with store_at(kind, workdir, "chat") as (where, storage):
                    row, held = chat(kind, where, storage, session, seconds, workdir)
                    found.append(row)
                    kept = kept and held
            print("\n".join(table(["store", "chat req/s", "p50 / p99 ms", "errors", "usage records/s committed",
                                   "queued at SIGTERM", "SIGTERM to exit, s", "answered", "usage rows after (rollups)",
                                   "lost", "CPU % proxy / PostgreSQL", "CPU ms per answer",
                                   "other processes, % of a core"], found)))
            print(f"{machine()} at the end")
    if not kept:
        print("LOST: a store does not hold one usage record per answer (or its rollups disagree)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
