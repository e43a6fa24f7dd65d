"""Child processes and what /proc says about them: CPU, memory, the machine's other work."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections import defaultdict
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from lib import ROOT, say
from lib.loadclients import http_request

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET = 15.0  # % of one core used by others below which the machine counts as quiet


class Procs:
    """Children, each in a session of its own (a process group), stopped by group id: at the
    end, on errors and on Ctrl-C. With `nice`, each also gets that priority (see `boost`)."""

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice
        self.running: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, argv: list[str], log: Path | None = None, *, env: dict[str, str] | None = None,
              cwd: Path = ROOT, stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """stdout and stderr into `log` (stdout into `stdout` when given); nothing read back."""
        with open(log or os.devnull, "wb") as handle:
            proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=stdout or handle,
                                    stderr=handle, start_new_session=True)
        self.running[proc.pid] = proc
        boost(proc.pid, self.nice)
        return proc

    def start(self, argv: list[str], log: Path, port: int, path: str, timeout: float, every: float = 0.005,
              **spawn: Any) -> tuple[subprocess.Popen[bytes], float]:
        """Spawned, and ready once GET `path` answers 200 (asked every `every` s): the process and the
        seconds from spawn to ready. One that exits or is not ready in `timeout` s is stopped."""
        started = time.monotonic()
        proc = self.spawn(argv, log, **spawn)
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"process exited with {proc.returncode} before it was ready\n{tail}")
            with suppress(OSError):
                if http_request(port, "GET", path, timeout=2)[0] == 200:
                    return proc, time.monotonic() - started
            time.sleep(every)
        self.stop(proc)
        raise RuntimeError(f"not ready after {timeout:.0f} s")

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 8.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` s and to stragglers (uvicorn workers)."""
        self.running.pop(proc.pid, None)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if sig == signal.SIGKILL or proc.poll() is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.running.values()):
            self.stop(proc, grace=3.0)


def boost(pid: int, nice: int) -> None:
    """The process and its scheduler autogroup (one per session) at `nice`: plain nice only ranks
    threads inside one autogroup; between the sessions of other work the autogroup's nice decides."""
    if nice:
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        with suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))


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
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            break
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3 on); none when it is gone."""
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return []


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if fields := _stat(entry):
            kids[int(fields[1])].append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(kids.get(found[-1], []))
    return found


def cpu_seconds(pids: list[int], reaped: bool = False) -> float:
    """utime + stime of the processes; with `reaped`, also of their children already waited for."""
    return sum(sum(int(x) for x in fields[11:15 if reaped else 13]) for fields in map(_stat, pids) if fields) / CLK_TCK


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in kB (VmRSS, VmHWM); 0 when the process is gone."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pids: list[int], field: str = "VmRSS") -> float:
    return sum(status_kb(p, field) for p in pids) / 1024


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every core) since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Noise:
    """CPU used by processes outside this benchmark (other sessions, tests) over a phase, in % of
    one core: the machine's busy time minus this process tree's."""

    def __init__(self) -> None:
        self.t, self.busy, self.ours = time.monotonic(), machine_busy(), cpu_seconds(tree(os.getpid()), reaped=True)

    def percent(self) -> float:
        ours = cpu_seconds(tree(os.getpid()), reaped=True) - self.ours
        return max(0.0, (machine_busy() - self.busy - ours) / max(1e-3, time.monotonic() - self.t) * 100)


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
