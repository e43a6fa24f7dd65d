"""The command line: `proxy check-config`, `proxy serve`, `proxy demo`, `--help`; config
errors that name the key path; clients given by key_sha256."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, XFFUW_KEYS, RunningProxy, Sims
from helpers import free_port, spawn, stop, to_toml, wait_healthy, write_config

from proxy.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
EXAMPLE_ENV = {"XFFUW_KEY_1": "xf_from_env_1111", "FENGYUAN_KEY_1": "sk-from-env-2222"}
# Variables the example reads; none may leak in from the environment running the tests.
EXAMPLE_VARS = ("XFFUW_KEY_1", "XFFUW_KEY_2", "FENGYUAN_KEY_1", "ALICE_PROXY_KEY", "PROXY_ADMIN_KEY")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EXAMPLE_VARS}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env or base_env(),
                          capture_output=True, text=True, timeout=timeout)


def cli_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The same command line in this process (a new interpreter per case costs a second)."""
    from proxy.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def minimal() -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 8080},
        "clients": [{"name": "alice", "key": "sk-team-alice-0000"}],
        "providers": {"xffuw": {"base_url": "https://ai.xffuw.com/api/v1/", "keys": ["xf_one_key_0000"]}},
    }


def test_the_toml_writer_round_trips() -> None:
    import tomllib

    raw = {**minimal(), "aliases": {"dall-e-3": "xffuw/gpt-image-2"}, "tasks": {"timeout": 1.5}}
    assert tomllib.loads(to_toml(raw)) == raw


# ---- check-config ------------------------------------------------------------------


def test_check_config_accepts_the_example_with_its_env() -> None:
    result = cli("check-config", str(EXAMPLE), env=base_env(**EXAMPLE_ENV))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("ok")
    assert result.stderr.strip() == ""
    for secret in EXAMPLE_ENV.values():  # what it prints names no key
        assert secret not in result.stdout


