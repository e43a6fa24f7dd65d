"""Fixtures: the simulated upstreams and the proxy, each a real uvicorn server on loopback.

The simulators (xffuw, Fengyuan, and an OpenAI-compatible server for `type = "openai"`) start
once per session and are reset before every test that uses them;
each test gets its own proxy (fresh pool and catalogue) built from `proxy_config`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI

from proxy.app import create_app
from proxy.config import parse_config
from proxy.redact import redact
from proxy.server import BackgroundServer
from proxy.sim import (
    FengyuanSim,
    OpenAICompatSim,
    XffuwSim,
    create_fengyuan_app,
    create_openai_compat_app,
    create_xffuw_app,
)

CLIENT_KEY = "sk-test-alice-0123456789"
OTHER_CLIENT_KEY = "sk-test-bob-9876543210"
XFFUW_KEYS = ["xf_test_key_alpha_1111", "xf_test_key_beta_2222"]
FENGYUAN_KEYS = ["sk-fy-test-key-normal-3333"]
OPENAI_COMPAT_KEYS = ["sk-compat-test-alpha-5555", "sk-compat-test-beta-6666"]


def pytest_configure(config: pytest.Config) -> None:
    """Trust one throwaway CA of the suite's own (SSL_CERT_FILE), not the machine's ~150.

    The suite reaches no public host, and its TLS tests build their contexts explicitly. Loading
    the full CA bundle costs ~60 ms of CPU for every client and proxy made (httpx, the SDKs): a
    fifth of the suite's time. Child processes (`proxy serve`, the soak) and the pytest-xdist
    workers inherit it; a worker finds it made and keeps it."""
    if os.environ.get("XFP_TESTS_CA") == os.environ.get("SSL_CERT_FILE") is not None:
        return
    import trustme

    before = {name: os.environ.get(name) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "XFP_TESTS_CA")}
    folder = tempfile.mkdtemp(prefix="xfp-tests-ca-")
    path = os.path.join(folder, "ca.pem")
    trustme.CA().cert_pem.write_to_path(path)
    os.environ.pop("SSL_CERT_DIR", None)
    os.environ["SSL_CERT_FILE"] = os.environ["XFP_TESTS_CA"] = path

    def restore() -> None:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
    config.add_cleanup(restore)


# Modules whose tests wait for seconds each (child processes, replicas, the soak, fuzzing) run
# first, so that on several workers (pytest-xdist, one module to a worker) none is left for last.
SLOW_FIRST = ("test_shared_state.py", "test_soak.py", "test_bad_input.py", "test_console.py", "test_config_cli.py",
              "test_durability.py", "test_key_window_after_crash.py", "test_poll_fairness.py",
              "test_pooling.py", "test_task_lists.py", "test_use_it_from.py", "test_admin.py", "test_errors.py",
              "test_failover.py", "test_paid_retries.py", "test_images.py", "test_faults.py", "test_workers.py",
              "test_connections.py", "test_fresh_clone.py", "test_lint.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST))


@dataclass
class Sims:
    xffuw: XffuwSim
    fengyuan: FengyuanSim
    xffuw_url: str
    fengyuan_url: str


@pytest.fixture(autouse=True, scope="module")
def _scrubber_per_file() -> Iterator[None]:
    """The scrubber is one per process and learns every config's secrets; a test file's keys
    must not scrub another file's text on the same worker (a key holding "upstream" scrubbed
    the access log's field of that name)."""
    learnt = dict(vars(redact))
    yield
    vars(redact).update(learnt)
    redact._verdicts = {}  # a cache of verdicts made with the file's secrets too


