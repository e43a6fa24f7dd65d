"""How much work one upstream key carries: N image requests at once on one key of the simulator
(60 calls a minute), tasks of D s, the proxy in this process (bench/README.md, "One key's capacity").

    .venv/bin/python bench/capacity.py            # Fengyuan 40 x 10 s, 100 x 10 s, 100 x 60 s; xffuw 20 x 60 s
    .venv/bin/python bench/capacity.py --quick    # smaller and shorter: a sanity run
    .venv/bin/python bench/capacity.py --case fengyuan:40:10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from lib import OUT, nearest_rank

from proxy.app import create_app
from proxy.config import parse_config
from proxy.server import BackgroundServer
from proxy.sim import FengyuanKey, FengyuanSim, XffuwSim, create_fengyuan_app, create_xffuw_app

CLIENT_KEY, FY_KEY, XF_KEY = "sk-bench-capacity-0001", "sk-fy-bench-normal-0001", "xf_bench_capacity_0001"
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


async def _burst(base: str, model: str, count: int, prefix: str) -> list[tuple[int, str | None, float]]:
    """`count` image requests at once: (status, result URL, when answered) each."""
    async def one(i: int) -> tuple[int, str | None, float]:
        reply = await http.post(base + "/v1/images/generations", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                                json={"model": model, "prompt": f"{prefix} {i}", "response_format": "url"})
        return reply.status_code, reply.json()["data"][0]["url"] if reply.status_code == 200 else None, time.monotonic()

    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        return await asyncio.gather(*(one(i) for i in range(count)))


def run_case(case: Case) -> dict[str, Any]:
    """The case's row: answers, upstream calls by endpoint, 429s, delays after the tasks' ends."""
    sim: Any
    app: Any
    provider: dict[str, Any]
    if case.upstream == "fengyuan":
        sim, model, app = FengyuanSim({FY_KEY: FengyuanKey(credits=1e9)}), "image_generation", create_fengyuan_app
        provider = {"base_url": "{url}", "keys": [FY_KEY]}
    else:
        sim, model, app = XffuwSim({XF_KEY: 1e9}), "gpt-image-2", create_xffuw_app
        sim.rate_limit = 60  # as if the plan had Fengyuan's limit: the proxy is told with `rpm`
        provider = {"base_url": "{url}/api/v1/", "keys": [XF_KEY], "rpm": 60}
    sim.task_seconds = case.seconds
    with tempfile.TemporaryDirectory() as folder:
        server = BackgroundServer(app(sim)).start()
        sim.public_base = server.url
        proxy = BackgroundServer(create_app(parse_config({
            "clients": [{"name": "bench", "key": CLIENT_KEY}],
            "providers": {case.upstream: {**provider, "base_url": provider["base_url"].format(url=server.url),
                                          "queue_timeout": 900}},
            "tasks": {"poll_interval": POLL_INTERVAL, "first_poll": 1.0, "timeout": 600},
            "storage": {"path": str(Path(folder) / "proxy.sqlite3")},
            "log": {"level": "warning", "format": "json"}}))).start()
        try:
            if case.warmup:
                asyncio.run(_burst(proxy.url, model, case.warmup, "warm-up"))
            # the proxy's own start-up reads (the catalogue, the key's credits) are not the tasks' calls
            httpx.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
            deadline = time.monotonic() + 5
            while case.upstream == "fengyuan" and not sim.count("user_info") and time.monotonic() < deadline:
                time.sleep(0.05)
            seen, began = len(sim.calls), time.monotonic()
            answers = asyncio.run(_burst(proxy.url, model, case.requests, "capacity"))
            wall, calls = time.monotonic() - began, list(sim.calls)[seen:]
        finally:
            proxy.stop()
            server.stop()
    delays = []
    for status, url, answered in answers:
        task_id = url.rsplit("/", 1)[1].split(".")[0].removeprefix("fy-").removeprefix("xf-") if url else ""
        if status == 200 and (task := sim.tasks.get(task_id)) is not None:
            delays.append(answered - (task.created + task.duration))
    finished = sum(status == 200 for status, _, _ in answers)
    by_endpoint = dict(Counter(call.endpoint for call in calls if call.endpoint != "file"))
    return {"case": case.name, "requests": case.requests, "task_seconds": case.seconds, "finished": finished,
            "not_200": case.requests - finished,
            "calls_per_task": round(sum(by_endpoint.values()) / max(1, finished), 2),
            "calls": by_endpoint, "upstream_429": sum(call.status == 429 for call in calls), "wall_s": round(wall, 1),
            "delay_p50_s": round(nearest_rank(delays, 50), 2), "delay_p99_s": round(nearest_rank(delays, 99), 2),
            "delay_max_s": round(max(delays), 2) if delays else None}


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
    print(f"poll_interval {POLL_INTERVAL:g} s; one key of 60 calls a minute\n{'case':<20} {'done':>5} {'not200':>6} "
          f"{'calls/task':>10} {'429s':>5} {'delay p50':>9} {'p99':>6} {'max':>6} {'wall s':>7}  calls by endpoint",
          flush=True)
    rows = []
    for case in chosen:
        rows.append(row := run_case(case))
        print(f"{row['case']:<20} {row['finished']:>5} {row['not_200']:>6} {row['calls_per_task']:>10} "
              f"{row['upstream_429']:>5} {row['delay_p50_s']:>9} {row['delay_p99_s']:>6} {row['delay_max_s']!s:>6} "
              f"{row['wall_s']:>7}  {row['calls']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "capacity.json").write_text(json.dumps(rows, indent=2))
    return 1 if any(r["delay_p99_s"] > 2 * POLL_INTERVAL for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
