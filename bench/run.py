#!/usr/bin/env python3
"""The benchmark of issue 6: direct vs this proxy vs LiteLLM's proxy, one stub, one run.

    .venv/bin/python bench/run.py            # full run, a few minutes
    .venv/bin/python bench/run.py --quick    # a few seconds per scenario, CI sanity
    options: --no-litellm  --profile  --skip-install

Everything runs on 127.0.0.1; every child process is started in its own session and
killed at the end (Ctrl-C and errors included). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata as metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
sys.path.insert(0, str(BENCH))

import loadclients as lc  # noqa: E402
from stub import CONTENT  # noqa: E402

PROXY_BIN = ROOT / ".venv" / "bin" / "proxy"
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]==1.106.2")
CLIENT_KEY = "sk-bench"
CHAT_BODY = json.dumps({"model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}).encode()
STREAM_BODY = json.dumps({"model": "gpt-4o-mini", "stream": True,
                          "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}).encode()
IMAGE_BODY = json.dumps({"model": "gpt-image-2", "prompt": "an orange cat, studio photo"}).encode()
EXPECT = CONTENT[:40].encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Settings:
    seq_count: int = 2000
    seq_warmup: int = 200
    stream_count: int = 1000
    stream_warmup: int = 100
    conns: int = 64
    wrk_seconds: int = 20
    wrk_warmup: int = 2
    images: int = 10_000
    poll_interval: float = 2.0
    first_poll: float = 1.0
    hold: float = 8.0  # seconds after all tasks are submitted before the first becomes final
    spread: float = 4.0  # final times spread over this many seconds
    startup_trials: int = 3
    profile_seconds: int = 10
    ramp_limit: float = 60.0  # seconds the image submissions may take before the release regardless
    quiet_wait: float = 15.0  # seconds to wait, before each phase, for other processes to leave the CPUs

    @classmethod
    def quick(cls) -> Settings:
        return cls(seq_count=300, seq_warmup=50, stream_count=200, stream_warmup=20, wrk_seconds=3, wrk_warmup=1,
                   images=1000, hold=4.0, spread=2.0, startup_trials=1, profile_seconds=3,
                   ramp_limit=30.0, quiet_wait=0.0)


# ---------------------------------------------------------------- processes

class Procs:
    """Children in their own sessions (process groups), stopped by group id at the end."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None,
              stdout: Any = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        out = open(log, "wb") if log else (stdout or subprocess.DEVNULL)
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(cwd))
        if log:
            out.close()
        self.running[proc.pid] = (name, proc)
        boost(proc.pid)  # its own session: its own scheduler autogroup
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 8.0) -> None:
        self.running.pop(proc.pid, None)
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _killpg(proc.pid, signal.SIGKILL)  # stragglers in the group (uvicorn workers)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for _, proc in list(self.running.values()):
            self.stop(proc, grace=3.0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


PROCS = Procs()
BOOST = 0  # nice value for the benchmark's processes, set from --nice


def boost(pid: int) -> None:
    """Put the process's scheduler autogroup (one per session on Linux with autogroups) at
    BOOST. Plain nice only ranks threads inside one autogroup; between the sessions of other
    work on the machine the autogroup's nice decides."""
    if not BOOST:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, BOOST)
    except OSError:
        pass
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(BOOST))
    except OSError:
        pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- /proc readings

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids[ppid].append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    return found


def cpu_seconds(pids: list[int], reaped: bool = False) -> float:
    """utime + stime of the processes; with `reaped`, also of their children already waited for."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        if reaped:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every core) since boot."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Noise:
    """CPU used by processes outside this benchmark (other sessions, tests) over a phase,
    in % of one core: the machine's busy time minus this process tree's."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.busy = machine_busy()
        self.ours = cpu_seconds(tree(os.getpid()), reaped=True)

    def percent(self) -> float:
        elapsed = max(1e-3, time.monotonic() - self.t)
        ours = cpu_seconds(tree(os.getpid()), reaped=True) - self.ours
        return max(0.0, (machine_busy() - self.busy - ours) / elapsed * 100)


QUIET = 15.0  # % of one core used by others below which the machine counts as quiet


