#!/usr/bin/env python3
"""The benchmark of issue 6: direct vs this proxy vs LiteLLM's proxy, one stub, one run. It runs
the scenario programs in order (sequential.py, streams.py, throughput.py, images.py, the startup
trials and capacity.py) against each target and writes the report (report.py); see bench/README.md.

    .venv/bin/python bench/run.py            # full run, a few minutes
    .venv/bin/python bench/run.py --quick    # a few seconds per scenario, CI sanity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import capacity
import images
import sequential
import throughput
from lib import BENCH, OUT, ROOT, say
from lib.environment import ensure_bench_deps, ensure_litellm, ensure_wrk, machine, versions
from lib.procs import boost, rss_mb, wait_quiet
from lib.targets import Session, Target, check_chat, cli
from report import chart, report


def main() -> int:
    args, s = cli(__doc__, run=True)
    t_begin = time.monotonic()
    try:
        with Session(s, nice=args.nice) as bench:
            boost(os.getpid(), args.nice)  # this process (the clients) and, inherited, every child
            return _run(bench, args, t_begin)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every child process")
        return 130


def _run(bench: Session, args: argparse.Namespace, t_begin: float) -> int:
    s, notes, litellm_version = bench.s, list[str](), None
    if not (wrk := ensure_wrk(not args.skip_install)):
        notes.append("wrk not available: load from the Python fallback generator (it may be the bottleneck)")
        say("load generator: wrk missing, using the Python fallback (bench/lib/loadclients.py pyload)")
    ensure_bench_deps(not args.skip_install)
    if args.no_litellm:
        notes.append("LiteLLM: skipped (--no-litellm)")
    elif (found := ensure_litellm(not args.skip_install and not args.quick))[0] is None:
        notes.append(found[1])
        say(found[1])
    else:
        litellm_version = found[0]
    try:
        group = " (autogroup: " + Path("/proc/self/autogroup").read_text().strip() + ")"
    except OSError:
        group = ""
    notes.append(f"benchmark processes ran at nice {os.getpriority(os.PRIO_PROCESS, 0)}{group}")
    r: dict[str, Any] = {"machine": machine(), "versions": versions(litellm_version, wrk), "notes": notes,
                         "sequential": {}, "stream": {}, "load": {}, "startup": {}}
    say(f"machine: {r['machine']}")
    say(f"versions: {r['versions']}")

    def quiet(label: str) -> None:
        if s.quiet_wait > 0:
            wait_quiet(s.quiet_wait, label)

    def chat_scenarios(target: Target, with_sequential: bool = True) -> None:
        check_chat(target)
        quiet(target.name)
        if with_sequential:
            say(f"[{target.name}] sequential chat ×{s.seq_count} …")
            r["sequential"][target.name] = sequential.measure(target, s, stream=False)
            say(f"[{target.name}] streamed chat ×{s.stream_count} …")
            r["stream"][target.name] = sequential.measure(target, s, stream=True)
        say(f"[{target.name}] {s.conns} connections for {s.wrk_seconds} s …")
        quiet(f"{target.name} under load")
        throughput.measure(bench, wrk, target, s.wrk_warmup, warm_up=True)
        res = r["load"][target.name] = throughput.measure(bench, wrk, target, s.wrk_seconds)
        say(f"[{target.name}]   {res['rps']:,.0f} good req/s, p99 {res['p99']:.1f} ms, non-2xx {res['non2xx']}")

    def started(target: Target, ready: float) -> dict[str, float]:
        time.sleep(1.0)
        return {"ready": ready, "rss": rss_mb(target.pids())}

    chat_scenarios(bench.stub)  # direct
    trials = []  # this proxy, 1 worker: startup trials, idle RSS, then the chat scenarios
    for trial in range(s.startup_trials):
        quiet("a proxy start")
        proxy, ready = bench.proxy(1, "1w")
        trials.append(started(proxy, ready))
        if trial < s.startup_trials - 1:
            bench.stop(proxy)
    readies = [t["ready"] for t in trials]
    r["startup"]["proxy-1w"] = {"ready": statistics.median(readies),
                                "rss": statistics.median(t["rss"] for t in trials), "all": readies}
    say(f"[proxy-1w] startup {', '.join(f'{x:.2f}' for x in readies)} s; "
        f"idle RSS {r['startup']['proxy-1w']['rss']:.1f} MB")
    chat_scenarios(proxy)
    if args.profile:
        say(f"[proxy-1w] profiling with py-spy for 2×{s.profile_seconds} s under load …")
        r["profile"] = throughput.profile(bench, wrk, proxy)
    bench.stop(proxy)
    proxy2, ready2 = bench.proxy(2, "2w")  # this proxy, 2 workers: the load only
    r["startup"]["proxy-2w"] = started(proxy2, ready2)
    chat_scenarios(proxy2, with_sequential=False)
    bench.stop(proxy2)
    if litellm_version:
        say("[litellm] starting (≈10 s) …")
        try:
            lite, ready = bench.litellm()
            r["startup"]["litellm"] = started(lite, ready)
            chat_scenarios(lite)
            bench.stop(lite)
        except RuntimeError as error:
            notes.append(note := f"LiteLLM: skipped (it did not serve: {str(error).splitlines()[0]}; see "
                                 "bench/out/litellm.log)")
            say(note)

    say(f"[proxy-1w] {s.images:,} concurrent image requests …")  # on a fresh proxy: its VmHWM is the scenario's
    quiet("the image requests")
    r["images"] = images.run(bench)
    for line in images.summary(r["images"], s):
        say(line)
    if args.profile and (found_profile := images.profile(bench)):
        r["profile_images"] = found_profile
    r["capacity"] = []  # one rate-limited key's capacity (issue 13): the simulators and a proxy in this process
    for case in capacity.cases(args.quick):
        quiet(f"capacity {case.name}")
        say(f"[capacity] {case.name} …")
        r["capacity"].append(capacity.run_case(case))

    text, targets = report(r, s, args.quick)
    text += f"\nTotal benchmark time: {time.monotonic() - t_begin:.0f} s.\n"
    # a full run owns bench/results.md and bench/latency.png; --quick writes beside its logs
    results_md, chart_png = ((OUT / "results-quick.md", OUT / "latency-quick.png") if args.quick
                             else (BENCH / "results.md", BENCH / "latency.png"))
    if chart_note := chart(r, s, chart_png):
        say(chart_note)
    else:
        text += f"\nLatency distributions: {chart_png.relative_to(ROOT)}.\n"
    results_md.write_text(text)
    raw = {**r, "images": {k: v for k, v in r["images"].items() if k != "delays"},
           "settings": dataclasses.asdict(s), "quick": args.quick}  # report.py rebuilds results.md from these
    (OUT / "results.json").write_text(json.dumps(raw, default=str, indent=1))
    say(f"\n{text}\nTargets:")
    for label, measured, ok in targets:
        say(f"  {'MET    ' if ok else 'NOT MET'}  {label}: {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
