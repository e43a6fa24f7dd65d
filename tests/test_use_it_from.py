"""The README's "Use it from …" snippets, run as written against the proxy.

Each fenced block after a `<!-- snippet: NAME -->` marker is taken from the README; only
the address and the key are replaced by the test proxy's. Python runs in-process, JavaScript with the
machine's Node.js, sh with sh: the doc and the tests cannot drift apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims, serving, sim_providers
from helpers import wait_until

from proxy.sim.assets import PNG_BYTES
from proxy.sim.chat_model import TOOL_RESULTS
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
    """tests/node with every package of its package.json installed (`npm install` on first use).

    Without node or npm it skips, except in CI (`CI=true`), where a client that cannot run is a failure."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = "node" if node is None else "npm"
        if os.environ.get("CI") == "true":
            pytest.fail(f"Node.js is not installed here ({missing} not on PATH): CI must run the Node client tests")
        pytest.skip(f"Node.js is not installed here ({missing} not on PATH): the Node client tests need node and npm")
    wanted = json.loads((NODE_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"]
    # one npm install at a time: the suite's workers (pytest-xdist) may all want it at once
    with open(NODE_DIR / "package.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((NODE_DIR / "node_modules" / name / "package.json").exists() for name in wanted):
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                                  capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, f"npm install failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR


def localise(code: str, proxy: RunningProxy) -> str:
    assert DOC_ADDRESS in code and DOC_KEY in code, "a snippet must show the base URL and the key it uses"
    return code.replace(DOC_ADDRESS, proxy.url).replace(DOC_KEY, CLIENT_KEY)


@pytest.fixture(scope="module")
def _doc_server(_sim_servers: Sims, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """One proxy for the module, configured as a user would (no test-only settings), with a
    public_url so uploads work. The snippets only read, and a proxy costs about a second to start."""
    config = {
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "providers": sim_providers(_sim_servers),
        "tasks": {"poll_interval": 0.2, "first_poll": 0.05, "timeout": 10},
        "aliases": {"dall-e-3": "xffuw/gpt-image-2"},
        "server": {"public_url": PUBLIC_URL},
        "log": {"format": "json"},
        "storage": {"path": str(tmp_path_factory.mktemp("doc-proxy") / "proxy.sqlite3")},
    }
    with serving(config) as proxy:
        yield proxy


@pytest.fixture
def doc_proxy(_doc_server: RunningProxy, sims: Sims, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunningProxy:
    """The module's proxy, the snippets run from a folder holding their cat.png, image tasks quick."""
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.04
    # the last test's requests are over, access lines included, so they are not counted in this one's
    wait_until(lambda: not _doc_server.server.server.server_state.tasks, 5, "the proxy to be idle")
    (tmp_path / "cat.png").write_bytes(PNG_BYTES)
    monkeypatch.chdir(tmp_path)
    return _doc_server


def assert_served(capsys: pytest.CaptureFixture[str], expected: dict[str, int]) -> None:
    """The proxy answered these requests per path during the test, read from its access log (a
    streamed answer is logged as its stream ends, so the last line may come a moment later)."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        seen.update(entry["path"] for entry in map(json.loads, lines) if entry.get("event") == "request")
        if seen == expected or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert seen == expected


def run_python(name: str, proxy: RunningProxy) -> str:
    language, code = snippets()[name]
    assert language == "python"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(localise(code, proxy), f"<snippet {name}>", "exec"), {"__name__": "__snippet__"})
    return out.getvalue()


def run_node(name: str, proxy: RunningProxy) -> list[str]:
    folder = node_ready()
    language, code = snippets()[name]
    assert language == "js"
    done = subprocess.run(["node", "--input-type=module", "-e", localise(code, proxy)], cwd=folder,
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_every_snippet_is_covered() -> None:
    assert list(snippets()) == ["openai-python", "openai-python-async", "langchain", "llamaindex", "pydantic-ai",
                                "openai-agents", "instructor", "litellm", "node", "ai-sdk", "langchain-js", "curl"]


def test_without_node_the_node_clients_fail_in_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Node client tests"):
        node_ready()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="node not on PATH"):
        node_ready()


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
    assert out[6:] == [WEATHER, "[('temperature', {'city': 'city'})]", CITY]
    assert sims.xffuw.last_chat_body is not None  # with_structured_output asked for a JSON schema
    assert sims.xffuw.last_chat_body["response_format"]["type"] == "json_schema"


def test_llamaindex_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("llamaindex", doc_proxy).splitlines()
    assert out == [CHAT_PREFIX + "Once upon a time", CHAT_PREFIX + "你好", CHAT_PREFIX + "Hello",
                   CHAT_PREFIX + "Stream", CHAT_PREFIX + "async chat"]


def test_node_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_node("node", doc_proxy)
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


WEATHER = TOOL_RESULTS + "temperature: 21°C in city"  # the sim's answer once the snippets' tool has run
CITY = "City(name='name', country='country', population=1)"  # the sim's document for the City schema
CITY_JSON = '{"name":"name","country":"country","population":1}'


def test_pydantic_ai_snippet(doc_proxy: RunningProxy, sims: Sims, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_python("pydantic-ai", doc_proxy).splitlines()
    assert out == [CHAT_PREFIX + "你好", CHAT_PREFIX + "Stream a haiku", WEATHER, WEATHER, CITY, WEATHER]
    assert_served(capsys, {"/v1/chat/completions": 7, "/v1/responses": 2})


def test_openai_agents_snippet(doc_proxy: RunningProxy, sims: Sims, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_python("openai-agents", doc_proxy).splitlines()
    assert out == [WEATHER] * 4
    # Each agent: a run and a streamed run, each a tool call then the answer.
    assert_served(capsys, {"/v1/chat/completions": 4, "/v1/responses": 4})


def test_instructor_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_python("instructor", doc_proxy).splitlines()
    assert out == ["JSON " + CITY, "TOOLS " + CITY]
    assert sims.xffuw.last_chat_body is not None
    assert sims.xffuw.last_chat_body["tool_choice"] == {"type": "function", "function": {"name": "City"}}


def test_litellm_snippet(doc_proxy: RunningProxy, sims: Sims, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else its import fetches a price list from the web
    out = run_python("litellm", doc_proxy).splitlines()
    call = 'temperature {"city": "city"}'
    assert out == [CHAT_PREFIX + "你好", CHAT_PREFIX + "你好", call, WEATHER, call]
    # also waits for its stream's access line, which would otherwise land in the next test's count
    assert_served(capsys, {"/v1/chat/completions": 5})


def test_ai_sdk_snippet(doc_proxy: RunningProxy, sims: Sims, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_node("ai-sdk", doc_proxy)
    assert out == [CHAT_PREFIX + "你好", CHAT_PREFIX + "Hello, chat", CHAT_PREFIX + "Stream a haiku",
                   WEATHER, WEATHER, WEATHER, WEATHER, CITY_JSON, f"image/png {len(PNG_BYTES)}"]
    # openai(...) is the Responses API, openai.chat(...) chat completions; generateImage gets b64_json.
    assert_served(capsys, {"/v1/responses": 7, "/v1/chat/completions": 5, "/v1/images/generations": 1})


def test_langchain_js_snippet(doc_proxy: RunningProxy, sims: Sims) -> None:
    out = run_node("langchain-js", doc_proxy)
    assert out == [CHAT_PREFIX + "你好", CHAT_PREFIX + "Stream a greeting", WEATHER,
                   '[{"name":"temperature","args":{"city":"city"}}]', CITY_JSON]
    assert sims.xffuw.last_chat_body is not None  # withStructuredOutput asked for a JSON schema
    assert sims.xffuw.last_chat_body["response_format"]["type"] == "json_schema"
