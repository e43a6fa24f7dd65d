"""`proxy serve | demo | check-config | store migrate`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from typing import Any
from urllib.parse import urlsplit

from proxy.config import ConfigError, load_config, parse_config

DEMO_CLIENT_KEY = "sk-demo-alice"


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        config.server.egress()  # the environment's proxies, refused here rather than in a worker
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from proxy.http_server import connection_limits, raise_open_file_limit
    from proxy.server import run, uvicorn_config

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    raise_open_file_limit()  # before the connection cap is derived from it
    limits = connection_limits(config.server.max_connections, config.server.header_timeout,
                               body_timeout=config.server.body_timeout)
    # proxy_headers off: nothing reads the client address, and it is one more layer per request
    options: dict[str, Any] = dict(host=host, port=port, proxy_headers=False, limits=limits,
                                   timeout_graceful_shutdown=config.server.shutdown_grace)
    if args.workers > 1:
        from proxy.log import setup_logging

        setup_logging(config.log.level, config.log.format)  # the supervisor's own lines (a worker died)
        # Each worker process builds its own app from the same file.
        os.environ["PROXY_CONFIG"] = os.path.abspath(args.config)
        os.environ["PROXY_WORKERS"] = str(args.workers)  # each keeps its part of every limit
        return 0 if run(uvicorn_config("proxy.asgi:app_from_env", factory=True, workers=args.workers,
                                       **options)) else 3
    from proxy.app import create_app

    return 0 if run(uvicorn_config(create_app(config, args.config), **options)) else 3


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    providers = ", ".join(f"{name} ({len(p.all_keys())} keys)" for name, p in config.providers.items()) or "none"
    print(f"ok: {len(config.clients)} clients; providers: {providers}; {len(config.aliases)} aliases")
    return 0


def _store_migrate(args: argparse.Namespace) -> int:
    import asyncpg  # type: ignore[import-untyped]

    from proxy.store.migrations import SchemaTooNew
    from proxy.store.postgres import StoreUnavailable
    from proxy.store.transfer import sqlite_to_postgres

    source, target = args.source, args.target
    if not source.startswith("sqlite:") or len(source) == len("sqlite:"):
        print("--from: expected sqlite:PATH (the [storage] path of the proxy that wrote it)", file=sys.stderr)
        return 2
    if not target.startswith(("postgresql://", "postgres://")):
        print("--to: expected a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        sqlite_to_postgres(source.removeprefix("sqlite:"), target)
    except (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, SchemaTooNew,
            StoreUnavailable) as error:
        print(f"store migrate failed: {redact_url(str(error), target)}", file=sys.stderr)
        return 1
    return 0


def redact_url(text: str, url: str) -> str:
    """The URL's password never reaches the terminal or a CI log."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def demo_config(xffuw_url: str, fengyuan_url: str, port: int, host: str) -> dict[str, Any]:
    from proxy.sim import FENGYUAN_DEMO_KEYS, XFFUW_DEMO_KEYS

    return {
        "server": {"host": host, "port": port},
        "clients": [{"name": "alice", "key": DEMO_CLIENT_KEY}],
        "providers": {
            "xffuw": {"base_url": f"{xffuw_url}/api/v1/", "keys": list(XFFUW_DEMO_KEYS)},
            "fengyuan": {"base_url": fengyuan_url, "keys": list(FENGYUAN_DEMO_KEYS)},
        },
        "tasks": {"poll_interval": 1.0, "first_poll": 0.5, "timeout": 120},
        "aliases": {"dall-e-3": "xffuw/gpt-image-2", "dall-e-2": "xffuw/flux-schnell"},
        "storage": {"path": ":memory:"},
    }


async def _demo(host: str, port: int) -> None:
    from proxy.app import create_app
    from proxy.server import bind, port_of, uvicorn_server
    from proxy.sim import FengyuanSim, XffuwSim, create_fengyuan_app, create_xffuw_app

    xffuw, fengyuan = XffuwSim(), FengyuanSim()
    xffuw.task_seconds = fengyuan.task_seconds = 2.0
    xffuw_sock, fengyuan_sock = bind(), bind()
    xffuw.public_base = f"http://127.0.0.1:{port_of(xffuw_sock)}"
    fengyuan.public_base = f"http://127.0.0.1:{port_of(fengyuan_sock)}"
    config = parse_config(demo_config(xffuw.public_base, fengyuan.public_base, port, host))
    proxy_sock = bind(host, port)
    base = f"http://{host}:{port_of(proxy_sock)}/v1"
    print(f"""
Proxy demo: simulated xffuw at {xffuw.public_base}, simulated Fengyuan at {fengyuan.public_base}
The proxy serves {base} ; client key: {DEMO_CLIENT_KEY}

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{DEMO_CLIENT_KEY}")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{{"role": "user", "content": "你好"}}]).choices[0].message.content)
  print(client.images.generate(model="dall-e-3", prompt="一只橘猫").data[0].url)
  print([m.id for m in client.models.list()])

  curl {base}/chat/completions -H "Authorization: Bearer {DEMO_CLIENT_KEY}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}}'

Ctrl-C stops it.
""", flush=True)
    servers = [
        (uvicorn_server(create_xffuw_app(xffuw)), xffuw_sock),
        (uvicorn_server(create_fengyuan_app(fengyuan)), fengyuan_sock),
        (uvicorn_server(create_app(config)), proxy_sock),
    ]
    await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxy", description="OpenAI-compatible proxy for xffuw and Fengyuan.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the proxy from a config file")
    serve.add_argument("--config", required=True, help="path to the TOML config")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    demo = commands.add_parser("demo", help="run the proxy on embedded simulated upstreams")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    store = commands.add_parser("store", help="the usage, task and idempotency store")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    migrate = store_commands.add_parser(
        "migrate", help="copy a SQLite store's history to PostgreSQL (again: copies what changed since)")
    migrate.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH")
    migrate.add_argument("--to", dest="target", required=True, metavar="postgresql://USER:PASS@HOST:5432/DB")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "store":
        return _store_migrate(args)
    try:
        asyncio.run(_demo(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
