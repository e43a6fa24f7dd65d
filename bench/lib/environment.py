"""The machine, the versions, and the tools the benchmark installs for itself (wrk, matplotlib,
py-spy, LiteLLM in its own virtualenv)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as metadata
import os
import platform
import shutil
import subprocess
import sys

from lib import BENCH, OUT, ROOT, say

LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]==1.106.2")
NULL = subprocess.DEVNULL


def ensure_wrk(allow_install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("setup: installing wrk with apt-get …")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for step in (["update", "-qq"], ["install", "-y", "-qq", "wrk"]):
                subprocess.run(["apt-get", *step], check=False, timeout=300, env=env, stdout=NULL, stderr=NULL)
        except subprocess.TimeoutExpired:
            pass
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
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists() or not (LITELLM_VENV / "bin" / "litellm").exists():
        return None
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.strip() or None


def ensure_litellm(allow_install: bool) -> tuple[str | None, str]:
    """(version, note): the LiteLLM venv is reused when it holds the pinned version."""
    wanted = LITELLM_SPEC.split("==", 1)[1] if "==" in LITELLM_SPEC else None
    version = _litellm_version()
    if version and (wanted is None or version == wanted):
        return version, f"reused {LITELLM_VENV.relative_to(ROOT)}"
    if not allow_install:
        return None, "LiteLLM: skipped (no bench/.venv-litellm and installing is off in this mode)"
    say(f"setup: installing {LITELLM_SPEC} into {LITELLM_VENV.relative_to(ROOT)} (once; it is big) …")
    log = OUT / "litellm-install.log"
    base_python = getattr(sys, "_base_executable", sys.executable)
    try:
        with open(log, "wb") as out:
            if not (LITELLM_VENV / "bin" / "python").exists():
                subprocess.run([base_python, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300,
                               stdout=out, stderr=subprocess.STDOUT)
            subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True,
                           timeout=1800, stdout=out, stderr=subprocess.STDOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        return None, f"LiteLLM: skipped (install of {LITELLM_SPEC} failed: {error}; see {log})"
    version = _litellm_version()
    if not version:
        return None, f"LiteLLM: skipped (installed, but `litellm` does not import; see {log})"
    return version, "installed now"


def versions(litellm_version: str | None, wrk: str | None) -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for name in ("litestar", "uvicorn", "httpx", "httpx-aiohttp", "aiohttp", "msgspec", "structlog", "uvloop",
                 "httptools", "granian"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["litellm"] = litellm_version or "not run"
    if wrk:
        try:
            line = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
            found["wrk"] = (line.stdout or line.stderr).split()[1]
        except (subprocess.TimeoutExpired, IndexError):
            found["wrk"] = "?"
    else:
        found["load generator"] = "python fallback (bench/lib/loadclients.py pyload)"
    return found


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = "?"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        commit = head + (" + uncommitted changes in proxy/" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(), "memory": f"{mem:.1f} GiB",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "proxy commit": commit}
