"""Shared state on Redis: the latency it adds to a request whose client and key both have an
`rpm` to keep, and two replicas sharing it against one (bench/README.md, "Shared state on Redis").

    .venv/bin/python bench/shared_state.py [--quick]      # needs Redis at $REDIS_URL (default 127.0.0.1:6379)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from lib import OUT, pct, say
from lib.environment import ensure_wrk
from lib.loadclients import build_request, sequential
from lib.targets import (
    CHAT_BODY,
    CLIENT_KEY,
    EXPECT,
    HEADERS,
    Session,
    Target,
    check_chat,
    cli,
    proxy_config,
    start_proxy,
)
from throughput import load

from proxy.server import free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT = 1_000_000  # a limit to keep, never reached: the point is the counting


def start(bench: Session, name: str, redis: bool, store: str) -> Target:
    xffuw = {"base_url": f"http://127.0.0.1:{bench.stub.port}/api/v1/",
             "key": [{"value": "xf_bench_key", "rpm": LIMIT}]}
    config = proxy_config(free_port(), None, clients=[{"name": "bench", "key": CLIENT_KEY, "rpm": LIMIT}],
                          providers={"xffuw": xffuw}, storage={"path": str(OUT / store)})
    if redis:
        config["shared"] = {"redis_url": REDIS_URL, "prefix": f"xfp-bench-{uuid.uuid4().hex[:8]}"}
    target = start_proxy(bench.procs, config, name)[0]
    check_chat(target)
    return target


def latency(target: Target, count: int, warm: int) -> dict[str, float]:
    raw = build_request("POST", target.path, target.port, CHAT_BODY, HEADERS)
    total, _, failures = sequential(target.port, raw, count, warm, EXPECT, time.monotonic() + 240)
    return {"p50": pct(total, 50), "p99": pct(total, 99), "failures": failures}


def main() -> int:
    _, s = cli(__doc__)
    wrk, rows = ensure_wrk(allow_install=True), dict[str, Any]()
    with Session(s) as bench:
        local = start(bench, "limits-local", False, "shared-a.sqlite3")
        rows["local"] = latency(local, s.seq_count, s.seq_warmup)
        bench.stop(local)
        shared = start(bench, "limits-redis", True, "shared-b.sqlite3")
        rows["redis"] = latency(shared, s.seq_count, s.seq_warmup)
        added = rows["redis"]["p50"] - rows["local"]["p50"]
        say(f"sequential chat, {s.seq_count} requests, a client rpm and a key rpm counted each time:")
        say(f"  limits in the process: p50 {rows['local']['p50']:.3f} p99 {rows['local']['p99']:.3f} ms")
        say(f"  limits in Redis:       p50 {rows['redis']['p50']:.3f} p99 {rows['redis']['p99']:.3f} ms "
            f"(+{added:.3f} ms p50; target +0.3 ms at most: {'MET' if added <= 0.3 else 'NOT MET'})")
        if wrk:
            second = start(bench, "limits-redis-2", True, "shared-b.sqlite3")
            good: dict[int, float] = {}
            for replicas in ([shared], [shared, second]):
                load(bench, wrk, replicas, s.wrk_warmup)
                good[len(replicas)] = sum((d["requests"] - d["non2xx"]) / (d["duration_us"] / 1e6)
                                          for d in load(bench, wrk, replicas, s.wrk_seconds)[0])
            rows.update(one_replica_rps=good[1], two_replicas_rps=good[2])
            say(f"wrk, {s.conns} connections in all, {s.wrk_seconds} s: one replica {good[1]:,.0f} good req/s, two "
                f"replicas sharing Redis {good[2]:,.0f} ({good[2] / good[1]:.2f}x)")
        else:
            say("wrk is not installed: the throughput part is skipped")
    (OUT / "shared_state.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