def wait_quiet(limit: float, label: str) -> float:
    """Wait (at most `limit` s) for one second in which other processes use < QUIET % of a core."""
    started = time.monotonic()
    while True:
        noise = Noise()
        time.sleep(1.0)
        other = noise.percent()
        if other < QUIET or time.monotonic() - started >= limit:
            if other >= QUIET:
                say(f"  note: the machine is busy before {label}: other processes use {other:.0f} % of a core")
            return other


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pids: list[int], field: str = "VmRSS") -> float:
    return sum(status_kb(p, field) for p in pids) / 1024


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def say(text: str = "") -> None:
    print(text, flush=True)


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float, log: Path | None) -> float:
    """Seconds from now until `path` answers 200 (polled every 5 ms)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready\n{tail}")
        try:
            status, _ = lc.http_request(port, "GET", path, timeout=2)
            if status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


# ---------------------------------------------------------------- setup

def ensure_wrk(allow_install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("setup: installing wrk with apt-get …")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, timeout=300, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
    return shutil.which("wrk")


def ensure_bench_deps(allow_install: bool) -> None:
    missing = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib")
    if missing and allow_install:
        say(f"setup: installing bench-only deps ({BENCH / 'requirements.txt'}) into {sys.prefix} …")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
                       check=False, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
        found["load generator"] = "python fallback (bench/loadclients.py pyload)"
    return found


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
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


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, 40000):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            break
        except (ValueError, OSError):
            continue
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    port: int
    path: str = "/v1/chat/completions"
    health: str = "/healthz"
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []


# Tables the proxy may or may not know yet (it is under active development): each is kept
# only when `proxy check-config` accepts it.
def _optional_tables() -> list[str]:
    return [f"""
[storage]
path = "{OUT / 'proxy.sqlite3'}"
""", """
[images]
response_format = {"gpt-image-*" = "url"}  # answer the stub's URLs, as measured before b64_json became the default
"""]


def proxy_config(stub_port: int, port: int, s: Settings) -> Path:
    path = OUT / "proxy-bench.toml"
    base = _proxy_config_text(stub_port, port, s)
    path.write_text(base)
    check = subprocess.run([str(PROXY_BIN), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise RuntimeError(f"the generated proxy config is rejected: {check.stderr.strip() or check.stdout.strip()}")
    text = base
    for table in _optional_tables():
        path.write_text(text + table)
        check = subprocess.run([str(PROXY_BIN), "check-config", str(path)], capture_output=True, text=True,
                               timeout=60)
        if check.returncode == 0:
            text += table
    path.write_text(text)
    return path


def fresh_store() -> None:
    for suffix in ("", "-wal", "-shm"):
        (OUT / f"proxy.sqlite3{suffix}").unlink(missing_ok=True)


def _proxy_config_text(stub_port: int, port: int, s: Settings) -> str:
    return (f"""# generated by bench/run.py
[server]
host = "127.0.0.1"
port = {port}
shutdown_grace = 2.0

[[clients]]
name = "bench"
key = "{CLIENT_KEY}"

[providers.xffuw]
base_url = "http://127.0.0.1:{stub_port}/api/v1/"
keys = ["xf_bench_key"]

[tasks]
poll_interval = {s.poll_interval}
first_poll = {s.first_poll}
timeout = {max(120.0, s.hold + s.spread + 120):.0f}

[log]
level = "info"
format = "json"
""")


def start_proxy(config: Path, port: int, workers: int, tag: str) -> tuple[Target, float]:
    log = OUT / f"proxy-{tag}.log"
    fresh_store()
    env = {k: v for k, v in os.environ.items() if k != "PROXY_CONFIG"}
    started = time.monotonic()
    proc = PROCS.spawn(f"proxy {tag}", [str(PROXY_BIN), "serve", "--config", str(config), "--workers",
                                        str(workers)], env=env, log=log, cwd=OUT)
    target = Target(f"proxy-{workers}w", port, proc=proc, log=log)
    try:
        wait_ready(proc, port, "/healthz", 60, log)
    except RuntimeError:
        PROCS.stop(proc)
        raise
    return target, time.monotonic() - started


def start_proxy_retrying(config: Path, port: int, workers: int, tag: str, attempts: int = 3) -> tuple[Target, float]:
    """The proxy is under active development: when it fails to start, wait and try again."""
    for attempt in range(1, attempts + 1):
        try:
            return start_proxy(config, port, workers, tag)
        except RuntimeError as error:
            if attempt == attempts:
                raise
            say(f"  proxy did not start ({str(error).splitlines()[0]}); retrying in 60 s ({attempt}/{attempts})")
            time.sleep(60)
    raise AssertionError


def litellm_config(stub_port: int) -> Path:
    path = OUT / "litellm-bench.yaml"
    path.write_text(f"""# generated by bench/run.py
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{stub_port}/v1
      api_key: sk-stub
general_settings:
  master_key: {CLIENT_KEY}
litellm_settings:
  telemetry: false
