"""10,000 waiting image requests on a fresh proxy (1 worker): 10,000 connections (at most 256
handshakes at a time) each POST /v1/images/generations and wait. The stub holds every task
until all are submitted (at most `ramp_limit` s), then releases them: final from `hold` s later,
spread over `spread` s. Peak RSS, CPU while waiting and per poll, polls/s against the schedule,
every gap between polls, the answer delay and a timeline (bench/README.md, "What it measures").

    .venv/bin/python bench/images.py [--quick] [--images N] [--profile]
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lib import OUT, say
from lib import pyspy as spy
from lib.loadclients import StormResult, build_request, http_json, image_storm
from lib.numbers import pct
from lib.procs import Noise, cpu_seconds, rss_mb
from lib.targets import IMAGE_BODY, Session, Settings, Target, cli, headers


async def _storm(bench: Session, target: Target, spy_out: Path | None) -> dict[str, Any]:
    s, stub, loop = bench.s, bench.stub, asyncio.get_running_loop()
    raw = build_request("POST", "/v1/images/generations", target.port, IMAGE_BODY, headers())
    pi = s.poll_interval
    result = StormResult()
    pids = target.pids()
    started = time.monotonic()
    ramp_noise = Noise()
    storm = asyncio.ensure_future(image_storm(target.port, raw, s.images,
                                              s.ramp_limit + s.hold + s.spread + 2 * pi + 40, result=result))
    rss_peak_sampled = 0.0
    timeline: list[dict[str, float]] = []
    last = {"t": started, "cpu": cpu_seconds(pids), "polls": 0}

    async def sample() -> dict[str, Any]:
        nonlocal rss_peak_sampled
        stats = await loop.run_in_executor(None, http_json, stub.port, "GET", "/_stats")
        rss = rss_mb(pids)
        rss_peak_sampled = max(rss_peak_sampled, rss)
        now, cpu = time.monotonic(), cpu_seconds(pids)
        if now - last["t"] >= 1.0:  # one line a second: submits, polls/s, CPU %, RSS
            timeline.append({"t": round(now - started, 2), "submits": stats["submits"],
                             "polls_per_s": round((stats["polls"] - last["polls"]) / (now - last["t"]), 1),
                             "cpu": round((cpu - last["cpu"]) / (now - last["t"]) * 100, 1), "rss": round(rss, 1),
                             "answered": sum(1 for a in result.answered_at if a is not None)})
            last.update(t=now, cpu=cpu, polls=stats["polls"])
        return stats

    async def sample_until(end: float, step: float = 0.25) -> None:
        while time.monotonic() < end:
            await sample()
            await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))

    # wait until the stub has every submission (at most ramp_limit s), then release: tasks
    # become final from release + hold
    stats = await sample()
    complete = False
    while time.monotonic() - started < s.ramp_limit and not storm.done():
        stats = await sample()
        if stats["submits"] >= s.images:
            complete = True
            break
        await asyncio.sleep(0.1)
    submitted_at, submitted = time.monotonic(), stats["submits"]
    ramp_other = ramp_noise.percent()
    release = (await loop.run_in_executor(
        None, http_json, stub.port, "POST", f"/_release?after={s.hold}&spread={s.spread}&steps=1000"))["released_at"]
    w0 = release + s.first_poll + 0.25  # every task submitted so far is in its polling cycle from here
    # until the first task becomes final (release + hold), in whole poll intervals, so that
    # every task on schedule is polled exactly k times in the window
    w1 = w0 + max(1, int((release + s.hold - w0) // pi)) * pi
    await sample_until(w0)
    spy_proc = None
    if spy_out is not None:  # a profiling run: py-spy over the waiting window (its CPU figures are not reported)
        spy_proc = spy.record(bench.procs, target.proc.pid, max(1, int(w1 - w0)), "raw", spy_out,
                              OUT / "py-spy-images.log")
    noise = Noise()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    await sample_until(w1)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    finish_by = release + s.hold + s.spread + 2 * pi + 30
    while not storm.done() and time.monotonic() < finish_by:
        await sample()
        await asyncio.sleep(0.25)
    if not storm.done():
        storm.cancel()
    try:
        await storm
    except asyncio.CancelledError:
        pass
    if spy_proc is not None:
        await loop.run_in_executor(None, bench.procs.stop, spy_proc, 30.0)
    return {"result": result, "started": started, "submitted_at": submitted_at, "submitted": submitted,
            "complete": complete, "w0": t0, "w1": t1, "cpu_window": (cpu1 - cpu0) / (t1 - t0) * 100,
            "cpu_seconds": cpu1 - cpu0, "noise": noise.percent(), "ramp_noise": ramp_other,
            "rss_sampled_peak": rss_peak_sampled, "timeline": timeline}


def measure(bench: Session, target: Target, spy_out: Path | None = None) -> dict[str, Any]:
    """The scenario on a proxy just started: its catalogue loaded, the stub told to hold tasks."""
    s, stub = bench.s, bench.stub
    http_json(target.port, "GET", "/v1/models", headers=headers())  # the catalogue, loaded once
    http_json(stub.port, "POST", "/_reset?hold=1")
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        run = runner.run(_storm(bench, target, spy_out))
    res: StormResult = run["result"]
    stats = http_json(stub.port, "GET", "/_stats?detail=1", timeout=120)
    tasks = stats["tasks"]
    pi = s.poll_interval
    delays, lags, afters, answered, bad = [], [], [], 0, Counter[str]()
    for status, body, at in zip(res.statuses, res.bodies, res.answered_at, strict=True):
        if at is None:
            continue
        m = re.search(rb"/task/(\d+)\.png", body)
        if status != 200 or not m:
            bad[f"HTTP {status}"] += 1
            continue
        task = tasks.get(m.group(1).decode())
        if not task or task["final_at"] is None:
            bad["unknown task"] += 1
            continue
        answered += 1
        delays.append((at - task["final_at"]) * 1000)
        seen = next((p for p in task["polls"] if p >= task["final_at"]), None)
        if seen is not None:  # final -> the poll that saw it -> the client's answer
            lags.append((seen - task["final_at"]) * 1000)
            afters.append((at - seen) * 1000)
    gaps = [b - a for t in tasks.values() for a, b in zip(t["polls"], t["polls"][1:], strict=False)]
    early = [t for t in tasks.values() if t["polls"] and t["polls"][0] - t["created"] < s.first_poll - 0.01]
    in_window = sum(1 for t in tasks.values() for p in t["polls"] if run["w0"] <= p < run["w1"])
    window = run["w1"] - run["w0"]
    # the most polls the schedule allows in the window: one per poll_interval from first_poll on
    allowed = sum(max(0.0, run["w1"] - max(run["w0"], t["created"] + s.first_poll)) for t in tasks.values()) / pi
    per_second = [c for sec, c in stats["polls_per_second"] if run["w0"] <= sec and sec + 1 <= run["w1"]]
    nan = float("nan")
    return {
        "n": s.images, "answered": answered, "failed": s.images - answered, "bad": dict(bad),
        "errors": Counter(e.split(":", 1)[0] + ": " + e.split(":", 1)[1][:60] for e in res.errors).most_common(3),
        "ramp_s": run["submitted_at"] - run["started"],
        "submit_rate": run["submitted"] / max(1e-9, run["submitted_at"] - run["started"]),
        "window_s": window, "cpu_window": run["cpu_window"],
        "cpu_per_poll_us": run["cpu_seconds"] / in_window * 1e6 if in_window else nan,
        "noise": run["noise"], "ramp_noise": run["ramp_noise"],
        "polls_rate": in_window / window if window > 0 else nan,
        "polls_expected": allowed / window if window > 0 else nan,
        "submitted": run["submitted"], "ramp_complete": run["complete"], "timeline": run["timeline"],
        "unanswered": sum(1 for a in res.answered_at if a is None),
        "polls_max_second": max(per_second) if per_second else 0,
        "gap_min": min(gaps) if gaps else nan, "gap_p50": pct(gaps, 50),
        "fast_gaps": sum(1 for g in gaps if g < pi * 0.98), "gaps": len(gaps), "early_first_polls": len(early),
        "polls_total": stats["polls"],
        "delay_p50": pct(delays, 50), "delay_p99": pct(delays, 99), "delay_max": max(delays) if delays else nan,
        "delays": delays, "rss_sampled_peak": run["rss_sampled_peak"],
        "lag_p50": pct(lags, 50), "lag_max": max(lags) if lags else nan,
        "after_p50": pct(afters, 50), "after_p99": pct(afters, 99), "after_max": max(afters) if afters else nan,
        "rss_hwm": rss_mb(target.pids(), "VmHWM"),  # the proxy started fresh: its peak is this scenario's
    }


def run(bench: Session, tag: str = "images", spy_out: Path | None = None) -> dict[str, Any]:
    """A fresh proxy for the scenario, stopped after it."""
    proxy, _ = bench.proxy(1, tag)
    try:
        return measure(bench, proxy, spy_out)
    finally:
        bench.stop(proxy)


def summary(im: dict[str, Any], s: Settings) -> list[str]:
    lines = []
    if not im["ramp_complete"]:
        lines.append(f"[proxy-1w]   only {im['submitted']:,} of {s.images:,} submissions reached the stub in "
                     f"{s.ramp_limit:g} s ({im['submit_rate']:,.0f}/s)")
    return [*lines, f"[proxy-1w]   answered {im['answered']:,}/{im['n']:,}; VmHWM {im['rss_hwm']:.0f} MB; "
            f"CPU waiting {im['cpu_window']:.1f} %; polls {im['polls_rate']:,.0f}/s "
            f"(expected {im['polls_expected']:,.0f}); delay max {im['delay_max']:,.0f} ms"]


def profile(bench: Session) -> dict[str, Any] | None:
    """py-spy over the waiting window of a second, unmeasured run."""
    if not spy.binary():
        return None
    say(f"[proxy-1w] profiling {bench.s.images:,} waiting image requests (a second, unmeasured run) …")
    out = OUT / "profile-images.txt"
    out.unlink(missing_ok=True)
    run(bench, "images-profile", out)
    return {"summary": spy.summarise(out)} if out.exists() else None


def main() -> int:
    args, s = cli(__doc__)
    with Session(s) as bench:
        say(f"[proxy-1w] {s.images:,} concurrent image requests …")
        for line in summary(run(bench), s):
            say(line)
        if args.profile and profile(bench):
            say(f"[proxy-1w] profile of the waiting window: {OUT / 'profile-images.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
