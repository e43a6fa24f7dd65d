"""Both simulated upstreams (xffuw and Fengyuan) in one process, for the soak test.

    .venv/bin/python bench/soak_sims.py [--fault-rate 0.05] [--seed 7]

Loopback only. Prints one line ``READY {"xffuw": url, "fengyuan": url, "control": url}``
once the three servers listen, then serves until SIGTERM or SIGINT.

Each simulator gets the same mix of injected faults (their sum is ``--fault-rate``):
HTTP 500/502/503 with an nginx HTML page, a 200 with truncated JSON, a connection closed
before the request is processed, and a connection closed after it was processed (the
upstream charged and made the task, the answer is lost). On top of that the control
server can make a poll endpoint fail (503) for a while.

The control server (``GET /state``, ``POST /poll-fail?sim=xffuw&seconds=4``,
``POST /faults?rate=0``) lets the soak read back what the upstreams did. Every answered
submit (xffuw ``image.php``, Fengyuan ``/api/service/invoke``) is recorded with the
upstream's task id and whether an injected fault swallowed the answer: that is the list of
upstream tasks started, paid for, that the soak matches against the proxy's store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import re
import signal
import time
from collections import Counter
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post

from proxy.server import bind, port_of, uvicorn_server
from proxy.sim import FengyuanKey, FengyuanSim, XffuwSim, create_fengyuan_app, create_xffuw_app
from proxy.sim.faults import Faults

XFFUW_KEYS = ["xf_soak_key_alpha_1111", "xf_soak_key_beta_2222", "xf_soak_key_gamma_3333"]
FENGYUAN_KEYS = ["sk-fy-soak-key-one-4444", "sk-fy-soak-key-two-5555"]
SUBMIT_PATHS = {"xffuw": "/api/v1/image.php", "fengyuan": "/api/service/invoke"}

# What the fault layer picked for the request being handled (set inside FaultMiddleware._pick).
_PICKED: contextvars.ContextVar[str | None] = contextvars.ContextVar("picked", default=None)


def fault_mix(rate: float) -> dict[str, float]:
    """The injected faults, summing to `rate`."""
    return {"error_rate": rate * 0.3, "garbage_rate": rate * 0.2, "drop_rate": rate * 0.3,
            "drop_after_rate": rate * 0.2}


class Recorder:
    """Taps one simulator: counts injected faults by endpoint, records every answered submit."""

    def __init__(self, name: str, sim: XffuwSim | FengyuanSim, app: Litestar) -> None:
        self.name = name
        self.sim = sim
        self.submits: list[dict[str, Any]] = []
        self.faults: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        middleware = app.asgi_handler  # the FaultMiddleware the sim installed
        original_pick = middleware._pick  # type: ignore[attr-defined]

        def pick(faults: Faults) -> str | None:
            kind = original_pick(faults)
            _PICKED.set(kind)
            return kind

        middleware._pick = pick  # type: ignore[attr-defined]
        inner = middleware.app  # type: ignore[attr-defined]

        async def capture(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") != "http" or scope.get("path") != SUBMIT_PATHS[name]:
                await inner(scope, receive, send)
                return
            status, chunks = 0, []

            async def tap(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))
                await send(message)

            await inner(scope, receive, tap)
            self._submitted(status, b"".join(chunks), dropped=_PICKED.get() == "drop_after")

        middleware.app = capture  # type: ignore[attr-defined]

        async def outer(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                await middleware(scope, receive, send)
                return
            path = str(scope.get("path", ""))
            endpoint = self.endpoint(path)
            self.requests[endpoint] += 1
            _PICKED.set(None)
            faults = sim.faults
            if faults.down or (sim.is_poll_path(path) and time.monotonic() < faults.poll_fail_until):
                self.faults[f"{endpoint}:poll_fail_503"] += 1
            await middleware(scope, receive, send)
            picked = _PICKED.get()
            if picked is not None:
                self.faults[f"{endpoint}:{picked}"] += 1

        app.asgi_handler = outer  # type: ignore[assignment]

    def endpoint(self, path: str) -> str:
        if path.startswith("/files/"):
            return "file"
        if self.sim.is_poll_path(path):
            return "poll"
        if path == SUBMIT_PATHS[self.name]:
            return "submit"
        return path.rsplit("/", 1)[-1] or path

    def _submitted(self, status: int, body: bytes, *, dropped: bool) -> None:
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(answer, dict):
            return
        entry: dict[str, Any] = {"dropped": dropped, "at": time.time()}
        if self.name == "xffuw":
            if status != 200 or answer.get("ok") is not True:
                return  # an {"error": …} answer: nothing was made
            if answer.get("task_id"):
                entry.update(id=str(answer["task_id"]), instant=False)
            else:
                url = str(answer.get("result_url") or "")
                found = re.search(r"/files/xf-(\d+)\.", url)
                entry.update(id=found[1] if found else url, instant=True, url=url)
        else:
            data = answer.get("data")
            ok = answer.get("success") is True or answer.get("code") == 0
            if status != 200 or not ok or not isinstance(data, dict):
                return
            entry.update(id=str(data.get("id") or data.get("task_id")), instant=data.get("status") != "pending")
        self.submits.append(entry)

    def state(self) -> dict[str, Any]:
        tasks = list(self.sim.tasks.values())
        return {
            "submits": list(self.submits),
            "tasks": {t.id: {"outcome": t.outcome, "duration": t.duration} for t in tasks},
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "calls": dict(Counter(f"{c.endpoint}:{c.status}" for c in list(self.sim.calls))),
        }


def control_app(recorders: dict[str, Recorder]) -> Litestar:
    @get("/state")
    async def state() -> Response[bytes]:
        return Response(msgspec.json.encode({name: r.state() for name, r in recorders.items()}),
                        media_type="application/json")

    @post("/poll-fail", status_code=200)
    async def poll_fail(request: Request[Any, Any, Any]) -> dict[str, Any]:
        sim = recorders[request.query_params["sim"]].sim
        seconds = float(request.query_params["seconds"])
        sim.faults.poll_fail_until = time.monotonic() + seconds
        return {"ok": True}

    @post("/faults", status_code=200)
    async def faults(request: Request[Any, Any, Any]) -> dict[str, Any]:
        rate = float(request.query_params["rate"])
        for recorder in recorders.values():
            for name, value in fault_mix(rate).items():
                setattr(recorder.sim.faults, name, value)
        return {"ok": True}

    return Litestar(route_handlers=[state, poll_fail, faults], openapi_config=None, logging_config=None)


async def serve(args: argparse.Namespace) -> None:
    xffuw = XffuwSim({k: 1e12 for k in XFFUW_KEYS}, seed=args.seed)
    fengyuan = FengyuanSim({k: FengyuanKey(credits=1e12, vip_level=1, user_id=i + 1, username=f"soak{i}")
                            for i, k in enumerate(FENGYUAN_KEYS)}, seed=args.seed + 1)
    fengyuan.rate_limit_normal = fengyuan.rate_limit_vip = None  # the soak is about faults, not quotas
    for sim in (xffuw, fengyuan):
        sim.task_seconds = args.task_seconds
        for name, value in fault_mix(args.fault_rate).items():
            setattr(sim.faults, name, value)
    socks = {name: bind("127.0.0.1", 0) for name in ("xffuw", "fengyuan", "control")}
    xffuw.public_base = f"http://127.0.0.1:{port_of(socks['xffuw'])}"
    fengyuan.public_base = f"http://127.0.0.1:{port_of(socks['fengyuan'])}"
    xffuw_app, fengyuan_app = create_xffuw_app(xffuw), create_fengyuan_app(fengyuan)
    recorders = {"xffuw": Recorder("xffuw", xffuw, xffuw_app), "fengyuan": Recorder("fengyuan", fengyuan, fengyuan_app)}
    apps = {"xffuw": xffuw_app, "fengyuan": fengyuan_app, "control": control_app(recorders)}
    servers = {name: uvicorn_server(app, timeout_graceful_shutdown=1, backlog=4096) for name, app in apps.items()}
    for server in servers.values():
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # ours below
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = [asyncio.create_task(servers[name].serve(sockets=[socks[name]])) for name in servers]
    while not all(s.started for s in servers.values()):
        if any(t.done() for t in running):
            raise SystemExit("a simulator did not start")
        await asyncio.sleep(0.02)
    urls = {name: f"http://127.0.0.1:{port_of(sock)}" for name, sock in socks.items()}
    print("READY " + json.dumps(urls), flush=True)
    await stop.wait()
    for server in servers.values():
        server.should_exit = True
    await asyncio.gather(*running, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--task-seconds", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
