#!/usr/bin/env python3
"""The benchmark of issue 6: direct vs this proxy vs LiteLLM's proxy, one stub, one run.

    .venv/bin/python bench/run.py            # full run, a few minutes
    .venv/bin/python bench/run.py --quick    # a few seconds per scenario, CI sanity
    options: --no-litellm  --profile  --skip-install  --images N  --quiet-wait S  --nice N

Runs the scenario programs in order (sequential.py, streams.py, throughput.py, images.py, the
startup trials and capacity.py) against each target and writes the report (report.py). Everything runs
on 127.0.0.1; every child process is stopped by its process group at the end (Ctrl-C and
errors included). See bench/README.md.
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
from lib.targets import Session, Settings, Target, check_chat
from report import chart, report


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark: direct vs this proxy vs LiteLLM (issue 6).")
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario and 1,000 image requests")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--profile", action="store_true", help="also py-spy the proxy under the 64-connection load")
    parser.add_argument("--skip-install", action="store_true", help="install nothing (wrk, matplotlib, LiteLLM)")
    parser.add_argument("--images", type=int, metavar="N",
                        help="concurrent image requests in the waiting scenario (default 10,000; --quick 1,000)")
    parser.add_argument("--quiet-wait", type=float, metavar="S",
                        help="before each phase wait up to S s for other processes to leave the CPUs "
                             "(default 15, --quick 0)")
    parser.add_argument("--nice", type=int, default=-10, metavar="N",
                        help="run the benchmark and every process it starts at this nice value, ahead of "
                             "other work on the machine (default -10 when root; 0 leaves it)")
    args = parser.parse_args()
    s = Settings.quick() if args.quick else Settings()
    if args.quiet_wait is not None:
        s.quiet_wait = args.quiet_wait
    if args.images is not None:
        s.images = args.images
    t_begin = time.monotonic()
    try:
        with Session(s, nice=args.nice) as bench:
            boost(os.getpid(), args.nice)  # this process (the clients) and, inherited, every child
            return _run(bench, args, t_begin)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every child process")
        return 130


def _run(bench: Session, args: argparse.Namespace, t_begin: float) -> int:
    s = bench.s
    allow_install = not args.skip_install
    wrk = ensure_wrk(allow_install)
    notes: list[str] = []
    if not wrk:
        notes.append("wrk not available: load from the Python fallback generator (it may be the bottleneck)")
        say("load generator: wrk missing, using the Python fallback (bench/lib/loadclients.py pyload)")
    ensure_bench_deps(allow_install)
    litellm_version: str | None = None
    if args.no_litellm:
        notes.append("LiteLLM: skipped (--no-litellm)")
    else:
        litellm_version, note = ensure_litellm(allow_install and not args.quick)
        if litellm_version is None:
            notes.append(note)
            say(note)
    group = ""
    try:
        group = " (autogroup: " + Path("/proc/self/autogroup").read_text().strip() + ")"
    except OSError:
        pass
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

    # this proxy, 1 worker: startup trials, idle RSS, then the chat scenarios
    trials = []
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

    # this proxy, 2 workers: the load only
    proxy2, ready2 = bench.proxy(2, "2w")
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
            note = f"LiteLLM: skipped (it did not serve: {str(error).splitlines()[0]}; see bench/out/litellm.log)"
            notes.append(note)
            say(note)

    # 10,000 waiting image requests on a fresh proxy (its VmHWM is this scenario's peak)
    say(f"[proxy-1w] {s.images:,} concurrent image requests …")
    quiet("the image requests")
    r["images"] = images.run(bench)
    for line in images.summary(r["images"], s):
        say(line)
    if args.profile and (found := images.profile(bench)):
        r["profile_images"] = found

    # one rate-limited key's capacity (issue 13): the simulators and a proxy in this process
    r["capacity"] = []
    for case in capacity.cases(args.quick):
        quiet(f"capacity {case.name}")
        say(f"[capacity] {case.name} …")
        r["capacity"].append(capacity.run_case(case, args.quick).row())

    text, targets = report(r, s, args.quick)
    text += f"\nTotal benchmark time: {time.monotonic() - t_begin:.0f} s.\n"
    # a full run owns bench/results.md and bench/latency.png; --quick writes beside its logs
    results_md, chart_png = ((OUT / "results-quick.md", OUT / "latency-quick.png") if args.quick
                             else (BENCH / "results.md", BENCH / "latency.png"))
    chart_note = chart(r, s, chart_png)
    if chart_note:
        say(chart_note)
    else:
        text += f"\nLatency distributions: {chart_png.relative_to(ROOT)}.\n"
    results_md.write_text(text)
    raw = {k: v for k, v in r.items() if k != "images"}
    raw.update(images={k: v for k, v in (r.get("images") or {}).items() if k != "delays"},
               settings=dataclasses.asdict(s), quick=args.quick)  # report.py rebuilds results.md from these
    (OUT / "results.json").write_text(json.dumps(raw, default=str, indent=1))
    say("")
    say(text)
    say("Targets:")
    for label, measured, ok in targets:
        say(f"  {'MET    ' if ok else 'NOT MET'}  {label}: {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
