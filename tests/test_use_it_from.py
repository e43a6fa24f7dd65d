"""The README's "Use it from …" snippets, run as written against the proxy.

Each fenced block after a `<!-- snippet: NAME -->` marker is taken from the README; only
the address and the key are replaced by the test proxy's. Python runs in-process, JavaScript with the
machine's Node.js, sh with sh: the doc and the tests cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims

from proxy.sim.assets import PNG_BYTES
from proxy.sim.xffuw import CHAT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"
DOC_ADDRESS, DOC_KEY = "http://localhost:8080", "sk-team-alice"
PUBLIC_URL = "https://proxy.example.test"
_SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\s*```(\w+)\n(.*?)```", re.DOTALL)


def doc_path() -> Path:
    return ROOT / "README.md"


def snippets() -> dict[str, tuple[str, str]]:
    """name -> (language, code), in document order."""
    found = {m[1]: (m[2], m[3]) for m in _SNIPPET.finditer(doc_path().read_text(encoding="utf-8"))}
    assert found, f"no snippets in {doc_path()}"
    return found


def node_ready() -> Path:
    """tests/node with its node_modules installed; skips only where node or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"Node.js is not installed here ({'node' if node is None else 'npm'} not on PATH): "
                    "the Node SDK tests need node and npm")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"npm install failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR


def localise(code: str, proxy: RunningProxy) -> str:
    assert DOC_ADDRESS in code and DOC_KEY in code, "a snippet must show the base URL and the key it uses"
    return code.replace(DOC_ADDRESS, proxy.url).replace(DOC_KEY, CLIENT_KEY)


@pytest.fixture
def doc_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any],
              sims: Sims, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunningProxy:
    """A proxy with a public_url (uploads work), run from a folder holding the snippets' cat.png."""
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.04
    proxy_config["server"] = {"public_url": PUBLIC_URL}
    (tmp_path / "cat.png").write_bytes(PNG_BYTES)
    monkeypatch.chdir(tmp_path)
    return start_proxy(proxy_config)


def run_python(name: str, proxy: RunningProxy) -> str:
    language, code = snippets()[name]
    assert language == "python"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(localise(code, proxy), f"<snippet {name}>", "exec"), {"__name__": "__snippet__"})
    return out.getvalue()


def test_every_snippet_is_covered() -> None:
    assert list(snippets()) == ["openai-python", "openai-python-async", "langchain", "llamaindex", "node", "curl"]


def test_openai_python_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("openai-python", doc_proxy).splitlines()
    assert out[0] == CHAT_PREFIX + "你好"
    assert out[1] == CHAT_PREFIX + "讲个笑话"
    assert out[2] == CHAT_PREFIX + "What is in this picture?"
    assert all(line.startswith(sims.xffuw_url + "/files/") for line in out[3:6])
    assert "'gpt-4o-mini'" in out[6] and out[7] == "xffuw"
    assert out[8] == CHAT_PREFIX + "And another one?"
    assert out[9] == CHAT_PREFIX + "Stream this."
    assert out[10] == CHAT_PREFIX + "Once upon a time"
    assert sims.xffuw.last_image_body is not None
    assert sims.xffuw.last_image_body["images"][0].startswith(PUBLIC_URL)  # the uploaded cat.png


def test_openai_python_async_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("openai-python-async", doc_proxy).splitlines()
    assert out == [CHAT_PREFIX + "你好", CHAT_PREFIX + "stream", CHAT_PREFIX + "Hello from asyncio"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # langchain-community announces its sunset
def test_langchain_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("langchain", doc_proxy).splitlines()
    assert out[:4] == [CHAT_PREFIX + "你好", CHAT_PREFIX + "Stream a greeting",
                       str([CHAT_PREFIX + "one", CHAT_PREFIX + "two"]), CHAT_PREFIX + "async hello"]
    assert out[4] == CHAT_PREFIX + "Hello through /v1/responses"
    assert out[5].startswith(sims.xffuw_url + "/files/")


def test_llamaindex_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("llamaindex", doc_proxy).splitlines()
    assert out == [CHAT_PREFIX + "Once upon a time", CHAT_PREFIX + "你好", CHAT_PREFIX + "Hello",
                   CHAT_PREFIX + "Stream", CHAT_PREFIX + "async chat"]


def test_node_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    folder = node_ready()
    language, code = snippets()["node"]
    assert language == "js"
    done = subprocess.run(["node", "--input-type=module", "-e", localise(code, doc_proxy)], cwd=folder,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[:2] == [CHAT_PREFIX + "你好", CHAT_PREFIX + "stream"]
    assert out[2].startswith(sims.xffuw_url + "/files/")
    assert "gpt-4o-mini" in out[3:-1]
    assert out[-1] == "404 model_not_found"


def test_curl_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    language, code = snippets()["curl"]
    assert language == "sh"
    done = subprocess.run(["sh", "-e", "-c", localise(code, doc_proxy)], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ})
    assert done.returncode == 0, done.stderr
    chat, edit = done.stdout.splitlines()
    assert CHAT_PREFIX + "你好" in chat and '"object":"chat.completion"' in chat
    assert sims.xffuw_url + "/files/" in edit