""")
    return path


def start_litellm(stub_port: int, port: int) -> tuple[Target, float]:
    log = OUT / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "NO_DOCS": "True"}
    env.pop("DATABASE_URL", None)
    started = time.monotonic()
    proc = PROCS.spawn("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(litellm_config(stub_port)),
                                   "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                       env=env, log=log, cwd=OUT)
    target = Target("litellm", port, health="/health/liveliness", proc=proc, log=log)
    try:
        wait_ready(proc, port, "/health/liveliness", 180, log)
    except RuntimeError:
        PROCS.stop(proc)
        raise
    return target, time.monotonic() - started


# ---------------------------------------------------------------- scenarios

def headers() -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}


def check_chat(target: Target) -> None:
    status, body = lc.http_request(target.port, "POST", target.path, CHAT_BODY, headers())
    if status != 200 or EXPECT not in body:
        raise RuntimeError(f"{target.name}: chat answered HTTP {status}: {body[:300]!r}")


def scenario_sequential(target: Target, s: Settings, stream: bool) -> dict[str, Any]:
    body = STREAM_BODY if stream else CHAT_BODY
    raw = lc.build_request("POST", target.path, target.port, body, headers())
    count = s.stream_count if stream else s.seq_count
    warm = s.stream_warmup if stream else s.seq_warmup
    expect = b"[DONE]" if stream else EXPECT
    noise = Noise()
    total, first, failures = lc.sequential(target.port, raw, count, warm, expect, time.monotonic() + 240)
    result = {"n": len(total), "failures": failures, "total": total, "first": first, "noise": noise.percent(),
              "p50": pct(total, 50), "p99": pct(total, 99), "mean": statistics.fmean(total) if total else float("nan")}
    if stream:
        result.update(ttfb_p50=pct(first, 50), ttfb_p99=pct(first, 99))
    return result


def run_load(wrk: str | None, target: Target, seconds: int, conns: int, stub: Target,
             measure: bool = True) -> dict[str, Any]:
    """wrk -t1 -cN -dS on the target's chat route; CPU % of target, stub and load generator."""
    body_file = OUT / "chat-body.json"
    body_file.write_bytes(CHAT_BODY)
    result_file = OUT / f"wrk-{target.name}.json"
    result_file.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{target.port}{target.path}"
    pids = target.pids()
    stub_pids = stub.pids()
    noise = Noise()
    cpu0, stub0, t0 = cpu_seconds(pids), cpu_seconds(stub_pids), time.monotonic()
    if wrk:
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_OUT": str(result_file), "BENCH_KEY": CLIENT_KEY}
        proc = PROCS.spawn("wrk", [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
                                   "-s", str(BENCH / "wrk_post.lua"), url], env=env, log=OUT / "wrk.log")
        wrk_cpu = 0.0
        try:
            while proc.poll() is None and time.monotonic() - t0 < seconds + 30:
                wrk_cpu = cpu_seconds([proc.pid]) or wrk_cpu
                time.sleep(0.2)
        finally:
            PROCS.stop(proc, grace=2)
        if not result_file.exists():
            raise RuntimeError(f"wrk wrote no result; see {OUT / 'wrk.log'}")
        data = json.loads(result_file.read_text())
    else:
        raw = lc.build_request("POST", target.path, target.port, CHAT_BODY, headers())
        data = asyncio.run(lc.pyload(target.port, raw, conns, seconds))
        wrk_cpu = float("nan")
    elapsed = time.monotonic() - t0
    if not measure:
        return data
    duration = data["duration_us"] / 1e6
    good = data["requests"] - data["non2xx"]
    return {"rps": good / duration, "requests": data["requests"], "non2xx": data["non2xx"],
            "socket_errors": data["connect"] + data["read"] + data["write"] + data["timeout"],
            "p50": data["percentiles"]["50"] / 1000, "p99": data["percentiles"]["99"] / 1000,
            "curve": [(p, us / 1000) for p, us in data["curve"]],
            "cpu": (cpu_seconds(pids) - cpu0) / elapsed * 100,
            "stub_cpu": (cpu_seconds(stub_pids) - stub0) / elapsed * 100,
            "wrk_cpu": wrk_cpu / elapsed * 100, "rss": rss_mb(target.pids()), "noise": noise.percent()}


def profile(wrk: str | None, target: Target, s: Settings, stub: Target) -> dict[str, Any] | None:
    """py-spy on the proxy (1 worker) under the 64-connection load: an SVG and collapsed stacks."""
    spy = _py_spy()
    if not Path(spy).exists():
        say("profile: skipped (py-spy not installed; pip install py-spy)")
        return None
    assert target.proc is not None
    pid = target.proc.pid
    load_seconds = 2 * s.profile_seconds + 6
    import threading
    holder: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: holder.update(run_load(wrk, target, load_seconds, s.conns, stub)))
    loader.start()
    time.sleep(2)
    out: dict[str, Any] = {}
    for fmt, name in (("flamegraph", "profile.svg"), ("raw", "profile.txt")):
        proc = PROCS.spawn("py-spy", [spy, "record", "--pid", str(pid), "--duration", str(s.profile_seconds),
                                      "--rate", "250", "--format", fmt, "--output", str(OUT / name), "--nonblocking"],
                           log=OUT / f"py-spy-{fmt}.log")
        try:
            proc.wait(timeout=s.profile_seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        PROCS.stop(proc, grace=2)
    loader.join(timeout=load_seconds + 60)
    raw = OUT / "profile.txt"
    if not raw.exists():
        say(f"profile: py-spy produced nothing; see {OUT / 'py-spy-raw.log'}")
        return None
    out["summary"] = summarise_profile(raw)
    out["load"] = holder
    return out


def _py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def _frame_package(frame: str) -> str:
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


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
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
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        self_counts[leaf] += n
        packages[_frame_package(leaf)] += n
        if any("threading.py" in f for f in frames[:3]):
            worker = next((f for f in frames if "concurrent/futures/thread.py" in f), None)
            threads["executor thread (run_in_executor / store)" if worker else "other thread"] += n
        else:
            threads["event loop thread"] += n
        for f in set(frames):
            incl[f] += n
            if _frame_package(f) == "proxy (ours)" and not f.startswith(("main (", "_serve (", "<module>")):
                ours_incl[f] += n

    def share(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, count / total * 100) for name, count in c.most_common(k)] if total else []

    return {"samples": total, "self": share(self_counts, top), "packages": share(packages, 15),
            "ours_inclusive": share(ours_incl, 20), "inclusive": share(incl, top), "threads": share(threads, 5)}


