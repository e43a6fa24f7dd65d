"""Each store under the usage ledger: how fast usage records go through the store's write
queue and how fast /admin/usage answers over a million of them (`--phase ledger`), and what
the store sustains under the chat load, with nothing lost (`--phase chat`).

    .venv/bin/python bench/store_usage.py                 # both phases, both stores, 1,000,000 rows
    .venv/bin/python bench/store_usage.py --rows 100000   # smaller
    .venv/bin/python bench/store_usage.py --phase chat --only sqlite
    .venv/bin/python bench/store_usage.py --quick         # 100,000 rows, 50 queries, 3 s of chat load

Ledger, for each store: the rows go in through `add_usage` (the proxy's own path: queued, written
every FLUSH_AFTER in one transaction with their daily rollups), 2,000 records per turn of the
event loop, in time order over 90 days: 20 clients using 3 of 10 models each, each model on
one of 2 upstreams (about 60 rollup rows a day). Then each query is timed twice, one at a
time: through the store method the admin route calls (`store.usage`, in this process), and
through the real route, `GET /admin/usage` over HTTP to a real proxy (`proxy serve`, its own
process) on that store. For comparison, the query the proxy ran before rollups (a GROUP BY
over every raw row) is timed on the database directly.

Chat, for each store: a fresh store, the bench stub as the proxy's xffuw and one `proxy serve`
(one worker) on that store; one request and a 1 s warm-up, up to 15 s for the machine's other
work to leave a quiet second (as bench/run.py waits; not with --quick), then the chat route
closed-loop with 64 connections (lib/loadclients.py's pyload). Printed: answers per second and
p50 / p99, the usage records committed per second during the load, the CPU of the proxy and of
the PostgreSQL server processes serving it (per answer too: on a shared machine steadier than
answers per second), and how many records were still queued when the load ended and the proxy
got SIGTERM at once; after it exits, the store's usage rows (and the requests its daily rollups
add up to) are counted against the answers: none may be lost (the program exits 1 if one is).
--rounds N runs the stores in turn N times (the machine's load drifts).

PostgreSQL comes from DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test); the
benchmark creates a database of its own there for each phase and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
from lib.loadclients import build_request, pyload
from lib.numbers import fmt, pct, table
from lib.procs import Noise, Procs, cpu_seconds, free_port, wait_quiet, wait_ready
from lib.targets import CHAT_BODY, CLIENT_KEY, PROXY, Session, Settings, Target, check_chat, headers, to_toml

from proxy.store import Store, UsageRecord
from proxy.store.batching import FLUSH_AFTER
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

DAY = 86400
ADMIN = "adm-bench-store-0123456789"
CLIENTS = [f"client-{n:02d}" for n in range(20)]
MODELS = [f"model-{n}" for n in range(10)]
UPSTREAMS = ["xffuw", "fengyuan"]
PER_TURN = 2000
CONNS = 64  # chat: connections, as bench/throughput.py
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


def serve(procs: Procs, storage: dict[str, Any], workdir: Path, stub_port: int | None = None) -> Target:
    """A real proxy on the store, in its own process (with the bench stub as its xffuw when given)."""
    port = free_port()
    settings: dict[str, Any] = {"server": {"port": port, "shutdown_grace": 5.0},
                                "clients": [{"name": "bench", "key": CLIENT_KEY}], "admin": {"keys": [ADMIN]},
                                "log": {"level": "warning"}, "storage": storage}
    if stub_port is not None:
        settings["providers"] = {"xffuw": {"base_url": f"http://127.0.0.1:{stub_port}/api/v1/",
                                           "keys": ["xf_bench_key"]}}
    config = workdir / f"proxy-{port}.toml"
    config.write_text(to_toml(settings))
    log = workdir / f"proxy-{port}.log"
    proc = procs.spawn([*PROXY, "serve", "--config", str(config)], log)
    wait_ready(proc, port, "/healthz", 30, log, every=0.1)
    return Target("proxy", port, proc=proc, log=log)


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
        url = f"http://127.0.0.1:{serve(procs, storage, workdir).port}"
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


class UsageRows:
    """One open connection to a store's database, counting what the proxy wrote there."""

    SQL = "SELECT (SELECT COUNT(*) FROM usage), (SELECT COALESCE(SUM(requests), 0) FROM usage_daily)"

    def __init__(self, kind: str, db: Any) -> None:
        self.kind, self.db = kind, db

    @classmethod
    async def open(cls, kind: str, where: str) -> UsageRows:
        if kind == "sqlite":
            import sqlite3

            return cls(kind, sqlite3.connect(where))
        return cls(kind, await asyncpg.connect(where))

    async def count(self) -> tuple[int, int]:
        """Usage rows, and the requests their daily rollups add up to."""
        found = self.db.execute(self.SQL).fetchone() if self.kind == "sqlite" else await self.db.fetchrow(self.SQL)
        return int(found[0]), int(found[1])

    async def backends(self) -> list[int]:
        """The PostgreSQL server processes serving the proxy's connections (SQLite: none, the
        proxy writes the file itself)."""
        if self.kind == "sqlite":
            return []
        return [r[0] for r in await self.db.fetch("SELECT pid FROM pg_stat_activity WHERE datname = "
                                                  "current_database() AND pid <> pg_backend_pid()")]

    async def close(self) -> None:
        result = self.db.close()
        if self.kind != "sqlite":
            await result


