"""The soak test's short version (`bench/soak.py --quick`): 40 clients for ~16 s, 5 % upstream
faults, deliberate disconnects and one proxy restart, on loopback, as a subprocess.

The full run (300 clients, two minutes) is `.venv/bin/python bench/soak.py`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _number(output: str, label: str) -> int:
    """The first integer printed after `label` on its line."""
    match = re.search(re.escape(label) + r"\s+(\d+)", output)
    assert match, f"{label!r} not in the soak's output:\n{output}"
    return int(match[1])


@pytest.mark.timeout(90)
def test_quick_soak_holds_every_invariant() -> None:
    started = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick"], cwd=ROOT,
                             capture_output=True, text=True, timeout=85)
    output = started.stdout + started.stderr
    assert started.returncode == 0, output
    assert "SOAK PASSED" in output, output
    assert "FAIL " not in output, output

    sent = _number(output, "requests sent")
    well = _number(output, "answered well (2xx, valid body)")
    errors = _number(output, "answered with an OpenAI-shaped error")
    none = _number(output, "no answer (connection closed / refused / timed out)")
    # most requests are answered well while the proxy is up (a loaded machine restarts it slowly,
    # and the requests it refuses meanwhile are the restart's, counted below)
    refused = _number(output, "proxy restarting (ConnectError)")
    assert sent > 300 and well > (sent - refused) / 2, output
    assert well + errors + none == sent, output  # nothing malformed: every request is accounted for
    assert _number(output, "malformed answers") == 0
    assert _number(output, "500s from the proxy") == 0
    assert _number(output, "operations without an answer by the end") == 0
    assert _number(output, "answers inconsistent with their tasks / Idempotency-Key") == 0
    assert _number(output, "answers that do not name the tasks their request started") == 0

    # the restart happened, and clients met it
    assert re.search(r"restarted the proxy at [\d.]+ s", output), output
    met = re.findall(r"proxy restarting \([^)]*\)\s+(\d+)", output)
    assert sum(int(n) for n in met) > 0, output

    # upstream tasks started (their answer reached the proxy) == delivered or retrievable
    reached = _number(output, "of which the answer reached the proxy")
    retrievable = _number(output, "result delivered or retrievable (GET /v1/tasks/{id}: succeeded|failed)")
    assert reached > 0 and retrievable == reached, output
    assert _number(output, "started, answer reached the proxy, but not retrievable") == 0
    assert _number(output, "stored tasks that match no upstream task") == 0
    assert _number(output, "stored tasks not final or not retrievable after the drain") == 0
    assert _number(output, "upstream tasks paid twice for one Idempotency-Key") == 0
    assert _number(output, "crashes or tracebacks in the proxy's log") == 0
    assert re.search(r"proxy peak RSS \(VmHWM, max over both processes\)\s+[\d.]+ MiB", output), output
