"""Throughput: `wrk -t1 -c64` on the chat route (a Python generator without wrk): good requests
per second, p50 / p99, errors, the CPU of server, stub and wrk (bench/README.md, 2). With
--profile, py-spy also records the 1-worker proxy under the same load.

    .venv/bin/python bench/throughput.py [--quick] [--target direct --target proxy-1w …] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import threading
import time
from contextlib import suppress
from typing import Any

from lib import BENCH, OUT, say
from lib.environment import ensure_wrk, pyspy, record, summarise
from lib.loadclients import build_request, pyload
from lib.procs import Noise, cpu_seconds, rss_mb
from lib.targets import CHAT_BODY, CLIENT_KEY, HEADERS, Session, Target, each_target


def load(bench: Session, wrk: str | None, targets: list[Target], seconds: float) -> tuple[list[dict[str, Any]], float]:
    """`wrk -t1` with wrk_post.lua on every target at once, `conns` connections in all (without wrk
    the Python generator, on the first target): their summaries, and the generator's CPU seconds."""
    if not wrk:
        raw = build_request("POST", targets[0].path, targets[0].port, CHAT_BODY, HEADERS)
        return [asyncio.run(pyload(targets[0].port, raw, bench.s.conns, seconds))], float("nan")
    body, outs = OUT / "chat-body.json", [OUT / f"wrk-{t.name}-{t.port}.json" for t in targets]
    body.write_bytes(CHAT_BODY)
    procs = []
    for target, out in zip(targets, outs, strict=True):
        out.unlink(missing_ok=True)
        env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_OUT": str(out), "BENCH_KEY": CLIENT_KEY}
        procs.append(bench.procs.spawn([wrk, "-t1", f"-c{bench.s.conns // len(targets)}", f"-d{seconds}s", "--timeout",
                                        "10s", "-s", str(BENCH / "wrk_post.lua"),
                                        f"http://127.0.0.1:{target.port}{target.path}"], OUT / "wrk.log", env=env))
    cpu, t0 = {p.pid: 0.0 for p in procs}, time.monotonic()
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() - t0 < seconds + 30:
            cpu.update({p.pid: cpu_seconds([p.pid]) or cpu[p.pid] for p in procs})  # read before it is reaped
            time.sleep(0.2)
    finally:
        for proc in procs:
            bench.procs.stop(proc, grace=2)
    if not all(out.exists() for out in outs):
        raise RuntimeError(f"wrk wrote no result; see {OUT / 'wrk.log'}")
    return [json.loads(out.read_text()) for out in outs], sum(cpu.values())


def measure(bench: Session, wrk: str | None, target: Target, seconds: int, warm_up: bool = False) -> dict[str, Any]:
    """The load on the target's chat route; CPU % of target, stub and load generator."""
    pids, stub_pids, noise = target.pids(), bench.stub.pids(), Noise()
    cpu0, stub0, t0 = cpu_seconds(pids), cpu_seconds(stub_pids), time.monotonic()
    [data], wrk_cpu = load(bench, wrk, [target], seconds)
    elapsed = time.monotonic() - t0
    if warm_up:
        return data
    return {"rps": (data["requests"] - data["non2xx"]) / (data["duration_us"] / 1e6), "requests": data["requests"],
            "non2xx": data["non2xx"], "socket_errors": data["connect"] + data["read"] + data["write"] + data["timeout"],
            "p50": data["percentiles"]["50"] / 1000, "p99": data["percentiles"]["99"] / 1000,
            "curve": [(p, us / 1000) for p, us in data["curve"]], "cpu": (cpu_seconds(pids) - cpu0) / elapsed * 100,
            "stub_cpu": (cpu_seconds(stub_pids) - stub0) / elapsed * 100, "wrk_cpu": wrk_cpu / elapsed * 100,
            "rss": rss_mb(target.pids()), "noise": noise.percent()}


def profile(bench: Session, wrk: str | None, target: Target) -> dict[str, Any] | None:
    """py-spy on the proxy (1 worker) under the same load: an SVG and collapsed stacks."""
    if not pyspy():
        say("profile: skipped (py-spy not installed; pip install py-spy)")
        return None
    seconds, holder = bench.s.profile_seconds, dict[str, Any]()
    loader = threading.Thread(target=lambda: holder.update(measure(bench, wrk, target, 2 * seconds + 6)))
    loader.start()
    time.sleep(2)
    for fmt, name in (("flamegraph", "profile.svg"), ("raw", "profile.txt")):
        proc = record(bench.procs, target.proc.pid, seconds, fmt, OUT / name, OUT / f"py-spy-{fmt}.log")
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=seconds + 60)
        bench.procs.stop(proc, grace=2)
    loader.join(timeout=2 * seconds + 66)
    if not (OUT / "profile.txt").exists():
        say(f"profile: py-spy produced nothing; see {OUT / 'py-spy-raw.log'}")
        return None
    return {"summary": summarise(OUT / "profile.txt"), "load": holder}


def main() -> int:
    wrk = ensure_wrk(allow_install=True)

    def scenario(bench: Session, target: Target, args: argparse.Namespace) -> None:
        s = bench.s
        measure(bench, wrk, target, s.wrk_warmup, warm_up=True)
        r = measure(bench, wrk, target, s.wrk_seconds)
        say(f"[{target.name}] {s.conns} connections, {s.wrk_seconds} s: {r['rps']:,.0f} good req/s, p50 {r['p50']:.2f} "
            f"p99 {r['p99']:.2f} ms, non-2xx {r['non2xx']}, socket errors {r['socket_errors']}; CPU % server "
            f"{r['cpu']:.0f}, stub {r['stub_cpu']:.0f}, wrk {r['wrk_cpu']:.0f}; RSS {r['rss']:.0f} MB; "
            f"other processes {r['noise']:.0f} % of a core")
        if args.profile and target.name == "proxy-1w" and (found := profile(bench, wrk, target)):
            say(f"[{target.name}] profile: {found['summary']['samples']:,} samples in {OUT / 'profile.svg'}")

    return each_target(__doc__, scenario)


if __name__ == "__main__":
    raise SystemExit(main())
