"""The suite needs nothing outside the repository: a user's clone has nothing beside it.

A copy of the files git tracks, alone in a temporary folder, passes the spec-validating tests
with this interpreter, importing its own `proxy` package; and no file under proxy/, tests/,
bench/ or .ci/ points at the folder beside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Representative spec-validating tests: the spec helper itself, and one answer of a real
#: proxy (with the simulated upstreams, through conftest) validated against the spec.
SPEC_TESTS = ("tests/test_openai_spec.py", "tests/test_models.py::test_list_merges_both_upstreams_with_owners")
SCANNED = ("proxy/", "tests/", "bench/", ".ci/")
_SHARED = "shared"  # the patterns are spelled in pieces so that this file does not match itself
OUTSIDE = re.compile("|".join((r"\.\./" + _SHARED, "/work/" + _SHARED, r"\.parent\s*/\s*[\"']" + _SHARED)))

# The child runs pytest as `python -m pytest` would (cwd first on sys.path), then says which
# `proxy` and `openai_spec` that run imported. It leaves out plugins these tests do not use and
# that take seconds to import (hypothesis, schemathesis, faker), and runs in one process (`-n 0`).
CHILD = """
import sys, pytest
plugins = ["no:cacheprovider", "no:hypothesispytest", "no:schemathesis", "no:faker"]
code = pytest.main([*sys.argv[1:], "-q", "-n", "0", *(arg for name in plugins for arg in ("-p", name))])
print("IMPORTED proxy=" + sys.modules["proxy"].__file__)
print("IMPORTED openai_spec=" + sys.modules["openai_spec"].__file__)
sys.exit(code)
"""


def _tracked() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    return [rel for rel in listed.stdout.decode().split("\0") if rel and (ROOT / rel).is_file()]


def test_nothing_points_outside_the_repository() -> None:
    hits = []
    for rel in _tracked():
        if not rel.startswith(SCANNED):
            continue
        for number, line in enumerate((ROOT / rel).read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)
    # the patterns do catch such references
    for line in ('SPEC = HERE.parent.parent.parent / "' + _SHARED + '" / "openai-openapi.yaml"',
                 "open('../" + _SHARED + "/upstream-notes.md')"):
        assert OUTSIDE.search(line), line


def test_a_copy_alone_in_a_folder_passes_the_spec_tests(tmp_path: Path) -> None:
    clone = tmp_path / "repo"
    for rel in _tracked():
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, clone / rel)
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]
    # the run may not lean on a path or on the old spec override from this process's environment
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PROXY_OPENAI_SPEC"}}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *SPEC_TESTS],
        cwd=clone, env=env, capture_output=True, text=True, timeout=110,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ passed", line)]
    assert summary, output[-4000:]
    assert not re.search(r"skipped|xfail|error|failed|deselected", summary[-1]), summary[-1]
    imported = dict(re.findall(r"^IMPORTED (\w+)=(.+)$", result.stdout, re.MULTILINE))
    assert Path(imported["proxy"]).resolve().is_relative_to(clone.resolve()), imported
    assert Path(imported["openai_spec"]).resolve().is_relative_to(clone.resolve()), imported
