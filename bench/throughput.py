"""Throughput: `wrk -t1 -c64` on the chat route for 20 s (after a 2 s warm-up run): good
(non-4xx/5xx) requests per second, p50 / p99, non-2xx and socket errors, and the CPU % of the
server, the stub and wrk during the run. Without wrk, a Python closed-loop generator stands in.

    .venv/bin/python bench/throughput.py [--quick] [--target direct --target proxy-1w …] [--profile]

With --profile, py-spy also records the 1-worker proxy under the same load (unmeasured).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from typing import Any

from lib import BENCH, OUT, say
from lib import pyspy as spy
from lib.environment import ensure_wrk
from lib.loadclients import build_request, pyload
from lib.procs import Noise, cpu_seconds, rss_mb
from lib.targets import CHAT_BODY, CLIENT_KEY, Session, Target, check_chat, cli, headers


def measure(bench: Session, wrk: str | None, target: Target, seconds: int, warm_up: bool = False) -> dict[str, Any]:
    """wrk -t1 -cN -dS on the target's chat route; CPU % of target, stub and load generator."""
    body_file, result_file = OUT / "chat-body.json", OUT / f"wrk-{target.name}.json"
    body_file.write_bytes(CHAT_BODY)
    result_file.unlink(missing_ok=True)
    conns, pids, stub_pids = bench.s.conns, target.pids(), bench.stub.pids()
    noise = Noise()
    cpu0, stub0, t0 = cpu_seconds(pids), cpu_seconds(stub_pids), time.monotonic()
    if wrk:
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_OUT": str(result_file), "BENCH_KEY": CLIENT_KEY}
        proc = bench.procs.spawn([wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s",
                                  str(BENCH / "wrk_post.lua"), f"http://127.0.0.1:{target.port}{target.path}"],
                                 OUT / "wrk.log", env=env)
        wrk_cpu = 0.0
        try:
            while proc.poll() is None and time.monotonic() - t0 < seconds + 30:
                wrk_cpu = cpu_seconds([proc.pid]) or wrk_cpu
                time.sleep(0.2)
        finally:
            bench.procs.stop(proc, grace=2)
        if not result_file.exists():
            raise RuntimeError(f"wrk wrote no result; see {OUT / 'wrk.log'}")
        data = json.loads(result_file.read_text())
    else:
        raw = build_request("POST", target.path, target.port, CHAT_BODY, headers())
        data = asyncio.run(pyload(target.port, raw, conns, seconds))
        wrk_cpu = float("nan")
    elapsed = time.monotonic() - t0
    if warm_up:
        return data
    good = data["requests"] - data["non2xx"]
    return {"rps": good / (data["duration_us"] / 1e6), "requests": data["requests"], "non2xx": data["non2xx"],
            "socket_errors": data["connect"] + data["read"] + data["write"] + data["timeout"],
            "p50": data["percentiles"]["50"] / 1000, "p99": data["percentiles"]["99"] / 1000,
            "curve": [(p, us / 1000) for p, us in data["curve"]],
            "cpu": (cpu_seconds(pids) - cpu0) / elapsed * 100,
            "stub_cpu": (cpu_seconds(stub_pids) - stub0) / elapsed * 100,
            "wrk_cpu": wrk_cpu / elapsed * 100, "rss": rss_mb(target.pids()), "noise": noise.percent()}


def profile(bench: Session, wrk: str | None, target: Target) -> dict[str, Any] | None:
    """py-spy on the proxy (1 worker) under the same load: an SVG and collapsed stacks."""
    if not spy.binary():
        say("profile: skipped (py-spy not installed; pip install py-spy)")
        return None
    seconds = bench.s.profile_seconds
    load_seconds = 2 * seconds + 6
    holder: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: holder.update(measure(bench, wrk, target, load_seconds)))
    loader.start()
    time.sleep(2)
    for fmt, name in (("flamegraph", "profile.svg"), ("raw", "profile.txt")):
        proc = spy.record(bench.procs, target.proc.pid, seconds, fmt, OUT / name, OUT / f"py-spy-{fmt}.log")
        try:
            proc.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        bench.procs.stop(proc, grace=2)
    loader.join(timeout=load_seconds + 60)
    if not (OUT / "profile.txt").exists():
        say(f"profile: py-spy produced nothing; see {OUT / 'py-spy-raw.log'}")
        return None
    return {"summary": spy.summarise(OUT / "profile.txt"), "load": holder}


def main() -> int:
    args, s = cli(__doc__)
    wrk = ensure_wrk(allow_install=True)
    with Session(s) as bench:
        for name in args.target:
            target = bench.target(name)
            check_chat(target)
            measure(bench, wrk, target, s.wrk_warmup, warm_up=True)
            r = measure(bench, wrk, target, s.wrk_seconds)
            say(f"[{name}] {s.conns} connections, {s.wrk_seconds} s: {r['rps']:,.0f} good req/s, p50 {r['p50']:.2f} "
                f"p99 {r['p99']:.2f} ms, non-2xx {r['non2xx']}, socket errors {r['socket_errors']}; CPU % server "
                f"{r['cpu']:.0f}, stub {r['stub_cpu']:.0f}, wrk {r['wrk_cpu']:.0f}; RSS {r['rss']:.0f} MB; "
                f"other processes {r['noise']:.0f} % of a core")
            if args.profile and name == "proxy-1w":
                found = profile(bench, wrk, target)
                if found:
                    say(f"[{name}] profile: {found['summary']['samples']:,} samples in {OUT / 'profile.svg'}")
            bench.stop(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
