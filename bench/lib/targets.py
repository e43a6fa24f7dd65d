"""What the chat and image scenarios run against: the stub (direct), this proxy (1 or 2 workers)
and LiteLLM's proxy, each its own process; their settings and configs; the command line every
scenario program shares."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stub import CONTENT

from lib import BENCH, OUT, ROOT, say, toml
from lib.environment import LITELLM_VENV
from lib.loadclients import http_request
from lib.procs import Procs, interrupt_on_signals, raise_nofile, tree
from proxy.server import free_port

PROXY = [str(ROOT / ".venv" / "bin" / "proxy")] if (ROOT / ".venv" / "bin" / "proxy").exists() else \
    [sys.executable, "-m", "proxy"]
CLIENT_KEY = "sk-bench"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
CHAT_BODY = json.dumps({"model": "gpt-4o-mini", "messages": HELLO}).encode()
STREAM_BODY = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": HELLO}).encode()
IMAGE_BODY = json.dumps({"model": "gpt-image-2", "prompt": "an orange cat, studio photo"}).encode()
EXPECT = CONTENT[:40].encode()
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
TARGETS = ("direct", "proxy-1w", "proxy-2w", "litellm")


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


@dataclass
class Target:
    name: str
    port: int
    path: str = "/v1/chat/completions"
    proc: Any = None  # subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []


def check_chat(target: Target) -> None:
    status, body = http_request(target.port, "POST", target.path, CHAT_BODY, HEADERS)
    if status != 200 or EXPECT not in body:
        raise RuntimeError(f"{target.name}: chat answered HTTP {status}: {body[:300]!r}")


def proxy_config(port: int, stub_port: int | None, **sections: Any) -> dict[str, Any]:
    """This proxy on `port`, the stub (when given) as its xffuw; `sections` add or replace."""
    xffuw = {"base_url": f"http://127.0.0.1:{stub_port}/api/v1/", "keys": ["xf_bench_key"]}
    return {"server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 2.0},
            "clients": [{"name": "bench", "key": CLIENT_KEY}], **({"providers": {"xffuw": xffuw}} if stub_port else {}),
            "log": {"level": "warning", "format": "json"}, **sections}


def start_proxy(procs: Procs, config: dict[str, Any], tag: str, workers: int = 1, folder: Path = OUT,
                every: float = 0.005) -> tuple[Target, float]:
    """`proxy serve` on `config`, as folder/proxy-<tag>.toml, its output in folder/proxy-<tag>.log:
    the target and the seconds from spawn to the first 200 on /healthz."""
    path, log, port = folder / f"proxy-{tag}.toml", folder / f"proxy-{tag}.log", config["server"]["port"]
    path.write_text(toml(config))
    env = {k: v for k, v in os.environ.items() if k != "PROXY_CONFIG"}
    proc, ready = procs.start([*PROXY, "serve", "--config", str(path), "--workers", str(workers)], log, port,
                              "/healthz", 60, every, env=env, cwd=folder)
    return Target(f"proxy-{workers}w", port, proc=proc), ready


class Session:
    """One run's processes: the stub every target talks to, the proxies and LiteLLM it starts.
    Leaving the `with` block stops them all (errors and Ctrl-C included)."""

    def __init__(self, s: Settings, nice: int = 0) -> None:
        self.s, self.procs, self.proxy_port = s, Procs(nice), free_port()
        self._stub: Target | None = None

    def __enter__(self) -> Session:
        OUT.mkdir(parents=True, exist_ok=True)
        interrupt_on_signals(signal.SIGTERM, signal.SIGHUP)
        if (nofile := raise_nofile()) < self.s.images + 2000:
            self.s.images = max(100, nofile - 2000)
            say(f"note: RLIMIT_NOFILE is {nofile}; image requests lowered to {self.s.images}")
        return self

    def __exit__(self, *_: object) -> None:
        self.procs.stop_all()

    @property
    def stub(self) -> Target:
        if self._stub is None:
            port = free_port()
            proc, _ = self.procs.start([sys.executable, str(BENCH / "stub.py"), "--port", str(port)],
                                       OUT / "stub.log", port, "/healthz", 30)
            self._stub = Target("direct", port, proc=proc)
        return self._stub

    def proxy(self, workers: int, tag: str) -> tuple[Target, float]:
        """This proxy with the stub as its xffuw and a fresh SQLite store: the target and its startup time."""
        config = proxy_config(self.proxy_port, self.stub.port, log={"level": "info", "format": "json"},
                              tasks={"poll_interval": self.s.poll_interval, "first_poll": self.s.first_poll,
                                     "timeout": round(max(120.0, self.s.hold + self.s.spread + 120))},
                              storage={"path": str(OUT / "proxy.sqlite3")},
                              # the stub's URLs, as measured before gpt-image-* answered b64_json by default
                              images={"response_format": {"gpt-image-*": "url"}})
        for suffix in ("", "-wal", "-shm"):
            (OUT / f"proxy.sqlite3{suffix}").unlink(missing_ok=True)
        return start_proxy(self.procs, config, tag, workers)

    def litellm(self) -> tuple[Target, float]:
        """LiteLLM's proxy: one worker, no database, the stub's OpenAI route as its one model."""
        config, log, port = OUT / "litellm-bench.yaml", OUT / "litellm.log", free_port()
        config.write_text(json.dumps({  # JSON is YAML
            "model_list": [{"model_name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini",
                            "api_base": f"http://127.0.0.1:{self.stub.port}/v1", "api_key": "sk-stub"}}],
            "general_settings": {"master_key": CLIENT_KEY}, "litellm_settings": {"telemetry": False}}, indent=1))
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
        env.pop("DATABASE_URL", None)
        proc, ready = self.procs.start([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host",
                                        "127.0.0.1", "--port", str(port), "--num_workers", "1"], log, port,
                                       "/health/liveliness", 180, env=env, cwd=OUT)
        return Target("litellm", port, proc=proc), ready

    def target(self, name: str) -> Target:
        """A target by its column name, started for a scenario program run on its own."""
        if name == "direct":
            return self.stub
        return self.litellm()[0] if name == "litellm" else self.proxy(int(name[-2]), name[-2:])[0]

    def stop(self, target: Target) -> None:
        if target.proc is not None and target is not self._stub:
            self.procs.stop(target.proc)


def cli(doc: str | None, run: bool = False) -> tuple[argparse.Namespace, Settings]:
    """The command line of run.py (`run`) and of a scenario program run on its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario, 1,000 image requests")
    parser.add_argument("--images", type=int, metavar="N", help="waiting image requests (10,000; --quick 1,000)")
    parser.add_argument("--profile", action="store_true", help="also py-spy the 1-worker proxy, unmeasured")
    if run:
        parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
        parser.add_argument("--skip-install", action="store_true", help="install nothing (wrk, matplotlib, LiteLLM)")
        parser.add_argument("--quiet-wait", type=float, metavar="S", help="before each phase wait up to S s for "
                            "other processes to leave the CPUs (default 15, --quick 0)")
        parser.add_argument("--nice", type=int, default=-10, metavar="N", help="the nice value of the benchmark and "
                            "every process it starts, ahead of other work (default -10 when root; 0 leaves it)")
    else:
        parser.add_argument("--target", action="append", choices=TARGETS, default=[],
                            help="repeatable (default: direct, proxy-1w); litellm needs bench/.venv-litellm")
    args = parser.parse_args()
    s = Settings.quick() if args.quick else Settings()
    s.images = args.images or s.images
    if run and args.quiet_wait is not None:
        s.quiet_wait = args.quiet_wait
    args.target = getattr(args, "target", None) or ["direct", "proxy-1w"]
    return args, s


def each_target(doc: str | None, scenario: Callable[[Session, Target, argparse.Namespace], None]) -> int:
    """A scenario program run on its own: every --target started in turn, checked, measured, stopped."""
    args, s = cli(doc)
    with Session(s) as bench:
        for name in args.target:
            target = bench.target(name)
            check_chat(target)
            scenario(bench, target, args)
            bench.stop(target)
    return 0
