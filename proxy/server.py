"""Running ASGI apps with uvicorn: on a pre-bound socket, in this loop or a background thread, or
as `proxy serve` does; every server speaks through the protocol with connection limits."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from proxy.http_server import ConnectionLimits, LimitedConfig


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then, and without it a kept-alive
    # connection stalls ~40 ms on the delayed ACK between uvicorn's two writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until something binds it): for a process
    started with --port (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return port_of(sock)


def uvicorn_config(app: Any, *, limits: ConnectionLimits | None = None, log_level: str = "warning",
                   **options: Any) -> LimitedConfig:
    options.setdefault("timeout_graceful_shutdown", 5)
    # log_config None: uvicorn's lines go through the proxy's logging (proxy/log.py), not a format of its own
    return LimitedConfig(app, limits=limits, log_level=log_level, log_config=None, access_log=False, lifespan="on",
                         **options)


def uvicorn_server(app: Any, *, limits: ConnectionLimits | None = None, **options: Any) -> uvicorn.Server:
    return uvicorn.Server(uvicorn_config(app, limits=limits, **options))


def run(config: LimitedConfig) -> bool:
    """Serve until stopped, in this process or in `config.workers` ones sharing one socket (what
    uvicorn.run does with a config it builds itself); False if it could not start."""
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return server.started


class BackgroundServer:
    """One app served on loopback from a thread with its own event loop (tests, tools)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 limits: ConnectionLimits | None = None) -> None:
        self.sock = bind(host, port)
        self.port = port_of(self.sock)
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn_server(app, limits=limits)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"server:{self.port}")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread ended before it started serving")
            deadline.wait(0.01)
            waited += 0.01
            if waited > timeout:
                raise TimeoutError("the server did not start in time")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self.sock.close()
