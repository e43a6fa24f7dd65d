"""The machine, the versions, the tools the benchmark installs for itself (wrk, matplotlib, py-spy,
LiteLLM in its own virtualenv), and py-spy's profiles and their summary."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

from lib import BENCH, OUT, ROOT, say
from lib.procs import Procs

LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]==1.106.2")
NULL = subprocess.DEVNULL


def ensure_wrk(allow_install: bool) -> str | None:
    if not shutil.which("wrk") and allow_install and os.geteuid() == 0 and shutil.which("apt-get"):
        say("setup: installing wrk with apt-get …")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["update", "-qq"], ["install", "-y", "-qq", "wrk"]):
            try:
                subprocess.run(["apt-get", *step], check=False, timeout=300, env=env, stdout=NULL, stderr=NULL)
            except subprocess.TimeoutExpired:
                break
    return shutil.which("wrk")


def ensure_bench_deps(allow_install: bool) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if allow_install:
            say(f"setup: installing bench-only deps ({BENCH / 'requirements.txt'}) into {sys.prefix} …")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
                           check=False, timeout=600, stdout=NULL, stderr=NULL)


def _litellm_version() -> str | None:
    with suppress(subprocess.TimeoutExpired, OSError):
        if (LITELLM_VENV / "bin" / "litellm").exists():
            return subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c", "import importlib.metadata as m; "
                                   "print(m.version('litellm'))"], capture_output=True, text=True,
                                  timeout=60).stdout.strip() or None
    return None


def ensure_litellm(allow_install: bool) -> tuple[str | None, str]:
    """(version, note): the LiteLLM venv is reused when it holds the pinned version."""
    version = _litellm_version()
    if version and ("==" not in LITELLM_SPEC or version == LITELLM_SPEC.split("==", 1)[1]):
        return version, f"reused {LITELLM_VENV.relative_to(ROOT)}"
    if not allow_install:
        return None, "LiteLLM: skipped (no bench/.venv-litellm and installing is off in this mode)"
    say(f"setup: installing {LITELLM_SPEC} into {LITELLM_VENV.relative_to(ROOT)} (once; it is big) …")
    log = OUT / "litellm-install.log"
    try:
        with open(log, "wb") as out:
            if not (LITELLM_VENV / "bin" / "python").exists():
                subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(LITELLM_VENV)],
                               check=True, timeout=300, stdout=out, stderr=subprocess.STDOUT)
            subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True,
                           timeout=1800, stdout=out, stderr=subprocess.STDOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        return None, f"LiteLLM: skipped (install of {LITELLM_SPEC} failed: {error}; see {log})"
    version = _litellm_version()
    return (version, "installed now") if version else \
        (None, f"LiteLLM: skipped (installed, but `litellm` does not import; see {log})")


def versions(litellm_version: str | None, wrk: str | None) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("litestar", "uvicorn", "httpx", "httpx-aiohttp", "aiohttp", "msgspec", "structlog", "uvloop",
                 "httptools", "granian"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["litellm"] = litellm_version or "not run"
    if not wrk:
        found["load generator"] = "python fallback (bench/lib/loadclients.py pyload)"
        return found
    try:
        line = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
        found["wrk"] = (line.stdout or line.stderr).split()[1]
    except (subprocess.TimeoutExpired, IndexError):
        found["wrk"] = "?"
    return found


def machine() -> dict[str, str]:
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    commit = "?"
    with suppress(OSError, subprocess.TimeoutExpired):
        commit = git("rev-parse", "--short", "HEAD") + (
            " + uncommitted changes in proxy/" if git("status", "--porcelain", "--", "proxy") else "")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(), "memory": f"{mem:.1f} GiB",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "proxy commit": commit}


# ---- py-spy (--profile)

def pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record(procs: Procs, pid: int, seconds: float, fmt: str, output: Path, log: Path) -> subprocess.Popen[bytes]:
    """py-spy at 250 Hz, non-blocking (the proxy is never paused), in `fmt` (flamegraph | raw)."""
    return procs.spawn([pyspy() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                        "250", "--format", fmt, "--output", str(output), "--nonblocking"], log)


def _package(frame: str) -> str:
    """py-spy names frames `function (path/to/module.py:line)`, paths relative to sys.path."""
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    path = (m.group(1) if m else frame).split("site-packages/")[-1]
    top = path.lstrip("/").split("/", 1)[0].removesuffix(".py")
    if top == "proxy" and "/" in path:
        return "proxy (ours)"
    if top in ("asyncio", "uvloop"):
        return "asyncio/uvloop (incl. time in uvloop's C code)"
    return f"stdlib ({top})" if top in sys.stdlib_module_names else top


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks: self time per function and per package, inclusive time
    of our functions, and the split between the event-loop thread and the others."""
    counters: dict[str, Counter[str]] = {k: Counter() for k in ("self", "inclusive", "packages", "ours", "threads")}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not stack or not count.isdigit() or not frames:
            continue
        n = int(count)
        total += n
        counters["self"][frames[-1]] += n
        counters["packages"][_package(frames[-1])] += n
        worker = any("concurrent/futures/thread.py" in f for f in frames)
        counters["threads"][("executor thread (run_in_executor / store)" if worker else "other thread")
                            if any("threading.py" in f for f in frames[:3]) else "event loop thread"] += n
        for f in set(frames):
            counters["inclusive"][f] += n
            if _package(f) == "proxy (ours)" and not f.startswith(("main (", "_serve (", "<module>")):
                counters["ours"][f] += n

    def share(name: str, k: int) -> list[tuple[str, float]]:
        return [(f, c / total * 100) for f, c in counters[name].most_common(k)] if total else []

    return {"samples": total, "self": share("self", top), "packages": share("packages", 15),
            "ours_inclusive": share("ours", 20), "inclusive": share("inclusive", top), "threads": share("threads", 5)}