async def load_then_stop(kind: str, where: str, target: Target, seconds: float, warm: int,
                         stop: Callable[[], int | None]) -> dict[str, Any]:
    """The chat load on the proxy, its usage rows counted as it starts and as it ends, and
    SIGTERM at once after the last count (the queue still holds what came since the last
    flush); then the rows the store holds."""
    raw = build_request("POST", target.path, target.port, CHAT_BODY, headers())
    rows = await UsageRows.open(kind, where)
    try:
        for _ in range(200):  # up to 10 s for the warm-up's records, so that the load's are counted alone
            before = (await rows.count())[0]
            if before >= warm:
                break
            await asyncio.sleep(FLUSH_AFTER / 4)
        noise, started = Noise(), time.monotonic()
        proxy0, db0 = cpu_seconds(target.pids()), {pid: cpu_seconds([pid]) for pid in await rows.backends()}
        data = await pyload(target.port, raw, CONNS, seconds)
        elapsed = time.monotonic() - started
        proxy_cpu = cpu_seconds(target.pids()) - proxy0
        db_cpu = sum(cpu_seconds([pid]) - db0.get(pid, 0.0) for pid in await rows.backends())
        other = max(0.0, noise.percent() - db_cpu / elapsed * 100)  # the database's servers are not our children
        at_end = (await rows.count())[0]
        stopping = time.monotonic()
        code = stop()
        stopped = time.monotonic() - stopping
        after, rolled = await rows.count()
    finally:
        await rows.close()
    return {"data": data, "before": before, "at_end": at_end, "code": code, "stopped": stopped, "other": other,
            "after": after, "rolled": rolled, "proxy_cpu": proxy_cpu, "db_cpu": db_cpu,
            "elapsed": elapsed}


