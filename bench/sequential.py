"""Sequential chat: requests one after another on one keep-alive connection from a raw-socket
client: p50 / p99 ms, and what a hop adds over the first target (bench/README.md, 1).

    .venv/bin/python bench/sequential.py [--quick] [--target direct --target proxy-1w …]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from lib import pct, say
from lib.loadclients import build_request, sequential
from lib.procs import Noise
from lib.targets import CHAT_BODY, EXPECT, HEADERS, STREAM_BODY, Session, Settings, Target, each_target


def measure(target: Target, s: Settings, stream: bool = False) -> dict[str, Any]:
    """Latencies in ms; streamed, also the time to the first body bytes holding `data:`."""
    raw = build_request("POST", target.path, target.port, STREAM_BODY if stream else CHAT_BODY, HEADERS)
    count, warm = (s.stream_count, s.stream_warmup) if stream else (s.seq_count, s.seq_warmup)
    noise = Noise()
    total, first, failures = sequential(target.port, raw, count, warm, b"[DONE]" if stream else EXPECT,
                                        time.monotonic() + 240)
    return {"n": len(total), "failures": failures, "total": total, "first": first, "noise": noise.percent(),
            "p50": pct(total, 50), "p99": pct(total, 99), "mean": statistics.fmean(total) if total else float("nan"),
            **({"ttfb_p50": pct(first, 50), "ttfb_p99": pct(first, 99)} if stream else {})}


def main(stream: bool = False, doc: str | None = __doc__) -> int:
    base: dict[str, Any] = {}

    def scenario(bench: Session, target: Target, args: argparse.Namespace) -> None:
        r = measure(target, bench.s, stream)
        first = f"first data p50 {r['ttfb_p50']:.3f} p99 {r['ttfb_p99']:.3f} ms; complete " if stream else ""
        added = f" (added over {args.target[0]}: {r['p50'] - base['p50']:.3f} / {r['p99'] - base['p99']:.3f})" \
            if base else ""
        say(f"[{target.name}] {r['n']} {'streamed' if stream else 'sequential'} requests: {first}p50 {r['p50']:.3f} "
            f"p99 {r['p99']:.3f} ms{added}, failures {r['failures']}, "
            f"other processes' CPU {r['noise']:.0f} % of a core")
        base.update(base or r)

    return each_target(doc, scenario)


if __name__ == "__main__":
    raise SystemExit(main())
