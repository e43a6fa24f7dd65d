"""Child processes and what /proc says about them: CPU, memory, the machine's other work."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from lib import ROOT, say
from lib.loadclients import http_request

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET = 15.0  # % of one core used by others below which the machine counts as quiet


class Procs:
    """Children, each in a session of its own (a process group), stopped by group id: at the
    end, on errors and on Ctrl-C. With `nice`, each also gets that priority on its scheduler
    autogroup (see `boost`)."""

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice
        self.running: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, argv: list[str], log: Path | None = None, *, env: dict[str, str] | None = None,
              cwd: Path = ROOT, stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """stdout and stderr into `log` (stdout into `stdout` when given); nothing read back."""
        handle = open(log, "wb") if log else None
        proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                stdout=stdout or handle or subprocess.DEVNULL, stderr=handle or subprocess.DEVNULL,
                                start_new_session=True)
        if handle:
            handle.close()
        self.running[proc.pid] = proc
        boost(proc.pid, self.nice)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 8.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` s and to stragglers (uvicorn workers)."""
        self.running.pop(proc.pid, None)
        if proc.poll() is None:
            killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.running.values()):
            self.stop(proc, grace=3.0)


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def boost(pid: int, nice: int) -> None:
    """Put the process and its scheduler autogroup (one per session on Linux) at `nice`. Plain
    nice only ranks threads inside one autogroup; between the sessions of other work on the
    machine the autogroup's nice decides."""
    if not nice:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        pass
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


def interrupt_on_signals(*signums: int) -> None:
    """SIGTERM (and others) raise KeyboardInterrupt, so that `finally` blocks stop the children."""
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in signums or (signal.SIGTERM,):
        signal.signal(signum, interrupted)


def raise_nofile() -> int:
    """RLIMIT_NOFILE up to 65,536 where allowed (10,000 connections); the soft limit now."""
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float, log: Path | None = None,
               every: float = 0.005) -> float:
    """Seconds from now until GET `path` answers 200 (asked every `every` s)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready\n{tail}")
        try:
            if http_request(port, "GET", path, timeout=2)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(every)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


# ---- /proc readings ----

def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
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


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in kB (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pids: list[int], field: str = "VmRSS") -> float:
    return sum(status_kb(p, field) for p in pids) / 1024


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
