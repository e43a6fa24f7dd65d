"""10,000 waiting image requests on a fresh proxy (1 worker): peak RSS, CPU while waiting and
per poll, polls/s against the schedule, every gap between polls, the answer delay, a timeline
(bench/README.md, 4).

    .venv/bin/python bench/images.py [--quick] [--images N] [--profile]
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import uvloop
from lib import OUT, pct, say
from lib.environment import pyspy, record, summarise
from lib.loadclients import Storm, build_request, http_json, image_storm
from lib.procs import Noise, cpu_seconds, rss_mb
from lib.targets import HEADERS, IMAGE_BODY, Session, Settings, Target, cli


async def _storm(bench: Session, target: Target, spy_out: Path | None) -> dict[str, Any]:
    s, stub, loop, pi = bench.s, bench.stub, asyncio.get_running_loop(), bench.s.poll_interval
    raw = build_request("POST", "/v1/images/generations", target.port, IMAGE_BODY, HEADERS)
    result, pids, started, ramp_noise = Storm(s.images), target.pids(), time.monotonic(), Noise()
    storm = asyncio.ensure_future(image_storm(target.port, raw, result, s.ramp_limit + s.hold + s.spread + 2 * pi + 40))
    run: dict[str, Any] = {"result": result, "started": started, "rss_sampled_peak": 0.0, "timeline": []}
    last = {"t": started, "cpu": cpu_seconds(pids), "polls": 0}

    async def sample() -> dict[str, Any]:
        stats = await loop.run_in_executor(None, http_json, stub.port, "GET", "/_stats")
        rss, now, cpu = rss_mb(pids), time.monotonic(), cpu_seconds(pids)
        run["rss_sampled_peak"] = max(run["rss_sampled_peak"], rss)
        if now - last["t"] >= 1.0:  # one line a second: submits, polls/s, CPU %, RSS
            run["timeline"].append({"t": round(now - started, 2), "submits": stats["submits"],
                                    "polls_per_s": round((stats["polls"] - last["polls"]) / (now - last["t"]), 1),
                                    "cpu": round((cpu - last["cpu"]) / (now - last["t"]) * 100, 1),
                                    "rss": round(rss, 1), "answered": sum(a is not None for a in result.answered_at)})
            last.update(t=now, cpu=cpu, polls=stats["polls"])
        return stats

    async def sample_until(end: float, step: float = 0.25) -> None:
        while time.monotonic() < end:
            await sample()
            await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))

    # until the stub has every submission (at most ramp_limit s); then release: tasks final from release + hold
    stats, run["complete"] = await sample(), False
    while time.monotonic() - started < s.ramp_limit and not storm.done():
        if (stats := await sample())["submits"] >= s.images:
            run["complete"] = True
            break
        await asyncio.sleep(0.1)
    run.update(submitted_at=time.monotonic(), submitted=stats["submits"], ramp_noise=ramp_noise.percent())
    release = (await loop.run_in_executor(None, http_json, stub.port, "POST",
                                          f"/_release?after={s.hold}&spread={s.spread}&steps=1000"))["released_at"]
    w0 = release + s.first_poll + 0.25  # every task submitted so far is in its polling cycle from here
    # until the first task is final (release + hold), in whole poll intervals: every task on
    # schedule is polled exactly k times in the window
    w1 = w0 + max(1, int((release + s.hold - w0) // pi)) * pi
    await sample_until(w0)
    spy = None if spy_out is None else record(bench.procs, target.proc.pid, max(1, int(w1 - w0)), "raw", spy_out,
                                              OUT / "py-spy-images.log")  # a profiling run: its CPU is not reported
    noise, cpu0, t0 = Noise(), cpu_seconds(pids), time.monotonic()
    await sample_until(w1)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    while not storm.done() and time.monotonic() < release + s.hold + s.spread + 2 * pi + 30:
        await sample()
        await asyncio.sleep(0.25)
    storm.cancel()
    with suppress(asyncio.CancelledError):
        await storm
    if spy is not None:
        await loop.run_in_executor(None, bench.procs.stop, spy, 30.0)
    return {**run, "w0": t0, "w1": t1, "cpu_window": (cpu1 - cpu0) / (t1 - t0) * 100, "cpu_seconds": cpu1 - cpu0,
            "noise": noise.percent()}


def measure(bench: Session, target: Target, spy_out: Path | None = None) -> dict[str, Any]:
    """The scenario on a proxy just started: its catalogue loaded, the stub told to hold tasks."""
    s, stub, pi = bench.s, bench.stub, bench.s.poll_interval
    http_json(target.port, "GET", "/v1/models", headers=HEADERS)  # the catalogue, loaded once
    http_json(stub.port, "POST", "/_reset?hold=1")
    run = uvloop.run(_storm(bench, target, spy_out))
    res: Storm = run["result"]
    stats = http_json(stub.port, "GET", "/_stats?detail=1", timeout=120)
    tasks = stats["tasks"]
    delays, lags, afters, bad = [], [], [], Counter[str]()
    for status, body, at in zip(res.statuses, res.bodies, res.answered_at, strict=True):
        if at is None:
            continue
        m = re.search(rb"/task/(\d+)\.png", body)
        task = tasks.get(m.group(1).decode()) if status == 200 and m else None
        if not task or task["final_at"] is None:
            bad[f"HTTP {status}" if status != 200 or not m else "unknown task"] += 1
            continue
        delays.append((at - task["final_at"]) * 1000)
        if (seen := next((p for p in task["polls"] if p >= task["final_at"]), None)) is not None:
            lags.append((seen - task["final_at"]) * 1000)  # final -> the poll that saw it -> the client's answer
            afters.append((at - seen) * 1000)
    gaps = [b - a for t in tasks.values() for a, b in zip(t["polls"], t["polls"][1:], strict=False)]
    w0, w1 = run["w0"], run["w1"]
    in_window, window = sum(w0 <= p < w1 for t in tasks.values() for p in t["polls"]), w1 - w0
    # the most polls the schedule allows in the window: one per poll_interval from first_poll on
    allowed = sum(max(0.0, w1 - max(w0, t["created"] + s.first_poll)) for t in tasks.values()) / pi
    per_second = [c for sec, c in stats["polls_per_second"] if w0 <= sec and sec + 1 <= w1]
    nan, ramp = float("nan"), run["submitted_at"] - run["started"]
    return {
        "n": s.images, "answered": len(delays), "failed": s.images - len(delays), "bad": dict(bad),
        "errors": Counter(e.split(":", 1)[0] + ": " + e.split(":", 1)[1][:60] for e in res.errors).most_common(3),
        "ramp_s": ramp, "submit_rate": run["submitted"] / max(1e-9, ramp), "window_s": window,
        "cpu_window": run["cpu_window"], "cpu_per_poll_us": run["cpu_seconds"] / in_window * 1e6 if in_window else nan,
        "noise": run["noise"], "ramp_noise": run["ramp_noise"], "polls_rate": in_window / window if window > 0 else nan,
        "polls_expected": allowed / window if window > 0 else nan, "submitted": run["submitted"],
        "ramp_complete": run["complete"], "timeline": run["timeline"],
        "unanswered": sum(a is None for a in res.answered_at), "polls_max_second": max(per_second, default=0),
        "gap_min": min(gaps, default=nan), "gap_p50": pct(gaps, 50), "fast_gaps": sum(g < pi * 0.98 for g in gaps),
        "gaps": len(gaps), "polls_total": stats["polls"],
        "early_first_polls": sum(bool(t["polls"]) and t["polls"][0] - t["created"] < s.first_poll - 0.01
                                 for t in tasks.values()),
        "delay_p50": pct(delays, 50), "delay_p99": pct(delays, 99), "delay_max": max(delays, default=nan),
        "delays": delays, "rss_sampled_peak": run["rss_sampled_peak"], "lag_p50": pct(lags, 50),
        "lag_max": max(lags, default=nan), "after_p50": pct(afters, 50), "after_p99": pct(afters, 99),
        "after_max": max(afters, default=nan),
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
    cut = [] if im["ramp_complete"] else [f"[proxy-1w]   only {im['submitted']:,} of {s.images:,} submissions reached "
                                          f"the stub in {s.ramp_limit:g} s ({im['submit_rate']:,.0f}/s)"]
    return [*cut, f"[proxy-1w]   answered {im['answered']:,}/{im['n']:,}; VmHWM {im['rss_hwm']:.0f} MB; CPU waiting "
            f"{im['cpu_window']:.1f} %; polls {im['polls_rate']:,.0f}/s (expected {im['polls_expected']:,.0f}); "
            f"delay max {im['delay_max']:,.0f} ms"]


def profile(bench: Session) -> dict[str, Any] | None:
    """py-spy over the waiting window of a second, unmeasured run."""
    if not pyspy():
        return None
    say(f"[proxy-1w] profiling {bench.s.images:,} waiting image requests (a second, unmeasured run) …")
    out = OUT / "profile-images.txt"
    out.unlink(missing_ok=True)
    run(bench, "images-profile", out)
    return {"summary": summarise(out)} if out.exists() else None


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
