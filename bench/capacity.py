"""How much work one upstream key carries: N image requests at once on one key, tasks of D s.

    .venv/bin/python bench/capacity.py            # the issue-13 table: Fengyuan 40 x 10 s, 100 x 10 s,
                                                  # 100 x 60 s, and xffuw 20 x 60 s (learned first poll)
    .venv/bin/python bench/capacity.py --quick    # smaller and shorter: a sanity run
    .venv/bin/python bench/capacity.py --case fengyuan:40:10

Each case starts the simulated upstream (its real per-key sliding window: Fengyuan 60 calls a
minute for a normal key) and the proxy on loopback, in this process, sends N image requests at
once and waits for every answer. Printed per case: upstream calls per finished task (polls,
list calls and submits, balance reads included), upstream 429s, the delay from a task's end at
the upstream to its client's answer (p50 / p99 / max), the wall time and how many requests got
anything but 200. The xffuw case first finishes a few tasks so the proxy has learned how long
the model takes. Results also go to bench/out/capacity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from lib import OUT
from lib.numbers import nearest_rank

from proxy.app import create_app
from proxy.config import parse_config
from proxy.server import BackgroundServer
from proxy.sim import FengyuanKey, FengyuanSim, XffuwSim, create_fengyuan_app, create_xffuw_app

CLIENT_KEY = "sk-bench-capacity-0001"
FY_KEY = "sk-fy-bench-normal-0001"
XF_KEY = "xf_bench_capacity_0001"
POLL_INTERVAL = 3.0


@dataclass
class Case:
    upstream: str  # fengyuan | xffuw
    requests: int
    seconds: float  # task duration at the upstream
    warmup: int = 0  # tasks finished first, so the proxy learns the model's duration

    @property
    def name(self) -> str:
        return f"{self.upstream}:{self.requests}:{self.seconds:g}"


@dataclass
class Outcome:
    case: Case
    wall: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # by endpoint, during the measured requests
    refused_429: int = 0
    delays: list[float] = field(default_factory=list)  # upstream end -> client answer, seconds

    @property
    def finished(self) -> int:
        return self.statuses.get(200, 0)

    def row(self) -> dict[str, Any]:
        total = sum(self.calls.values())
        delays = sorted(self.delays)
        return {
            "case": self.case.name, "requests": self.case.requests, "task_seconds": self.case.seconds,
            "finished": self.finished, "not_200": self.case.requests - self.finished,
            "calls_per_task": round(total / max(1, self.finished), 2), "calls": self.calls,
            "upstream_429": self.refused_429, "wall_s": round(self.wall, 1),
            "delay_p50_s": round(nearest_rank(delays, 50), 2), "delay_p99_s": round(nearest_rank(delays, 99), 2),
            "delay_max_s": round(delays[-1], 2) if delays else None,
        }


def _config(case: Case, sim_url: str, store: Path, queue_timeout: float) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    if case.upstream == "fengyuan":
        providers["fengyuan"] = {"base_url": sim_url, "keys": [FY_KEY], "queue_timeout": queue_timeout}
    else:
        providers["xffuw"] = {"base_url": f"{sim_url}/api/v1/", "keys": [XF_KEY], "queue_timeout": queue_timeout}
    return {
        "clients": [{"name": "bench", "key": CLIENT_KEY}],
        "providers": providers,
        "tasks": {"poll_interval": POLL_INTERVAL, "first_poll": 1.0, "timeout": 600},
        "storage": {"path": str(store)},
        "log": {"level": "warning", "format": "json"},
    }


async def _request(http: httpx.AsyncClient, url: str, model: str, prompt: str) -> tuple[int, str | None, float]:
    reply = await http.post(url, json={"model": model, "prompt": prompt, "response_format": "url"},
                            headers={"authorization": f"Bearer {CLIENT_KEY}"})
    answered = time.monotonic()
    result = reply.json()["data"][0]["url"] if reply.status_code == 200 else None
    return reply.status_code, result, answered


async def _burst(base: str, model: str, count: int, prefix: str) -> list[tuple[int, str | None, float]]:
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        return await asyncio.gather(*(_request(http, base + "/v1/images/generations", model, f"{prefix} {i}")
                                      for i in range(count)))


def run_case(case: Case, quick: bool) -> Outcome:
    outcome = Outcome(case)
    with tempfile.TemporaryDirectory() as folder:
        if case.upstream == "fengyuan":
            sim: Any = FengyuanSim({FY_KEY: FengyuanKey(credits=1e9)})
            server = BackgroundServer(create_fengyuan_app(sim)).start()
            model = "image_generation"
        else:
            sim = XffuwSim({XF_KEY: 1e9})
            sim.rate_limit = 60  # as if the plan had Fengyuan's limit: the proxy is told below
            server = BackgroundServer(create_xffuw_app(sim)).start()
            model = "gpt-image-2"
        sim.public_base = server.url
        sim.task_seconds = case.seconds
        config = _config(case, server.url, Path(folder) / "proxy.sqlite3", queue_timeout=900)
        if case.upstream == "xffuw":
            config["providers"]["xffuw"]["rpm"] = 60
        proxy = BackgroundServer(create_app(parse_config(config))).start()
        try:
            if case.warmup:
                asyncio.run(_burst(proxy.url, model, case.warmup, "warm-up"))
            # the proxy's own start-up reads (the catalogue, the key's credits) are not the tasks' calls
            httpx.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
            deadline = time.monotonic() + 5
            while case.upstream == "fengyuan" and not sim.count("user_info") and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = len(sim.calls)
            began = time.monotonic()
            answers = asyncio.run(_burst(proxy.url, model, case.requests, "capacity"))
            outcome.wall = time.monotonic() - began
            calls = list(sim.calls)[seen:]
        finally:
            proxy.stop()
            server.stop()
    for status, _, _ in answers:
        outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
    for call in calls:
        if call.endpoint != "file":
            outcome.calls[call.endpoint] = outcome.calls.get(call.endpoint, 0) + 1
        outcome.refused_429 += call.status == 429
    for status, url, answered in answers:
        if status != 200 or url is None:
            continue
        task_id = url.rsplit("/", 1)[1].split(".")[0].removeprefix("fy-").removeprefix("xf-")
        task = sim.tasks.get(task_id)
        if task is not None:
            outcome.delays.append(answered - (task.created + task.duration))
    return outcome


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("fengyuan", 20, 5), Case("xffuw", 5, 10, warmup=3)]
    return [Case("fengyuan", 40, 10), Case("fengyuan", 100, 10), Case("fengyuan", 100, 60),
            Case("xffuw", 20, 60, warmup=5)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", action="append", help="upstream:requests:seconds[:warmup], repeatable")
    args = parser.parse_args()
    chosen = [Case(p[0], int(p[1]), float(p[2]), int(p[3]) if len(p) > 3 else 0)
              for p in (c.split(":") for c in args.case)] if args.case else cases(args.quick)
    rows = []
    header = (f"{'case':<20} {'done':>5} {'not200':>6} {'calls/task':>10} {'429s':>5} {'delay p50':>9} "
              f"{'p99':>6} {'max':>6} {'wall s':>7}  calls by endpoint")
    print(f"poll_interval {POLL_INTERVAL:g} s; one key of 60 calls a minute\n{header}", flush=True)
    for case in chosen:
        row = run_case(case, args.quick).row()
        rows.append(row)
        print(f"{row['case']:<20} {row['finished']:>5} {row['not_200']:>6} {row['calls_per_task']:>10} "
              f"{row['upstream_429']:>5} {row['delay_p50_s']:>9} {row['delay_p99_s']:>6} {row['delay_max_s']!s:>6} "
              f"{row['wall_s']:>7}  {row['calls']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "capacity.json").write_text(json.dumps(rows, indent=2))
    slow = [r for r in rows if r["delay_p99_s"] > 2 * POLL_INTERVAL]
    return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