async def _storm(target: Target, stub: Target, s: Settings, spy: Path | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    raw = lc.build_request("POST", "/v1/images/generations", target.port, IMAGE_BODY, headers())
    pi = s.poll_interval
    result = lc.StormResult()
    pids = target.pids()
    started = time.monotonic()
    ramp_noise = Noise()
    storm = asyncio.ensure_future(lc.image_storm(
        target.port, raw, s.images, s.ramp_limit + s.hold + s.spread + 2 * pi + 40, result=result))
    rss_peak_sampled = 0.0
    timeline: list[dict[str, float]] = []
    last = {"t": started, "cpu": cpu_seconds(pids), "polls": 0}

    async def sample() -> dict[str, Any]:
        nonlocal rss_peak_sampled
        stats = await loop.run_in_executor(None, lc.http_json, stub.port, "GET", "/_stats")
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
        None, lc.http_json, stub.port, "POST", f"/_release?after={s.hold}&spread={s.spread}&steps=1000"))["released_at"]
    w0 = release + s.first_poll + 0.25  # every task submitted so far is in its polling cycle from here
    # until the first task becomes final (release + hold), in whole poll intervals, so that
    # every task on schedule is polled exactly k times in the window
    k = max(1, int((release + s.hold - w0) // pi))
    w1 = w0 + k * pi
    while time.monotonic() < w0:
        await sample()
        await asyncio.sleep(min(0.25, max(0.0, w0 - time.monotonic())))
    spy_proc = None
    if spy is not None:  # a profiling run: py-spy over the waiting window (its CPU figures are not reported)
        spy_proc = PROCS.spawn("py-spy", [_py_spy(), "record", "--pid", str(target.proc.pid),  # type: ignore[union-attr]
                                          "--duration", str(max(1, int(w1 - w0))), "--rate", "250", "--format", "raw",
                                          "--output", str(spy), "--nonblocking"], log=OUT / "py-spy-images.log")
    noise = Noise()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    while time.monotonic() < w1:
        await sample()
        await asyncio.sleep(min(0.25, max(0.0, w1 - time.monotonic())))
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
        await loop.run_in_executor(None, PROCS.stop, spy_proc, 30.0)
    return {"result": result, "started": started, "submitted_at": submitted_at, "submitted": submitted,
            "complete": complete, "release": release, "w0": t0, "w1": t1,
            "cpu_window": (cpu1 - cpu0) / (t1 - t0) * 100, "cpu_seconds": cpu1 - cpu0, "noise": noise.percent(),
            "ramp_noise": ramp_other, "rss_sampled_peak": rss_peak_sampled, "timeline": timeline}


def scenario_images(target: Target, stub: Target, s: Settings, spy: Path | None = None) -> dict[str, Any]:
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        run = runner.run(_storm(target, stub, s, spy))
    res: lc.StormResult = run["result"]
    stats = lc.http_json(stub.port, "GET", "/_stats?detail=1", timeout=120)
    tasks = stats["tasks"]
    pi = s.poll_interval
    delays, lags, afters, answered, bad = [], [], [], 0, Counter()
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
    polls_window_rate = in_window / window if window > 0 else float("nan")
    return {
        "n": s.images, "answered": answered, "failed": s.images - answered, "bad": dict(bad),
        "errors": Counter(e.split(":", 1)[0] + ": " + e.split(":", 1)[1][:60] for e in res.errors).most_common(3),
        "ramp_s": run["submitted_at"] - run["started"],
        "submit_rate": run["submitted"] / max(1e-9, run["submitted_at"] - run["started"]),
        "window_s": window, "cpu_window": run["cpu_window"],
        "cpu_per_poll_us": run["cpu_seconds"] / in_window * 1e6 if in_window else float("nan"),
        "noise": run["noise"], "ramp_noise": run["ramp_noise"], "polls_rate": polls_window_rate,
        "polls_expected": allowed / window if window > 0 else float("nan"),
        "submitted": run["submitted"], "ramp_complete": run["complete"], "timeline": run["timeline"],
        "unanswered": sum(1 for a in res.answered_at if a is None),
        "polls_max_second": max(per_second) if per_second else 0,
        "gap_min": min(gaps) if gaps else float("nan"), "gap_p50": pct(gaps, 50),
        "fast_gaps": sum(1 for g in gaps if g < pi * 0.98), "gaps": len(gaps), "early_first_polls": len(early),
        "polls_total": stats["polls"],
        "delay_p50": pct(delays, 50), "delay_p99": pct(delays, 99),
        "delay_max": max(delays) if delays else float("nan"),
        "delays": delays, "rss_sampled_peak": run["rss_sampled_peak"],
        "lag_p50": pct(lags, 50), "lag_max": max(lags) if lags else float("nan"),
        "after_p50": pct(afters, 50), "after_p99": pct(afters, 99),
        "after_max": max(afters) if afters else float("nan"),
    }


# ---------------------------------------------------------------- report

def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report(r: dict[str, Any], s: Settings, quick: bool) -> tuple[str, list[tuple[str, str, bool | None]]]:
    cols = [("direct", "direct (stub)"), ("proxy-1w", "this proxy, 1 worker"), ("proxy-2w", "this proxy, 2 workers"),
            ("litellm", "LiteLLM, 1 worker")]
    seq, stream, load, start = r["sequential"], r["stream"], r["load"], r["startup"]
    lines = [f"# Benchmark results{' (--quick)' if quick else ''}", ""]
    lines += ["## Machine and versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["machine"].items()]
    lines += [f"| {k} | {v} |" for k, v in r["versions"].items()]
    lines += ["", "Everything on 127.0.0.1. One stub (bench/stub.py) answers xffuw chat.php for this proxy and an "
              "OpenAI /v1/chat/completions with the same content for direct and LiteLLM.", ""]
    for note in r["notes"]:
        lines.append(f"- {note}")
    lines += ["", "## Chat", "", "| metric | " + " | ".join(c[1] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]

    def row(label: str, fn: Any, digits: int = 2) -> None:
        cells = []
        for key, _ in cols:
            try:
                cells.append(fmt(fn(key), digits))
            except (KeyError, TypeError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    d = seq.get("direct", {})
    row(f"sequential chat, {s.seq_count} req on 1 connection: p50 ms", lambda k: seq[k]["p50"], 3)
    row("sequential chat: p99 ms", lambda k: seq[k]["p99"], 3)
    row("added over direct: p50 ms", lambda k: seq[k]["p50"] - d["p50"] if k != "direct" else None, 3)
    row("added over direct: p99 ms", lambda k: seq[k]["p99"] - d["p99"] if k != "direct" else None, 3)
    row("sequential failures", lambda k: seq[k]["failures"], 0)
    row(f"{s.conns} connections, {s.wrk_seconds} s: good req/s", lambda k: load[k]["rps"], 0)
    row(f"{s.conns} connections: p50 ms", lambda k: load[k]["p50"], 2)
    row(f"{s.conns} connections: p99 ms", lambda k: load[k]["p99"], 2)
    row(f"{s.conns} connections: non-2xx", lambda k: load[k]["non2xx"], 0)
    row(f"{s.conns} connections: socket errors/timeouts", lambda k: load[k]["socket_errors"], 0)
    row(f"{s.conns} connections: server CPU % (of one core)", lambda k: load[k]["cpu"], 0)
    row(f"{s.conns} connections: stub CPU %", lambda k: load[k]["stub_cpu"], 0)
    row(f"{s.conns} connections: wrk CPU %", lambda k: load[k]["wrk_cpu"], 0)
    row(f"{s.conns} connections: server RSS after, MB", lambda k: load[k]["rss"], 0)
    row("other processes' CPU % (of one core) during: sequential",
        lambda k: seq[k]["noise"], 0)
    row(f"… during {s.conns} connections", lambda k: load[k]["noise"], 0)
    row("… during streamed", lambda k: stream[k]["noise"], 0)
    row(f"streamed chat, {s.stream_count} req: time to first data p50 ms", lambda k: stream[k]["ttfb_p50"], 3)
    row("streamed chat: time to first data p99 ms", lambda k: stream[k]["ttfb_p99"], 3)
    row("streamed chat: complete p50 ms", lambda k: stream[k]["p50"], 3)
    row("startup: spawn to first 200, s", lambda k: start[k]["ready"], 2)
    row("idle RSS, MB (1 s after ready)", lambda k: start[k]["rss"], 1)
    im = r.get("images")
    if im:
        lines += ["", f"## {im['n']:,} concurrent image requests (this proxy, 1 worker)", "",
                  f"poll_interval {s.poll_interval:g} s, first_poll {s.first_poll:g} s; the stub holds every task "
                  f"until all {im['n']:,} are submitted, then they become final from {s.hold:g} s later, spread "
                  f"over {s.spread:g} s. \"While waiting\" is the window from first_poll after release to the "
                  f"first final task ({im['window_s']:.1f} s).", "", "| metric | value |", "|---|---|"]
        items = [
            ("answered 200 with the task's URL", f"{im['answered']:,} / {im['n']:,}"),
            ("failed / unanswered at the end / errors",
             f"{im['failed']:,} / {im['unanswered']:,} {im['bad'] or ''} {im['errors'] or ''}".strip()),
            ("submitted to the stub before the release",
             f"{im['submitted']:,}" + ("" if im["ramp_complete"] else
                                       f" (NOT all: the ramp was cut at {s.ramp_limit:g} s)")),
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
             f"{fmt(im['after_p50'], 1)} / {fmt(im['after_p99'], 1)} / {fmt(im['after_max'], 1)}"),
        ]
        lines += [f"| {k} | {v} |" for k, v in items]
        if im.get("timeline"):
            lines += ["", "Timeline (about every 5 s; polls/s and CPU over the second before):", "",
                      "| s | submitted | answered | polls/s | proxy CPU % | RSS MB |", "|---|---|---|---|---|---|"]
            mark = -1
            for row_ in im["timeline"]:
                if int(row_["t"] // 5) != mark:
                    mark = int(row_["t"] // 5)
                    lines.append(f"| {row_['t']:.0f} | {row_['submits']:,} | {row_['answered']:,} | "
                                 f"{row_['polls_per_s']:,.0f} | {row_['cpu']:.0f} | {row_['rss']:.0f} |")
    noisy = [f"{name} {phase}" for phase, table in (("sequential", seq), ("load", load), ("stream", stream))
             for name, res in table.items() if res.get("noise", 0) >= QUIET]
    if im and im.get("noise", 0) >= QUIET:
        noisy.append("image requests")
    if noisy:
        lines += ["", f"**Warning: other processes used ≥ {QUIET:g} % of a core during: {', '.join(noisy)}. "
                  "Those figures are disturbed; rerun on a quiet machine.**"]
    targets: list[tuple[str, str, bool | None]] = []

    def target(label: str, measured: str, ok: bool | None) -> None:
        targets.append((label, measured, ok))

    p = seq.get("proxy-1w")
    if p and d:
        a50, a99 = p["p50"] - d["p50"], p["p99"] - d["p99"]
        target("added latency p50 ≤ 1 ms", f"{a50:.3f} ms", a50 <= 1.0)
        target("added latency p99 ≤ 3 ms", f"{a99:.3f} ms", a99 <= 3.0)
    l1, l2 = load.get("proxy-1w"), load.get("proxy-2w")
    if l1:
        target("1 worker, 64 conns ≥ 2,000 good req/s", f"{l1['rps']:,.0f} req/s", l1["rps"] >= 2000)
    if l1 and l2:
        ratio = l2["rps"] / l1["rps"] if l1["rps"] else 0.0
        target("2 workers ≥ 1.6× one", f"{ratio:.2f}×", ratio >= 1.6)
    if im:
        held = im["ramp_complete"]
        short = "" if held else f" (only {im['submitted']:,} of {im['n']:,} were submitted)"
        target(f"{im['n']:,} waiting: peak RSS < 300 MB", f"{im['rss_hwm']:.0f} MB{short}",
               im["rss_hwm"] < 300 and held)
        target(f"{im['n']:,} waiting: CPU < 25 % of one core", f"{im['cpu_window']:.1f} %{short}",
               im["cpu_window"] < 25 and held)
        fast = im["fast_gaps"] == 0 and im["polls_rate"] <= im["polls_expected"] * 1.02
        target("polls never above 1/poll_interval per task",
               f"{im['polls_rate']:,.0f}/s vs {im['polls_expected']:,.0f}/s expected; min gap {im['gap_min']:.3f} s",
               fast)
        limit = s.poll_interval * 1000 + 50
        target(f"answer delay ≤ poll_interval + 50 ms ({limit:,.0f} ms)", f"max {im['delay_max']:,.0f} ms "
               f"(p99 {im['delay_p99']:,.0f})", im["delay_max"] <= limit and im["failed"] == 0 and held)
    st = start.get("proxy-1w")
    if st:
        target("idle RSS < 80 MB", f"{st['rss']:.1f} MB", st["rss"] < 80)
        target("startup < 1 s", f"{st['ready']:.2f} s", st["ready"] < 1.0)
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'MET' if ok else 'NOT MET'} |" for t, m, ok in targets]
    for key, title, where in (
            ("profile", f"under {s.conns} connections",
             "flame graph in bench/out/profile.svg, collapsed stacks in bench/out/profile.txt"),
            ("profile_images", f"holding {s.images:,} waiting image requests (the waiting window)",
             "collapsed stacks in bench/out/profile-images.txt")):
        prof = r.get(key)
        if not prof:
            continue
        sm = prof["summary"]
        lines += ["", f"## Profile of this proxy (1 worker) {title}", "",
                  f"py-spy, {sm['samples']:,} samples of busy threads (py-spy leaves idle ones out); {where}.", "",
                  "Threads:", "", "| thread | % |", "|---|---|"]
        lines += [f"| {n} | {v:.1f} |" for n, v in sm.get("threads", [])]
        lines += ["", "Self time by package:", "", "| package | % |", "|---|---|"]
        lines += [f"| {n} | {v:.1f} |" for n, v in sm["packages"]]
        lines += ["", "Hottest functions (self time):", "", "| function | % |", "|---|---|"]
        lines += [f"| `{n}` | {v:.1f} |" for n, v in sm["self"][:20]]
        lines += ["", "Our code, inclusive time:", "", "| function | % |", "|---|---|"]
        lines += [f"| `{n}` | {v:.1f} |" for n, v in sm["ours_inclusive"]]
    lines.append("")
    return "\n".join(lines), targets


def chart(r: dict[str, Any], s: Settings, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: skipped (matplotlib not installed; pip install -r bench/requirements.txt)"
    names = {"direct": "direct", "proxy-1w": "this proxy 1w", "proxy-2w": "this proxy 2w", "litellm": "LiteLLM"}
    colors = {"direct": "tab:blue", "proxy-1w": "tab:orange", "proxy-2w": "tab:purple", "litellm": "tab:green"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def cdf(ax: Any, data: dict[str, Any], field: str, title: str) -> None:
        for key, res in data.items():
            values = sorted(res[field])
            if values:
                ax.plot(values, [(i + 1) / len(values) * 100 for i in range(len(values))], label=names[key],
                        color=colors[key])
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("percentile")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()

    cdf(axes[0][0], r["sequential"], "total", f"sequential chat, 1 connection ({s.seq_count} requests)")
    ax = axes[0][1]
    for key, res in r["load"].items():
        xs = [p for p, _ in res["curve"]]
        ax.plot(range(len(xs)), [v for _, v in res["curve"]], marker=".", label=f"{names[key]} ({res['rps']:,.0f}/s)",
                color=colors[key])
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"{s.conns} connections, {s.wrk_seconds} s (wrk)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    cdf(axes[1][0], r["stream"], "first", "streamed chat: time to first data")
    ax = axes[1][1]
    im = r.get("images")
    if im and im["delays"]:
        ax.hist([v / 1000 for v in im["delays"]], bins=60, color="tab:orange")
        ax.axvline(s.poll_interval + 0.05, color="red", linestyle="--", label="poll_interval + 50 ms")
        ax.set_xlabel("s from task final at the stub to the client's answer")
        ax.set_ylabel("requests")
        ax.set_title(f"{im['n']:,} waiting image requests: answer delay")
        ax.legend()
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main

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
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    t_begin = time.monotonic()
    try:
        return _run(args, s, t_begin)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every child process")
        return 130
    finally:
        PROCS.stop_all()


def _run(args: argparse.Namespace, s: Settings, t_begin: float) -> int:
    if not PROXY_BIN.exists():
        say(f"{PROXY_BIN} is missing: create the project venv first (README)")
        return 2
    nofile = raise_nofile()
    if args.nice:
        global BOOST
        BOOST = args.nice
        boost(os.getpid())  # this process (the clients) and, inherited, every child
    if nofile < s.images + 2000:
        s.images = max(100, nofile - 2000)
        say(f"note: RLIMIT_NOFILE is {nofile}; image requests lowered to {s.images}")
    allow_install = not args.skip_install
    wrk = ensure_wrk(allow_install)
    notes: list[str] = []
    if not wrk:
        notes.append("wrk not available: load from the Python fallback generator (it may be the bottleneck)")
        say("load generator: wrk missing, using the Python fallback (bench/loadclients.py pyload)")
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

    stub_port = free_port()
    stub_log = OUT / "stub.log"
    stub_proc = PROCS.spawn("stub", [sys.executable, str(BENCH / "stub.py"), "--port", str(stub_port)], log=stub_log)
    stub = Target("direct", stub_port, proc=stub_proc, log=stub_log)
    wait_ready(stub_proc, stub_port, "/healthz", 30, stub_log)

    def quiet(label: str) -> None:
        if s.quiet_wait > 0:
            wait_quiet(s.quiet_wait, label)

    def chat_scenarios(target: Target, with_sequential: bool = True) -> None:
        check_chat(target)
        quiet(target.name)
        if with_sequential:
            say(f"[{target.name}] sequential chat ×{s.seq_count} …")
            r["sequential"][target.name] = scenario_sequential(target, s, stream=False)
            say(f"[{target.name}] streamed chat ×{s.stream_count} …")
            r["stream"][target.name] = scenario_sequential(target, s, stream=True)
        say(f"[{target.name}] {s.conns} connections for {s.wrk_seconds} s …")
        quiet(f"{target.name} under load")
        run_load(wrk, target, s.wrk_warmup, s.conns, stub, measure=False)
        r["load"][target.name] = run_load(wrk, target, s.wrk_seconds, s.conns, stub)
        res = r["load"][target.name]
        say(f"[{target.name}]   {res['rps']:,.0f} good req/s, p99 {res['p99']:.1f} ms, non-2xx {res['non2xx']}")

    # direct
    chat_scenarios(stub)

    # this proxy, 1 worker: startup trials, idle RSS, then the chat scenarios
    proxy_port = free_port()
    config = proxy_config(stub_port, proxy_port, s)
    readies, rsses = [], []
    proxy: Target | None = None
    for trial in range(s.startup_trials):
        quiet("a proxy start")
        proxy, ready = start_proxy_retrying(config, proxy_port, 1, "1w")
        time.sleep(1.0)
        readies.append(ready)
        rsses.append(rss_mb(proxy.pids()))
        if trial < s.startup_trials - 1:
            PROCS.stop(proxy.proc)  # type: ignore[arg-type]
    assert proxy is not None
    r["startup"]["proxy-1w"] = {"ready": statistics.median(readies), "rss": statistics.median(rsses),
                                "all": readies}
    say(f"[proxy-1w] startup {', '.join(f'{x:.2f}' for x in readies)} s; idle RSS {statistics.median(rsses):.1f} MB")
    chat_scenarios(proxy)
    if args.profile:
        say(f"[proxy-1w] profiling with py-spy for 2×{s.profile_seconds} s under load …")
        r["profile"] = profile(wrk, proxy, s, stub)
    PROCS.stop(proxy.proc)  # type: ignore[arg-type]

    # this proxy, 2 workers: the load only
    proxy2, ready2 = start_proxy_retrying(config, proxy_port, 2, "2w")
    time.sleep(1.0)
    r["startup"]["proxy-2w"] = {"ready": ready2, "rss": rss_mb(proxy2.pids())}
    chat_scenarios(proxy2, with_sequential=False)
    PROCS.stop(proxy2.proc)  # type: ignore[arg-type]

    # LiteLLM
    if litellm_version:
        say("[litellm] starting (≈10 s) …")
        try:
            lite, ready = start_litellm(stub_port, free_port())
            time.sleep(1.0)
            r["startup"]["litellm"] = {"ready": ready, "rss": rss_mb(lite.pids())}
            chat_scenarios(lite)
            PROCS.stop(lite.proc)  # type: ignore[arg-type]
        except RuntimeError as error:
            note = f"LiteLLM: skipped (it did not serve: {str(error).splitlines()[0]}; see bench/out/litellm.log)"
            notes.append(note)
            say(note)

    # 10,000 waiting image requests on a fresh proxy (its VmHWM is this scenario's peak)
    say(f"[proxy-1w] {s.images:,} concurrent image requests …")
    quiet("the image requests")
    proxy, _ = start_proxy_retrying(config, proxy_port, 1, "images")
    lc.http_json(proxy_port, "GET", "/v1/models", headers=headers())  # the catalogue, loaded once
    lc.http_json(stub_port, "POST", "/_reset?hold=1")
    images = scenario_images(proxy, stub, s)
    images["rss_hwm"] = rss_mb(proxy.pids(), "VmHWM")
    r["images"] = images
    if not images["ramp_complete"]:
        say(f"[proxy-1w]   only {images['submitted']:,} of {s.images:,} submissions reached the stub in "
            f"{s.ramp_limit:g} s ({images['submit_rate']:,.0f}/s)")
    say(f"[proxy-1w]   answered {images['answered']:,}/{images['n']:,}; VmHWM {images['rss_hwm']:.0f} MB; "
        f"CPU waiting {images['cpu_window']:.1f} %; polls {images['polls_rate']:,.0f}/s "
        f"(expected {images['polls_expected']:,.0f}); delay max {images['delay_max']:,.0f} ms")
    PROCS.stop(proxy.proc)  # type: ignore[arg-type]
    if args.profile and Path(_py_spy()).exists():
        say(f"[proxy-1w] profiling {s.images:,} waiting image requests (a second, unmeasured run) …")
        proxy, _ = start_proxy_retrying(config, proxy_port, 1, "images-profile")
        lc.http_json(proxy_port, "GET", "/v1/models", headers=headers())
        lc.http_json(stub_port, "POST", "/_reset?hold=1")
        spy_out = OUT / "profile-images.txt"
        spy_out.unlink(missing_ok=True)
        scenario_images(proxy, stub, s, spy=spy_out)
        PROCS.stop(proxy.proc)  # type: ignore[arg-type]
        if spy_out.exists():
            r["profile_images"] = {"summary": summarise_profile(spy_out)}

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
    raw["images"] = {k: v for k, v in (r.get("images") or {}).items() if k != "delays"}
    (OUT / "results.json").write_text(json.dumps(raw, default=str, indent=1))
    say("")
    say(text)
    say("Targets:")
    for label, measured, ok in targets:
        say(f"  {'MET    ' if ok else 'NOT MET'}  {label}: {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