@pytest.mark.parametrize("missing", sorted(EXAMPLE_ENV))
def test_check_config_names_the_key_whose_env_var_is_missing(missing: str) -> None:
    env = base_env(**{k: v for k, v in EXAMPLE_ENV.items() if k != missing})
    result = cli("check-config", str(EXAMPLE), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    path = {"XFFUW_KEY_1": "providers.xffuw.keys[0]", "FENGYUAN_KEY_1": "providers.fengyuan.keys[0]"}[missing]
    assert path in lines[0] and missing in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def _broken(raw_change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    raw = minimal()
    raw_change(raw)
    return raw


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown server key": (lambda r: r["server"].update(colour="blue"), "server.colour"),
    "unknown top-level table": (lambda r: r.update(extras={"a": 1}), "extras"),
    "unknown provider key": (lambda r: r["providers"]["xffuw"].update(colour="blue"), "providers.xffuw.colour"),
    "unknown client key": (lambda r: r["clients"][0].update(colour="blue"), "clients[0].colour"),
    "port not an int": (lambda r: r["server"].update(port="eighty"), "server.port"),
    "key not a string": (lambda r: r["providers"]["xffuw"].update(keys=[12345]), "providers.xffuw.keys[0]"),
    "second key not a string": (lambda r: r["providers"]["xffuw"].update(keys=["xf_a_0000", True]),
                                "providers.xffuw.keys[1]"),
    "keys not a list": (lambda r: r["providers"]["xffuw"].update(keys="xf_a_0000"), "providers.xffuw.keys"),
    "timeout not a number": (lambda r: r.update(tasks={"timeout": "soon"}), "tasks.timeout"),
    "duplicate client names": (lambda r: r["clients"].append({"name": "alice", "key": "sk-other-0000"}),
                               "clients[1].name"),
    "client with neither key": (lambda r: r["clients"].append({"name": "bob"}), "clients[1]"),
    "client with both keys": (lambda r: r["clients"].append({"name": "bob", "key": "sk-b-0000",
                                                             "key_sha256": "0" * 64}), "clients[1]"),
    "key_sha256 not hex": (lambda r: r["clients"].append({"name": "bob", "key_sha256": "xyz"}),
                           "clients[1].key_sha256"),
    "client without a name": (lambda r: r["clients"].append({"key": "sk-b-0000"}), "clients[1].name"),
    "unknown upstream type": (lambda r: r["providers"].update(other={"base_url": "https://a.example", "keys": []}),
                              "providers.other.type"),
    "base_url not http": (lambda r: r["providers"]["xffuw"].update(base_url="ftp://x"), "providers.xffuw.base_url"),
    "no clients": (lambda r: r.update(clients=[]), "clients"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_config_names_the_bad_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    change, path = BROKEN[case]
    raw = _broken(change)
    if case == "no clients":
        raw.pop("clients")
    result = cli_here(capsys, "check-config", str(write_config(tmp_path, raw)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(rf"(^|[\s:]){re.escape(path)}([\s:.\[]|$)", lines[0]), (path, lines[0])
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file_and_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli_here(capsys, "check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "nope.toml" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n", encoding="utf-8")
    result = cli_here(capsys, "check-config", str(bad))
    assert result.returncode == 2 and "bad.toml" in result.stderr and "Traceback" not in result.stderr


ALICE_SHA = hashlib.sha256(b"sk-team-alice-0000").hexdigest()
PROVIDER_KEY = "xf_one_key_0000"


def _set(table: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.setdefault(table, {}).update(values)


def _xffuw(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r["providers"]["xffuw"].update(values)


def _client(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r["clients"].append({"name": "bob", **values})


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # any float that is not finite, wherever it is
    "budget nan": (lambda r: r["clients"][0].update(budget=float("nan")), "clients[0].budget"),
    "budget inf": (lambda r: r["clients"][0].update(budget=float("inf")), "clients[0].budget"),
    "tasks.timeout nan": (_set("tasks", timeout=float("nan")), "tasks.timeout"),
    "first_poll nan": (_set("tasks", first_poll=float("nan")), "tasks.first_poll"),
    "keep_results nan": (_set("tasks", keep_results=float("nan")), "tasks.keep_results"),
    "read_timeout inf": (_xffuw(read_timeout=float("inf")), "providers.xffuw.read_timeout"),
    # keys: each its own, compared by sha256 where only that is given
    "admin key = client key": (_set("admin", keys=["sk-team-alice-0000"]), "admin.keys[0]"),
    "admin sha = client key": (_set("admin", keys_sha256=[ALICE_SHA.upper()]), "admin.keys_sha256[0]"),
    "admin key = client sha": (lambda r: (r["clients"][0].update(key=None, key_sha256=ALICE_SHA),
                                          r.update(admin={"keys": ["sk-team-alice-0000"]})), "admin.keys[0]"),
    "duplicate client keys": (_client(key="sk-team-alice-0000"), "clients[1].key"),
    "client sha = client key": (_client(key_sha256=ALICE_SHA), "clients[1].key_sha256"),
    "client key = provider key": (_client(key=PROVIDER_KEY), "providers.xffuw.keys[0]"),
    "admin key = provider key": (_set("admin", keys=[PROVIDER_KEY]), "providers.xffuw.keys[0]"),
    "admin key = provider key table": (lambda r: (r["providers"]["xffuw"].update(keys=[], key=[{"value": "xf_t_0"}]),
                                                  r.update(admin={"keys": ["xf_t_0"]})),
                                       "providers.xffuw.key[0].value"),
    "empty admin key": (_set("admin", keys=[""]), "admin.keys[0]"),
    "duplicate admin keys": (_set("admin", keys=["sk-admin-0000", "sk-admin-0000"]), "admin.keys[1]"),
    "duplicate admin digests": (_set("admin", keys_sha256=[ALICE_SHA[::-1]] * 2), "admin.keys_sha256[1]"),
    "empty client name": (lambda r: r["clients"][0].update(name=""), "clients[0].name"),
    # ports
    "port 70000": (_set("server", port=70000), "server.port"),
    "port -1": (_set("server", port=-1), "server.port"),
    # sizes and times that make no sense
    "max_body_bytes -1": (_set("server", max_body_bytes=-1), "server.max_body_bytes"),
    "max_body_bytes 0": (_set("server", max_body_bytes=0), "server.max_body_bytes"),
    "max_body_bytes 10**30": (_set("server", max_body_bytes=10**30), "server.max_body_bytes"),
    "idempotency_hours -1": (_set("storage", idempotency_hours=-1.0), "storage.idempotency_hours"),
    "queue_timeout -1": (_xffuw(queue_timeout=-1.0), "providers.xffuw.queue_timeout"),
    "shutdown_grace -1": (_set("server", shutdown_grace=-1.0), "server.shutdown_grace"),
    "header_timeout 1e308": (_set("server", header_timeout=1e308), "server.header_timeout"),
    "connect_timeout 0": (_xffuw(connect_timeout=0.0), "providers.xffuw.connect_timeout"),
    "passthrough_prefix empty": (_xffuw(passthrough_prefix=""), "providers.xffuw.passthrough_prefix"),
    # a SQLite file the store cannot open
    "storage path /": (_set("storage", path="/"), "storage.path"),
    "storage path under a file": (_set("storage", path=str(EXAMPLE / "proxy.sqlite3")), "storage.path"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_values_are_refused_naming_the_key_path(case: str) -> None:
    change, path = HOSTILE[case]
    with pytest.raises(ConfigError) as refused:
        parse_config(_broken(change), env={})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(path + ":"), (path, message)
    assert not any(s in message for s in ("sk-team-alice-0000", PROVIDER_KEY, "sk-admin-0000", "xf_t_0")), message
    if "=" in case:  # a repeated key names the place it repeats too
        assert re.search(r"the same as (clients|admin|providers)", message), message


HOSTILE_FILES = {
    "nested": "a = " + "[" * 5000 + "]" * 5000 + "\n",
    "digits": "a = " + "9" * 5000 + "\n",
    "nan": to_toml(minimal()) + "\n[tasks]\ntimeout = nan\n",
    "1e400": to_toml(minimal()).replace('name = "alice"', 'name = "alice"\nbudget = 1e400'),
    "storage": to_toml(minimal()) + '\n[storage]\npath = "/"\n',
}


def test_check_config_answers_hostile_files_in_one_line(tmp_path: Path) -> None:
    """One process for all (a new interpreter per case costs a second): each file gets its line."""
    for name, text in HOSTILE_FILES.items():
        (tmp_path / f"{name}.toml").write_text(text, encoding="utf-8")
    script = ("import sys\nfrom proxy.cli import main\n"
              "for path in sys.argv[1:]:\n    print('exit', main(['check-config', path]), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / f"{n}.toml") for n in HOSTILE_FILES)],
                            cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 * len(HOSTILE_FILES), result.stderr
    for i, name in enumerate(HOSTILE_FILES):
        error, exit_ = lines[2 * i], lines[2 * i + 1]
        assert exit_ == "exit 2" and error.startswith("config error:"), (name, error, exit_)
    assert "tasks.timeout" in lines[4] and "clients[0].budget" in lines[6] and "storage.path" in lines[8], lines


def test_serve_refuses_a_bad_config_with_the_same_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, _broken(lambda r: r["server"].update(colour="blue")))
    result = cli("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "server.colour" in result.stderr


def test_serve_refuses_an_environment_proxy_it_cannot_use_with_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, minimal())
    result = cli("serve", "--config", str(path), "--port", str(free_port()),
                 env=base_env(HTTPS_PROXY="socks5://proxy.corp:1080"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "HTTPS_PROXY" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["serve"], ["demo"], ["check-config"]])
def test_help_exits_zero(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    result = cli_here(capsys, *args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lower().startswith("usage:")
    if args == ["serve"]:
        assert "--config" in result.stdout and "--port" in result.stdout
    if args == []:
        assert all(cmd in result.stdout for cmd in ("serve", "demo", "check-config"))


def test_help_as_a_process_exits_zero() -> None:
    result = cli("--help")
    assert result.returncode == 0 and "check-config" in result.stdout, result.stderr
    result = cli("serve", "--help")
    assert result.returncode == 0 and "--config" in result.stdout, result.stderr


# ---- key_sha256 --------------------------------------------------------------------


@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_a_client_given_by_key_sha256_can_call(start_proxy: Callable[..., RunningProxy],
                                               proxy_config: dict[str, Any], sims: Sims,
                                               case: Callable[[str], str]) -> None:
    digest = case(hashlib.sha256(CLIENT_KEY.encode()).hexdigest())
    proxy_config["clients"] = [{"name": "carol", "key_sha256": digest}]
    proxy = start_proxy(proxy_config)
    reply = proxy.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=digest).models.list()  # the digest itself is not a key
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key=CLIENT_KEY + "x").models.list()


# ---- serve and demo as processes ---------------------------------------------------


def test_serve_answers_the_sdk_and_stops_on_sigterm(processes: list[subprocess.Popen[str]], sims: Sims,
                                                    tmp_path: Path) -> None:
    raw = {
        "server": {"host": "127.0.0.1", "port": 1},  # overridden by --port
        "clients": [{"name": "alice", "key": CLIENT_KEY}],
        "providers": {
            "xffuw": {"base_url": f"{sims.xffuw_url}/api/v1/", "keys": list(XFFUW_KEYS)},
            "fengyuan": {"base_url": sims.fengyuan_url, "keys": list(FENGYUAN_KEYS)},
        },
        "storage": {"path": str(tmp_path / "proxy.sqlite3")},
        "log": {"format": "json"},
    }
    port = free_port()
    process = spawn(processes, "serve", "--config", str(write_config(tmp_path, raw)), "--port", str(port))
    stderr = process.err
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    with openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "你好"}])
    assert reply.choices[0].message.content == "你好!我是 AI 助手。You said: 你好"
    assert sims.xffuw.count("chat") == 1
    elapsed = stop(process, signal.SIGTERM, within=10)
    assert elapsed < 5, elapsed
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean stop too.
    assert process.returncode in (0, -signal.SIGTERM), (process.returncode, stderr.text[-2000:])
    assert "Traceback" not in stderr.text
    logged = [json.loads(line) for line in stderr.lines if line.startswith("{")]
    assert any(e.get("event") == "request" and e.get("path") == "/v1/chat/completions" and e.get("status") == 200
               for e in logged), stderr.text[-2000:]
    assert CLIENT_KEY not in stderr.text and all(k not in stderr.text for k in XFFUW_KEYS)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_prints_a_working_snippet(processes: list[subprocess.Popen[str]], sig: signal.Signals) -> None:
    port = free_port()
    process = spawn(processes, "demo", "--port", str(port))
    stdout = process.out
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    deadline = time.monotonic() + 5
    while "api_key=" not in stdout.text and time.monotonic() < deadline:
        time.sleep(0.05)
    text = stdout.text
    base = f"{url}/v1"
    assert f'base_url="{base}"' in text, text
    found = re.search(r'api_key="([^"]+)"', text)
    assert found, text
    key = found[1]
    assert f"Authorization: Bearer {key}" in text and f"curl {base}/chat/completions" in text
    with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "你好"}])
        assert reply.choices[0].message.content.endswith("你好")
        assert {m.id for m in client.models.list()} >= {"gpt-4o-mini", "gpt-image-2"}
    stop(process, sig, within=10)


def test_demo_answers_kept_alive_requests_without_a_delayed_ack_stall(
        processes: list[subprocess.Popen[str]]) -> None:
    """Requests on a kept-alive connection answer in a few ms, not after a ~40 ms stall: a
    listening socket made without IPPROTO_TCP gets no TCP_NODELAY from asyncio, so the
    response head and body go out as two segments and the second waits for a delayed ACK."""
    port = free_port()
    process = spawn(processes, "demo", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    took: dict[str, list[float]] = {"/healthz": [], "/v1/models": []}
    with httpx.Client(headers={"authorization": "Bearer sk-demo-alice"}) as http:
        for path, times in took.items():
            http.get(url + path)
            for _ in range(10):
                began = time.perf_counter()
                assert http.get(url + path).status_code == 200
                times.append(time.perf_counter() - began)
    stop(process, signal.SIGINT, within=10)
    for path, times in took.items():
        median = sorted(times)[len(times) // 2]
        assert median < 0.02, f"{path}: median round trip {median * 1000:.1f} ms: {[round(t * 1000) for t in times]}"