@pytest.fixture(scope="session")
def _sim_servers() -> Iterator[Sims]:
    xffuw = XffuwSim({k: 1_000.0 for k in XFFUW_KEYS})
    from proxy.sim.fengyuan import FengyuanKey

    fengyuan = FengyuanSim({k: FengyuanKey(credits=100_000.0) for k in FENGYUAN_KEYS})
    xs = BackgroundServer(create_xffuw_app(xffuw)).start()
    fs = BackgroundServer(create_fengyuan_app(fengyuan)).start()
    xffuw.public_base, fengyuan.public_base = xs.url, fs.url
    yield Sims(xffuw, fengyuan, xs.url, fs.url)
    xs.stop()
    fs.stop()


@pytest.fixture
def sims(_sim_servers: Sims) -> Sims:
    _sim_servers.xffuw.reset()
    _sim_servers.fengyuan.reset()
    return _sim_servers


@pytest.fixture
def fast_sim_tasks(sims: Sims) -> None:
    """Simulated tasks end within 0.04 s: finished at the proxy's first poll (0.05 s after submit)."""
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.04


@dataclass
class CompatSim:
    """The simulated OpenAI-compatible upstream; `base_url` is what a `type = "openai"` table names."""

    sim: OpenAICompatSim
    url: str

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="session")
def _openai_sim_server() -> Iterator[CompatSim]:
    sim = OpenAICompatSim({k: 100.0 for k in OPENAI_COMPAT_KEYS})
    server = BackgroundServer(create_openai_compat_app(sim)).start()
    sim.public_base = server.url
    yield CompatSim(sim, server.url)
    server.stop()


@pytest.fixture
def openai_sim(_openai_sim_server: CompatSim) -> CompatSim:
    _openai_sim_server.sim.reset()
    return _openai_sim_server


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def sim_providers(sims: Sims) -> dict[str, Any]:
    """The provider tables of a config that reaches the two simulators."""
    return {
        "xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": list(XFFUW_KEYS)},
        "fengyuan": {"base_url": sims.fengyuan_url, "keys": list(FENGYUAN_KEYS)},
    }


@pytest.fixture
def proxy_config(sims: Sims, tmp_path: Any) -> dict[str, Any]:
    """The raw config every test proxy starts from; tests may edit it before `proxy` is used."""
    return {
        "clients": [{"name": "alice", "key": CLIENT_KEY}, {"name": "bob", "key": OTHER_CLIENT_KEY}],
        "providers": sim_providers(sims),
        "tasks": {"poll_interval": 0.2, "first_poll": 0.05, "timeout": 10},
        "aliases": {"dall-e-3": "xffuw/gpt-image-2", "my-chat": "gpt-4o-mini"},
        # The suite's image tests read URLs; the gpt-image-* default (b64_json) is tested in test_images.py.
        "images": {"response_format": {"gpt-image-*": "url"}},
        "log": {"format": "json"},
        "storage": {"path": str(tmp_path / "proxy.sqlite3")},
    }


@dataclass
class RunningProxy:
    url: str
    server: BackgroundServer

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, api_key: str = CLIENT_KEY, **options: Any) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, **{"max_retries": 0, "timeout": 30, **options})

    def async_client(self, api_key: str = CLIENT_KEY, **options: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key=api_key, **{"max_retries": 0, "timeout": 30, **options})


@contextlib.contextmanager
def serving(raw: dict[str, Any]) -> Iterator[RunningProxy]:
    """A proxy built from `raw`, up while the block runs (a module's fixture: one for many tests)."""
    server = BackgroundServer(create_app(parse_config(copy.deepcopy(raw)))).start()
    try:
        yield RunningProxy(server.url, server)
    finally:
        server.stop()


@pytest.fixture
def start_proxy() -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    with contextlib.ExitStack() as started:
        yield lambda raw: started.enter_context(serving(raw))


@pytest.fixture
def proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any]) -> RunningProxy:
    return start_proxy(proxy_config)


@pytest.fixture
def client(proxy: RunningProxy) -> OpenAI:
    return proxy.client()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts (tests/helpers.py `spawn`), killed when it ends."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what it started (`--workers`)
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for localhost, 127.0.0.1 and upstream.test; client context trusting
    only a test CA of its own)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1", "upstream.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client
