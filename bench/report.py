"""The report of bench/run.py: results.md (tables, every target MET / NOT MET) and the chart.
Run alone, it prints the report of the last run again from its raw numbers (results.json keeps
every number but the 10,000 answer delays, so no chart).

    .venv/bin/python bench/report.py [bench/out/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from capacity import POLL_INTERVAL as CAPACITY_INTERVAL
from lib import OUT, fmt, table
from lib.procs import QUIET
from lib.targets import Settings

COLUMNS = {"direct": "direct (stub)", "proxy-1w": "this proxy, 1 worker", "proxy-2w": "this proxy, 2 workers",
           "litellm": "LiteLLM, 1 worker"}
Target = tuple[str, str, bool | None]


def _chat_rows(r: dict[str, Any], s: Settings) -> list[str]:
    c = f"{s.conns} connections"
    rows = [  # label, phase ("added": sequential, over direct), field, digits
        (f"sequential chat, {s.seq_count} req on 1 connection: p50 ms", "sequential", "p50", 3),
        ("sequential chat: p99 ms", "sequential", "p99", 3), ("added over direct: p50 ms", "added", "p50", 3),
        ("added over direct: p99 ms", "added", "p99", 3), ("sequential failures", "sequential", "failures", 0),
        (f"{c}, {s.wrk_seconds} s: good req/s", "load", "rps", 0), (f"{c}: p50 ms", "load", "p50", 2),
        (f"{c}: p99 ms", "load", "p99", 2), (f"{c}: non-2xx", "load", "non2xx", 0),
        (f"{c}: socket errors/timeouts", "load", "socket_errors", 0),
        (f"{c}: server CPU % (of one core)", "load", "cpu", 0), (f"{c}: stub CPU %", "load", "stub_cpu", 0),
        (f"{c}: wrk CPU %", "load", "wrk_cpu", 0), (f"{c}: server RSS after, MB", "load", "rss", 0),
        ("other processes' CPU % (of one core) during: sequential", "sequential", "noise", 0),
        (f"… during {c}", "load", "noise", 0), ("… during streamed", "stream", "noise", 0),
        (f"streamed chat, {s.stream_count} req: time to first data p50 ms", "stream", "ttfb_p50", 3),
        ("streamed chat: time to first data p99 ms", "stream", "ttfb_p99", 3),
        ("streamed chat: complete p50 ms", "stream", "p50", 3),
        ("startup: spawn to first 200, s", "startup", "ready", 2),
        ("idle RSS, MB (1 s after ready)", "startup", "rss", 1)]

    def cell(phase: str, field: str, key: str, digits: int) -> str:
        seq = r["sequential"]
        try:
            return fmt((None if key == "direct" else seq[key][field] - seq["direct"][field]) if phase == "added"
                       else r[phase][key][field], digits)
        except (KeyError, TypeError):
            return "–"

    return table(["metric", *COLUMNS.values()], ([label, *(cell(phase, field, k, digits) for k in COLUMNS)]
                                                   for label, phase, field, digits in rows))


def _image_rows(im: dict[str, Any], s: Settings) -> list[str]:
    lines = [f"## {im['n']:,} concurrent image requests (this proxy, 1 worker)", "",
             f"poll_interval {s.poll_interval:g} s, first_poll {s.first_poll:g} s; the stub holds every task "
             f"until all {im['n']:,} are submitted, then they become final from {s.hold:g} s later, spread "
             f"over {s.spread:g} s. \"While waiting\" is the window from first_poll after release to the "
             f"first final task ({im['window_s']:.1f} s).", ""]
    lines += table(["metric", "value"], [
        ("answered 200 with the task's URL", f"{im['answered']:,} / {im['n']:,}"),
        ("failed / unanswered at the end / errors",
         f"{im['failed']:,} / {im['unanswered']:,} {im['bad'] or ''} {im['errors'] or ''}".strip()),
        ("submitted to the stub before the release", f"{im['submitted']:,}" + (
            "" if im["ramp_complete"] else f" (NOT all: the ramp was cut at {s.ramp_limit:g} s)")),
        ("submit ramp (first connect to the release), s; submits/s",
         f"{fmt(im['ramp_s'])}; {fmt(im['submit_rate'], 0)}"),
        ("peak RSS (VmHWM), MB", fmt(im["rss_hwm"], 1)),
        ("CPU while waiting, % of one core", fmt(im["cpu_window"], 1)),
        ("other processes' CPU % (of one core): during the ramp / while waiting",
         f"{fmt(im['ramp_noise'], 0)} / {fmt(im['noise'], 0)}"),
        ("CPU per upstream poll while waiting, µs", fmt(im["cpu_per_poll_us"], 0)),
        ("upstream polls/s while waiting (stub count)", fmt(im["polls_rate"], 0)),
        ("expected polls/s (tasks / poll_interval, one poll per interval from first_poll)",
         fmt(im["polls_expected"], 0)),
        ("busiest whole second in the window, polls", fmt(im["polls_max_second"], 0)),
        ("per-task gap between polls: min / p50, s", f"{fmt(im['gap_min'], 3)} / {fmt(im['gap_p50'], 3)}"),
        ("gaps shorter than 0.98 × poll_interval", f"{im['fast_gaps']:,} of {im['gaps']:,}"),
        ("first polls sooner than first_poll", fmt(im["early_first_polls"], 0)),
        ("answer delay after final at the stub: p50 / p99 / max, ms",
         f"{fmt(im['delay_p50'], 0)} / {fmt(im['delay_p99'], 0)} / {fmt(im['delay_max'], 0)}"),
        ("… of which final → the poll that saw it: p50 / max, ms",
         f"{fmt(im['lag_p50'], 0)} / {fmt(im['lag_max'], 0)}"),
        ("… of which that poll at the stub → the client's answer: p50 / p99 / max, ms",
         f"{fmt(im['after_p50'], 1)} / {fmt(im['after_p99'], 1)} / {fmt(im['after_max'], 1)}")])
    every_5s = {int(row["t"] // 5): row for row in reversed(im.get("timeline") or [])}  # the first row of each 5 s
    if every_5s:
        lines += ["", "Timeline (about every 5 s; polls/s and CPU over the second before):", ""]
        lines += table(["s", "submitted", "answered", "polls/s", "proxy CPU %", "RSS MB"], (
            (f"{row['t']:.0f}", f"{row['submits']:,}", f"{row['answered']:,}", f"{row['polls_per_s']:,.0f}",
             f"{row['cpu']:.0f}", f"{row['rss']:.0f}") for _, row in sorted(every_5s.items())))
    return lines


def _capacity_rows(rows: list[dict[str, Any]]) -> list[str]:
    return [f"## One key's capacity (bench/capacity.py; poll_interval {CAPACITY_INTERVAL:g} s, 60 calls a minute)",
            "", *table(["case (upstream:requests:task s)", "answered", "calls per task", "upstream 429s",
                        "delay after the task's end p50 / p99 / max s", "wall s", "calls"],
                       ((c["case"], f"{c['finished']} of {c['requests']}", c["calls_per_task"], c["upstream_429"],
                         f"{c['delay_p50_s']} / {c['delay_p99_s']} / {c['delay_max_s']}", c["wall_s"],
                         ", ".join(f"{k} {v}" for k, v in c["calls"].items())) for c in rows))]


def targets(r: dict[str, Any], s: Settings) -> list[Target]:
    """Issue 6's targets and issue 13's (one key's capacity): (what, measured, met)."""
    seq, load, im, found = r["sequential"], r["load"], r.get("images"), list[Target]()
    if (p := seq.get("proxy-1w")) and (d := seq.get("direct")):
        a50, a99 = p["p50"] - d["p50"], p["p99"] - d["p99"]
        found += [("added latency p50 ≤ 1 ms", f"{a50:.3f} ms", a50 <= 1.0),
                  ("added latency p99 ≤ 3 ms", f"{a99:.3f} ms", a99 <= 3.0)]
    if l1 := load.get("proxy-1w"):
        found.append(("1 worker, 64 conns ≥ 2,000 good req/s", f"{l1['rps']:,.0f} req/s", l1["rps"] >= 2000))
        if l2 := load.get("proxy-2w"):
            ratio = l2["rps"] / l1["rps"] if l1["rps"] else 0.0
            found.append(("2 workers ≥ 1.6× one", f"{ratio:.2f}×", ratio >= 1.6))
    if im:
        held, limit = im["ramp_complete"], s.poll_interval * 1000 + 50
        short = "" if held else f" (only {im['submitted']:,} of {im['n']:,} were submitted)"
        found += [
            (f"{im['n']:,} waiting: peak RSS < 300 MB", f"{im['rss_hwm']:.0f} MB{short}", im["rss_hwm"] < 300 and held),
            (f"{im['n']:,} waiting: CPU < 25 % of one core", f"{im['cpu_window']:.1f} %{short}",
             im["cpu_window"] < 25 and held),
            ("polls never above 1/poll_interval per task",
             f"{im['polls_rate']:,.0f}/s vs {im['polls_expected']:,.0f}/s expected; min gap {im['gap_min']:.3f} s",
             im["fast_gaps"] == 0 and im["polls_rate"] <= im["polls_expected"] * 1.02),
            (f"answer delay ≤ poll_interval + 50 ms ({limit:,.0f} ms)",
             f"max {im['delay_max']:,.0f} ms (p99 {im['delay_p99']:,.0f})",
             im["delay_max"] <= limit and im["failed"] == 0 and held)]
    if st := r["startup"].get("proxy-1w"):
        found += [("idle RSS < 80 MB", f"{st['rss']:.1f} MB", st["rss"] < 80),
                  ("startup < 1 s", f"{st['ready']:.2f} s", st["ready"] < 1.0)]
    bounds = {"fengyuan:40:10": 1.5, "fengyuan:100:60": 1.5, "xffuw:20:60": 3.0}  # upstream calls per task
    for c in r.get("capacity") or []:
        name = c["case"]
        if name in bounds:
            found.append((f"{name}: ≤ {bounds[name]:g} upstream calls per task", f"{c['calls_per_task']}",
                          c["calls_per_task"] <= bounds[name]))
        found += [(f"{name}: 0 upstream 429s, every task answered",
                   f"{c['upstream_429']} 429s, {c['finished']} of {c['requests']}",
                   c["upstream_429"] == 0 and c["finished"] == c["requests"]),
                  (f"{name}: answer delay p99 ≤ 2 × poll_interval", f"{c['delay_p99_s']} s",
                   c["delay_p99_s"] <= 2 * CAPACITY_INTERVAL)]
    return found


def _profile_rows(r: dict[str, Any], s: Settings) -> list[str]:
    lines: list[str] = []
    for key, title, where in (
            ("profile", f"under {s.conns} connections",
             "flame graph in bench/out/profile.svg, collapsed stacks in bench/out/profile.txt"),
            ("profile_images", f"holding {s.images:,} waiting image requests (the waiting window)",
             "collapsed stacks in bench/out/profile-images.txt")):
        if not (sm := (r.get(key) or {}).get("summary")):
            continue
        lines += ["", f"## Profile of this proxy (1 worker) {title}", "",
                  f"py-spy, {sm['samples']:,} samples of busy threads (py-spy leaves idle ones out); {where}."]
        for heading, rows, name in (("Threads:", sm.get("threads", []), "thread"),
                                    ("Self time by package:", sm["packages"], "package"),
                                    ("Hottest functions (self time):", [(f"`{n}`", v) for n, v in sm["self"][:20]],
                                     "function"),
                                    ("Our code, inclusive time:", [(f"`{n}`", v) for n, v in sm["ours_inclusive"]],
                                     "function")):
            lines += ["", heading, "", *table([name, "%"], ((n, f"{v:.1f}") for n, v in rows))]
    return lines


def report(r: dict[str, Any], s: Settings, quick: bool) -> tuple[str, list[Target]]:
    """results.md's text and the targets."""
    lines = [f"# Benchmark results{' (--quick)' if quick else ''}", "", "## Machine and versions", "",
             *table(["", ""], [*r["machine"].items(), *r["versions"].items()]), "",
             "Everything on 127.0.0.1. One stub (bench/stub.py) answers xffuw chat.php for this proxy and an "
             "OpenAI /v1/chat/completions with the same content for direct and LiteLLM.", "",
             *(f"- {note}" for note in r["notes"]), "", "## Chat", "", *_chat_rows(r, s)]
    if im := r.get("images"):
        lines += ["", *_image_rows(im, s)]
    if r.get("capacity"):
        lines += ["", *_capacity_rows(r["capacity"])]
    noisy = [f"{name} {phase}" for phase in ("sequential", "load", "stream")
             for name, res in r[phase].items() if res.get("noise", 0) >= QUIET]
    noisy += ["image requests"] if im and im.get("noise", 0) >= QUIET else []
    if noisy:
        lines += ["", f"**Warning: other processes used ≥ {QUIET:g} % of a core during: {', '.join(noisy)}. "
                  "Those figures are disturbed; rerun on a quiet machine.**"]
    found = targets(r, s)
    lines += ["", "## Targets", "", *table(["target", "measured", ""],
                                           ((t, m, "MET" if ok else "NOT MET") for t, m, ok in found)),
              *_profile_rows(r, s), ""]
    return "\n".join(lines), found


def chart(r: dict[str, Any], s: Settings, path: Path) -> str | None:
    """Latency distributions as a PNG; a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: skipped (matplotlib not installed; pip install -r bench/requirements.txt)"
    names = {"direct": "direct", "proxy-1w": "this proxy 1w", "proxy-2w": "this proxy 2w", "litellm": "LiteLLM"}
    colors = {"direct": "tab:blue", "proxy-1w": "tab:orange", "proxy-2w": "tab:purple", "litellm": "tab:green"}
    fig, ((seq, load), (stream, delay)) = plt.subplots(2, 2, figsize=(13, 9))

    def axes(ax: Any, title: str, x: str, y: str, log: str) -> None:
        getattr(ax, f"set_{log}scale")("log")
        ax.set(title=title, xlabel=x, ylabel=y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()

    for ax, data, field, title in ((seq, r["sequential"], "total", f"sequential chat, 1 connection ({s.seq_count} "
                                    "requests)"), (stream, r["stream"], "first", "streamed chat: time to first data")):
        for key, res in data.items():
            if values := sorted(res[field]):
                ax.plot(values, [(i + 1) / len(values) * 100 for i in range(len(values))], label=names[key],
                        color=colors[key])
        axes(ax, title, "ms (log)", "percentile", "x")
    for key, res in r["load"].items():
        xs = [p for p, _ in res["curve"]]
        load.plot(range(len(xs)), [v for _, v in res["curve"]], marker=".", color=colors[key],
                  label=f"{names[key]} ({res['rps']:,.0f}/s)")
        load.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], rotation=60, fontsize=7)
    axes(load, f"{s.conns} connections, {s.wrk_seconds} s (wrk)", "percentile", "ms (log)", "y")
    if (im := r.get("images")) and im.get("delays"):
        delay.hist([v / 1000 for v in im["delays"]], bins=60, color="tab:orange")
        delay.axvline(s.poll_interval + 0.05, color="red", linestyle="--", label="poll_interval + 50 ms")
        delay.set(xlabel="s from task final at the stub to the client's answer", ylabel="requests",
                  title=f"{im['n']:,} waiting image requests: answer delay")
        delay.legend()
    else:
        delay.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    raw = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else OUT / "results.json").read_text())
    print(report(raw, Settings(**raw["settings"]), raw.get("quick", False))[0])
