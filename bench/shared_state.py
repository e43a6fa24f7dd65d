"""Shared state on Redis: the latency it adds, and what a second replica brings.

    .venv/bin/python bench/shared_state.py [--quick]      # needs Redis at $REDIS_URL (default 127.0.0.1:6379)

1. Sequential chat on one keep-alive connection through this proxy with a client `rpm` and a
   key `rpm` to keep (so every request counts both): the limits kept in the process, then kept
   in Redis ([shared] redis_url): p50 / p99 and what Redis adds.
2. `wrk` against one replica, then against two replicas sharing Redis (one wrk each, the same
   connections in all): good requests per second, and two against one. On a 2-core machine the
   replicas, the stub, Redis and wrk share the cores: the ratio says what a second process
   brings here, not on separate machines.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from lib import BENCH, OUT, say
from lib.environment import ensure_wrk
from lib.loadclients import build_request, sequential
from lib.numbers import pct
from lib.procs import free_port, wait_ready
from lib.targets import CHAT_BODY, CLIENT_KEY, EXPECT, PROXY, Session, Target, check_chat, cli, headers, to_toml

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT = 1_000_000  # a limit to keep, never reached: the point is the counting


def config(stub_port: int, port: int, shared: bool, store: Path) -> Path:
    path = OUT / f"proxy-shared-{port}.toml"
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 2.0},
        "clients": [{"name": "bench", "key": CLIENT_KEY, "rpm": LIMIT}],
        "providers": {"xffuw": {"base_url": f"http://127.0.0.1:{stub_port}/api/v1/",
                                "key": [{"value": "xf_bench_key", "rpm": LIMIT}]}},
        "log": {"level": "warning", "format": "json"},
        "storage": {"path": str(store)},
    }
    if shared:
        raw["shared"] = {"redis_url": REDIS_URL, "prefix": f"xfp-bench-{uuid.uuid4().hex[:8]}"}
    path.write_text(to_toml(raw) + "\n")
    return path


def start(bench: Session, name: str, shared: bool, store: Path) -> Target:
    port = free_port()
    log = OUT / f"proxy-{name}.log"
    proc = bench.procs.spawn([*PROXY, "serve", "--config", str(config(bench.stub.port, port, shared, store))], log,
                             cwd=OUT)
    wait_ready(proc, port, "/healthz", 60, log)
    target = Target(name, port, proc=proc, log=log)
    check_chat(target)
    return target


def latency(target: Target, count: int, warm: int) -> dict[str, float]:
    raw = build_request("POST", target.path, target.port, CHAT_BODY, headers())
    total, _, failures = sequential(target.port, raw, count, warm, EXPECT, time.monotonic() + 240)
    return {"p50": pct(total, 50), "p99": pct(total, 99), "failures": failures}


def load(bench: Session, wrk: str, targets: list[Target], seconds: int, conns: int) -> float:
    """wrk on each target at once, `conns` connections in all: good requests per second, summed."""
    body = OUT / "chat-body.json"
    body.write_bytes(CHAT_BODY)
    procs, results = [], []
    for target in targets:
        result = OUT / f"wrk-shared-{target.port}.json"
        result.unlink(missing_ok=True)
        env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_OUT": str(result), "BENCH_KEY": CLIENT_KEY}
        procs.append(bench.procs.spawn([wrk, "-t1", f"-c{conns // len(targets)}", f"-d{seconds}s", "--timeout", "10s",
                                        "-s", str(BENCH / "wrk_post.lua"),
                                        f"http://127.0.0.1:{target.port}{target.path}"], OUT / "wrk.log", env=env))
        results.append(result)
    for proc in procs:
        proc.wait(timeout=seconds + 30)
    good = 0.0
    for result in results:
        data = json.loads(result.read_text())
        good += (data["requests"] - data["non2xx"]) / (data["duration_us"] / 1e6)
    return good


def main() -> int:
    _, s = cli(__doc__)
    wrk = ensure_wrk(allow_install=True)
    rows: dict[str, Any] = {}
    with Session(s) as bench:
        local = start(bench, "limits-local", False, OUT / "shared-a.sqlite3")
        rows["local"] = latency(local, s.seq_count, s.seq_warmup)
        bench.stop(local)
        shared = start(bench, "limits-redis", True, OUT / "shared-b.sqlite3")
        rows["redis"] = latency(shared, s.seq_count, s.seq_warmup)
        added = rows["redis"]["p50"] - rows["local"]["p50"]
        say(f"sequential chat, {s.seq_count} requests, a client rpm and a key rpm counted each time:")
        say(f"  limits in the process: p50 {rows['local']['p50']:.3f} p99 {rows['local']['p99']:.3f} ms")
        say(f"  limits in Redis:       p50 {rows['redis']['p50']:.3f} p99 {rows['redis']['p99']:.3f} ms "
            f"(+{added:.3f} ms p50; target +0.3 ms at most: {'MET' if added <= 0.3 else 'NOT MET'})")
        if wrk:
            second = start(bench, "limits-redis-2", True, OUT / "shared-b.sqlite3")
            load(bench, wrk, [shared], s.wrk_warmup, s.conns)
            one = load(bench, wrk, [shared], s.wrk_seconds, s.conns)
            load(bench, wrk, [shared, second], s.wrk_warmup, s.conns)
            two = load(bench, wrk, [shared, second], s.wrk_seconds, s.conns)
            rows.update(one_replica_rps=one, two_replicas_rps=two)
            say(f"wrk, {s.conns} connections in all, {s.wrk_seconds} s: one replica {one:,.0f} good req/s, two "
                f"replicas sharing Redis {two:,.0f} ({two / one:.2f}x)")
        else:
            say("wrk is not installed: the throughput part is skipped")
    (OUT / "shared_state.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
