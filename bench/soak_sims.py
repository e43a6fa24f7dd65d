"""Both simulated upstreams in one process for the soak, with injected faults (summing to
--fault-rate), and a control server: GET /state (every answered submit, whether a fault
swallowed its answer; faults and requests by endpoint), POST /poll-fail?sim=&seconds= (a poll
endpoint answering 503 for a while). Prints `READY {"xffuw": url, "fengyuan": url, "control": url}`.

    .venv/bin/python bench/soak_sims.py [--fault-rate 0.05] [--seed 7] [--task-seconds 1]
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
import uvloop
from litestar import Litestar, Request, Response, get, post

from proxy.server import bind, port_of, uvicorn_server
from proxy.sim import FengyuanKey, FengyuanSim, XffuwSim, create_fengyuan_app, create_xffuw_app
from proxy.sim.faults import Faults

XFFUW_KEYS = ["xf_soak_key_alpha_1111", "xf_soak_key_beta_2222", "xf_soak_key_gamma_3333"]
FENGYUAN_KEYS = ["sk-fy-soak-key-one-4444", "sk-fy-soak-key-two-5555"]
SUBMIT_PATHS = {"xffuw": "/api/v1/image.php", "fengyuan": "/api/service/invoke"}
_PICKED: contextvars.ContextVar[str | None] = contextvars.ContextVar("picked", default=None)  # this request's fault


class Recorder:
    """Taps one simulator's fault layer: counts injected faults by endpoint, records every answered submit."""

    def __init__(self, name: str, sim: XffuwSim | FengyuanSim, app: Litestar) -> None:
        self.name, self.sim, self.app, self.submits = name, sim, app, list[dict[str, Any]]()
        self.faults, self.requests = Counter[str](), Counter[str]()
        middleware = app.asgi_handler  # the FaultMiddleware the sim installed
        pick, inner = middleware._pick, middleware.app  # type: ignore[attr-defined]

        def picked(faults: Faults) -> str | None:
            _PICKED.set(kind := pick(faults))
            return kind

        async def capture(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") != "http" or scope.get("path") != SUBMIT_PATHS[name]:
                return await inner(scope, receive, send)
            start, chunks = {"status": 0}, list[bytes]()

            async def tap(message: Any) -> None:
                if message["type"] == "http.response.start":
                    start["status"] = message["status"]
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))
                await send(message)

            await inner(scope, receive, tap)
            self.submitted(start["status"], b"".join(chunks), dropped=_PICKED.get() == "drop_after")

        async def outer(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                return await middleware(scope, receive, send)
            path = str(scope.get("path", ""))
            endpoint = "file" if path.startswith("/files/") else "poll" if sim.is_poll_path(path) else \
                "submit" if path == SUBMIT_PATHS[name] else path.rsplit("/", 1)[-1] or path
            self.requests[endpoint] += 1
            _PICKED.set(None)
            if sim.faults.down or (sim.is_poll_path(path) and time.monotonic() < sim.faults.poll_fail_until):
                self.faults[f"{endpoint}:poll_fail_503"] += 1
            await middleware(scope, receive, send)
            if (kind := _PICKED.get()) is not None:
                self.faults[f"{endpoint}:{kind}"] += 1

        middleware._pick, middleware.app, app.asgi_handler = picked, capture, outer  # type: ignore[attr-defined,assignment]

    def submitted(self, status: int, body: bytes, *, dropped: bool) -> None:
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(answer, dict) or status != 200:
            return
        entry: dict[str, Any] = {"dropped": dropped, "at": time.time()}
        if self.name == "xffuw":
            if answer.get("ok") is not True:
                return  # an {"error": …} answer: nothing was made
            if answer.get("task_id"):
                entry.update(id=str(answer["task_id"]), instant=False)
            else:
                url = str(answer.get("result_url") or "")
                found = re.search(r"/files/xf-(\d+)\.", url)
                entry.update(id=found[1] if found else url, instant=True, url=url)
        else:
            data = answer.get("data")
            if not (answer.get("success") is True or answer.get("code") == 0) or not isinstance(data, dict):
                return
            entry.update(id=str(data.get("id") or data.get("task_id")), instant=data.get("status") != "pending")
        self.submits.append(entry)

    def state(self) -> dict[str, Any]:
        return {"submits": list(self.submits), "requests": dict(self.requests), "faults": dict(self.faults)}


async def serve(args: argparse.Namespace) -> None:
    xffuw = XffuwSim({k: 1e12 for k in XFFUW_KEYS}, seed=args.seed)
    fengyuan = FengyuanSim({k: FengyuanKey(credits=1e12, vip_level=1, user_id=i + 1, username=f"soak{i}")
                            for i, k in enumerate(FENGYUAN_KEYS)}, seed=args.seed + 1)
    fengyuan.rate_limit_normal = fengyuan.rate_limit_vip = None  # the soak is about faults, not quotas
    socks = {name: bind("127.0.0.1", 0) for name in ("xffuw", "fengyuan", "control")}
    urls = {name: f"http://127.0.0.1:{port_of(sock)}" for name, sock in socks.items()}
    recorders = {}
    for name, sim, create in (("xffuw", xffuw, create_xffuw_app), ("fengyuan", fengyuan, create_fengyuan_app)):
        sim.task_seconds, sim.public_base = args.task_seconds, urls[name]
        for fault, share in (("error", 0.3), ("garbage", 0.2), ("drop", 0.3), ("drop_after", 0.2)):
            setattr(sim.faults, f"{fault}_rate", args.fault_rate * share)
        recorders[name] = Recorder(name, sim, create(sim))  # type: ignore[arg-type]

    @get("/state")
    async def state() -> Response[bytes]:
        return Response(msgspec.json.encode({name: r.state() for name, r in recorders.items()}),
                        media_type="application/json")

    @post("/poll-fail", status_code=200)
    async def poll_fail(request: Request[Any, Any, Any]) -> dict[str, Any]:
        sim = recorders[request.query_params["sim"]].sim
        sim.faults.poll_fail_until = time.monotonic() + float(request.query_params["seconds"])
        return {"ok": True}

    apps = {**{name: r.app for name, r in recorders.items()},
            "control": Litestar(route_handlers=[state, poll_fail], openapi_config=None, logging_config=None)}
    servers = {name: uvicorn_server(app, timeout_graceful_shutdown=1, backlog=4096) for name, app in apps.items()}
    for server in servers.values():
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # ours below
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    running = [asyncio.create_task(servers[name].serve(sockets=[socks[name]])) for name in servers]
    while not all(s.started for s in servers.values()):
        if any(t.done() for t in running):
            raise SystemExit("a simulator did not start")
        await asyncio.sleep(0.02)
    print("READY " + json.dumps(urls), flush=True)
    await stop.wait()
    for server in servers.values():
        server.should_exit = True
    await asyncio.gather(*running, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--task-seconds", type=float, default=1.0)
    uvloop.run(serve(parser.parse_args()))