def chat(kind: str, where: str, storage: dict[str, Any], session: Session, seconds: float,
         workdir: Path) -> tuple[list[str], bool]:
    """The chat load on a proxy whose store is this one, its usage rows counted after SIGTERM:
    the table's row, and whether the store holds one record per answer."""
    target = serve(session.procs, storage, workdir, session.stub.port)
    try:
        check_chat(target)
        warm = asyncio.run(pyload(target.port, build_request("POST", target.path, target.port, CHAT_BODY, headers()),
                                  CONNS, 1.0))
        answered = 1 + warm["requests"]
        wait_quiet(session.s.quiet_wait, f"the chat load on {kind}")  # as bench/run.py: the neighbours settle
        r = asyncio.run(load_then_stop(kind, where, target, seconds, answered,
                                       lambda: session.procs.stop(target.proc, grace=10)))
    finally:
        session.procs.stop(target.proc)  # a no-op when it has stopped
    data = r["data"]
    answered += data["requests"]
    load_seconds = data["duration_us"] / 1e6
    exit_note = "" if r["code"] in (0, -signal.SIGTERM) else f" (exit {r['code']})"  # uvicorn re-raises SIGTERM
    row = [kind, fmt((data["requests"] - data["non2xx"]) / load_seconds, 0),
           f"{data['percentiles']['50'] / 1000:.1f} / {data['percentiles']['99'] / 1000:.1f}",
           fmt(data["non2xx"] + data["timeout"]), fmt((r["at_end"] - r["before"]) / load_seconds, 0),
           fmt(answered - r["at_end"]), f"{r['stopped']:.2f}{exit_note}", fmt(answered),
           f"{r['after']:,} ({r['rolled']:,})", fmt(answered - r["after"]),
           f"{r['proxy_cpu'] / r['elapsed'] * 100:.0f} / {r['db_cpu'] / r['elapsed'] * 100:.0f}",
           f"{(r['proxy_cpu'] + r['db_cpu']) / max(1, data['requests']) * 1000:.2f}",
           f"{r['other']:.0f}"]
    return row, r["after"] == r["rolled"] == answered


@contextmanager
def store_at(kind: str, workdir: Path, tag: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh store: (where it is, the proxy's [storage] for it), gone at the end. PostgreSQL: a
    database of its own on DATABASE_URL."""
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
    asyncio.run(_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield url, {"url": url}
    finally:
        asyncio.run(_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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
    queries = args.queries or (50 if args.quick else 200)
    seconds = args.chat_seconds or (3.0 if args.quick else 15.0)
    stores = [kind for kind in ("sqlite", "postgres") if args.only in (None, kind)]
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        workdir = Path(tmp)
        if args.phase in ("all", "ledger"):
            rows = records(n_rows, time.time())
            lines = table(["store", "what", "write rate", "store method p50 / p99 ms", "HTTP p50 / p99 ms"], [])
            for kind in stores:
                with store_at(kind, workdir, "ledger") as (where, storage):
                    lines += bench(kind, where, storage, rows, queries, workdir)
            print(f"{n_rows:,} usage rows over 90 days ({len(CLIENTS)} clients, {len(MODELS)} models, "
                  f"{len(UPSTREAMS)} upstreams); {machine()} at the end")
            print("\n".join(lines), flush=True)
        if args.phase in ("all", "chat"):
            print(f"\nchat: {CONNS} connections, {seconds:g} s per store, one proxy worker; {machine()} at the start",
                  flush=True)
            found, kept = [], True
            with Session(Settings.quick() if args.quick else Settings()) as session:
                for _, kind in itertools.product(range(args.rounds), stores):
                    with store_at(kind, workdir, "chat") as (where, storage):
                        row, held = chat(kind, where, storage, session, seconds, workdir)
                        found.append(row)
                        kept = kept and held
            print("\n".join(table(["store", "chat req/s", "p50 / p99 ms", "errors", "usage records/s committed",
                                    "queued at SIGTERM", "SIGTERM to exit, s", "answered",
                                    "usage rows after (rollups)", "lost", "CPU % proxy / PostgreSQL",
                                    "CPU ms per answer", "other processes, % of a core"], found)))
            print(f"{machine()} at the end")
            if not kept:
                print("LOST: a store does not hold one usage record per answer (or its rollups disagree)")
                return 1
    return 0


async def _execute(url: str, statement: str) -> None:
    db = await asyncpg.connect(url)
    try:
        await db.execute(statement)
    finally:
        await db.close()


if __name__ == "__main__":
    raise SystemExit(main())
