"""The one place that decides how the proxy talks HTTP to upstreams.

httpx's API everywhere, but not its default transport: its connection pool collapses
under concurrency (../shared/perf-notes.md), so requests go through aiohttp underneath.
Change the transport here and nowhere else.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


class _NoCookies(httpx.Cookies):
    """The one client serves every key and every client of the proxy: a cookie one upstream
    answer sets must not ride along on another's calls. (Skipping the jar also saves a few
    percent of CPU per call.)"""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def build_client(max_connections: int = 1000) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=200, keepalive_expiry=30.0
    )
    client = httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(60.0, connect=5.0),
        follow_redirects=False,
        trust_env=False,
    )
    client._cookies = _NoCookies()  # the property setter would copy into a plain Cookies jar
    return client


def timed_out(exc: BaseException) -> bool:
    """A timeout, as opposed to a refused or dropped connection (which aiohttp's transport
    also reports as httpx.ConnectTimeout)."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, aiohttp.ServerTimeoutError)
    return isinstance(exc, TimeoutError | httpx.TimeoutException)


def never_sent(exc: BaseException) -> bool:
    """True only when the request provably never reached the upstream.

    The aiohttp transport maps most aiohttp errors onto httpx's connect errors, a dropped
    connection after sending included, so the aiohttp cause decides where there is one.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
