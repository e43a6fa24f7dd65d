"""py-spy on the proxy (`--profile`): recording, and a summary of its collapsed stacks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lib.procs import Procs


def binary() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record(procs: Procs, pid: int, seconds: float, fmt: str, output: Path, log: Path) -> subprocess.Popen[bytes]:
    """py-spy at 250 Hz, non-blocking (the proxy is never paused), in `fmt` (flamegraph | raw)."""
    return procs.spawn([binary() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                        "250", "--format", fmt, "--output", str(output), "--nonblocking"], log)


def _package(frame: str) -> str:
    """py-spy names frames `function (path/to/module.py:line)`, paths relative to sys.path."""
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    path = m.group(1) if m else frame
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    top = path.lstrip("/").split("/", 1)[0]
    top = top[:-3] if top.endswith(".py") else top
    if top == "proxy" and "/" in path:
        return "proxy (ours)"
    if top in ("asyncio", "uvloop"):
        return "asyncio/uvloop (incl. time in uvloop's C code)"
    if top in sys.stdlib_module_names:
        return f"stdlib ({top})"
    return top


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks: self time per function and per package, inclusive time
    of our functions, and the split between the event-loop thread and the others."""
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    ours_incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        packages[_package(frames[-1])] += n
        if any("threading.py" in f for f in frames[:3]):
            worker = any("concurrent/futures/thread.py" in f for f in frames)
            threads["executor thread (run_in_executor / store)" if worker else "other thread"] += n
        else:
            threads["event loop thread"] += n
        for f in set(frames):
            incl[f] += n
            if _package(f) == "proxy (ours)" and not f.startswith(("main (", "_serve (", "<module>")):
                ours_incl[f] += n

    def share(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, count / total * 100) for name, count in c.most_common(k)] if total else []

    return {"samples": total, "self": share(self_counts, top), "packages": share(packages, 15),
            "ours_inclusive": share(ours_incl, 20), "inclusive": share(incl, top), "threads": share(threads, 5)}
