"""The upstream HTTP client candidates, from one process (uvloop) against bench/stub.py: calls
per second and CPU per call (bench/README.md, "The upstream HTTP client").

    .venv/bin/python bench/clients.py [--requests 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import uvloop
from lib.targets import Session, Settings

from proxy.upstream_http import build_client, head_of, origin_of

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"authorization": "Bearer xf_bench", "content-type": "application/json"}


async def measure(name: str, call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> None:
    for _ in range(200):  # warm: connections open, caches filled
        await call()
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"| {name} | {requests / wall:,.0f} | {cpu / requests * 1e6:,.0f} |", flush=True)


async def run(url: str, requests: int, concurrency: int) -> None:
    print(f"\n{requests:,} calls a row (POSTs; GETs in the last row), {concurrency} at once, one client per row\n")
    print("| client | calls/s | CPU µs per call |\n|---|---|---|")
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1000), trust_env=False) as plain:
        async def with_plain() -> None:
            (await plain.post(url, content=BODY, headers=HEADERS)).raise_for_status()

        await measure("httpx, default transport", with_plain, requests // 10, concurrency)
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        print("| httpx over aiohttp | skipped: pip install httpx-aiohttp | |")
    else:
        async with httpx.AsyncClient(transport=AiohttpTransport(limits=httpx.Limits(max_connections=1000)),
                                     trust_env=False) as over:
            async def with_aiohttp_transport() -> None:
                (await over.post(url, content=BODY, headers=HEADERS)).raise_for_status()

            await measure("httpx over aiohttp (httpx-aiohttp)", with_aiohttp_transport, requests, concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:
            async def with_aiohttp() -> None:
                async with session.post(url, data=BODY, headers=HEADERS) as reply:
                    reply.raise_for_status()
                    await reply.read()

            await measure("aiohttp alone (reference)", with_aiohttp, requests, concurrency)
    ours, target = build_client(), httpx.URL(url)
    poll, origin = target.copy_with(path="/api/v1/models.php"), origin_of(target)
    timeouts: dict[str, float | None] = {"connect": 5.0, "read": 60.0, "pool": 5.0}
    for label, method, head, body in (
            ("this proxy's transport, `fetch` (what providers use)", "POST", head_of("POST", target, [
                (b"host", target.netloc), *((k.encode(), v.encode()) for k, v in HEADERS.items()),
                (b"content-length", str(len(BODY)).encode())]), BODY),
            ("this proxy's transport, `fetch` GETs (pipelined)", "GET", head_of("GET", poll, [
                (b"host", poll.netloc), (b"authorization", b"Bearer xf_bench")]), b"")):
        async def with_fetch(method: str = method, head: bytes = head + b"\r\n", body: bytes = body) -> None:
            assert (await ours.transport.fetch(origin, method, head, body, timeouts)).status == 200

        await measure(label, with_fetch, requests, concurrency)
    await ours.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with Session(Settings()) as bench:
        port = bench.stub.port
        print(f"python {sys.version.split()[0]}, httpx {httpx.__version__}, {os.cpu_count()} cores")
        uvloop.run(run(f"http://127.0.0.1:{port}/api/v1/chat.php", args.requests, args.concurrency))


if __name__ == "__main__":
    main()
