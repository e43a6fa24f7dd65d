"""Upstream calls and downloads through an egress HTTP proxy (proxy/egress.py): a small
CONNECT proxy written here records what it tunnelled; the upstreams are raw loopback
servers (test_upstream_http.py), over TLS with a throwaway CA."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl

import httpx
import pytest
from conftest import CLIENT_KEY
from helpers import LoopbackServer
from test_downloads import config, fetch, files
from test_upstream_http import Upstream, call, each, ok, run

from proxy.config import ConfigError, parse_config
from proxy.downloads import Downloads
from proxy.egress import Egress, EgressProxy, no_proxy, parse_proxy
from proxy.errors import Kind, ProxyError
from proxy.sim.assets import PNG_BYTES
from proxy.upstream_http import build_client, never_sent

MiB = 1024 * 1024


class ConnectProxy(LoopbackServer):
    """An HTTP proxy that only opens tunnels (CONNECT), as corporate proxies do for https.
    Names ending ".test" are its own network's: it reaches them at 127.0.0.1."""

    def __init__(self, password: str | None = None) -> None:
        super().__init__()
        self.password = password
        self.tunnels: list[str] = []  # CONNECT targets, in order
        self.authorizations: list[str | None] = []

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            self.authorizations.append(headers.get("proxy-authorization"))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            expected = "Basic " + base64.b64encode(f"user:{self.password}".encode()).decode()
            if self.password is not None and headers.get("proxy-authorization") != expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(target)
            host, _, port = target.rpartition(":")
            host = "127.0.0.1" if host.endswith(".test") else host.strip("[]")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.close()


# ---- the providers' transport -------------------------------------------------------------------


def test_https_upstream_calls_go_through_one_tunnel(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with ConnectProxy() as proxy, Upstream(each(ok), ssl_context=server_ctx) as up:
            client = build_client(verify=client_ctx, egress=Egress(proxy.url()))
            assert (await call(client, "POST", up.url("/submit", host="localhost"), b"{}")).content == b"POST /submit"
            polls = await asyncio.gather(*(call(client, "GET", up.url(f"/poll?id={n}", host="localhost"))
                                           for n in range(5)))  # pipelined, inside the tunnel
            assert [p.content for p in polls] == [f"GET /poll?id={n}".encode() for n in range(5)]
            assert proxy.tunnels == [f"localhost:{up.port}"]  # one tunnel, kept alive like any connection
            assert up.accepted == 1
            assert up.requests[0].headers["host"] == f"localhost:{up.port}"
            await client.aclose()

    run(main)


def test_the_upstreams_certificate_is_verified_inside_the_tunnel(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls

    async def main() -> None:
        async with ConnectProxy() as proxy, Upstream(each(ok), ssl_context=server_ctx) as up:
            client = build_client(egress=Egress(proxy.url()))  # the system CAs: the test CA is unknown
            with pytest.raises(httpx.ConnectError) as caught:
                await call(client, "GET", up.url(host="localhost"))
            assert never_sent(caught.value)
            assert proxy.tunnels == [f"localhost:{up.port}"] and up.requests == []
            await client.aclose()

    run(main)


def test_http_upstreams_are_tunnelled_too_with_proxy_credentials() -> None:
    async def main() -> None:
        async with ConnectProxy(password="s3cret") as proxy, Upstream(each(ok)) as up:
            client = build_client(egress=Egress(proxy.url("user:s3cret@")))
            assert (await call(client, "GET", up.url("/x"))).content == b"GET /x"
            assert proxy.tunnels == [f"127.0.0.1:{up.port}"]
            assert proxy.authorizations == ["Basic " + base64.b64encode(b"user:s3cret").decode()]
            assert "proxy-authorization" not in up.requests[0].headers  # for the proxy only
            wrong = build_client(egress=Egress(proxy.url("user:wrong@")))
            with pytest.raises(httpx.ConnectError) as caught:
                await call(wrong, "POST", up.url("/y"), b"{}")
            assert never_sent(caught.value)  # refused by the proxy: the upstream never saw it
            assert [r.target for r in up.requests] == ["/x"]
            await client.aclose()
            await wrong.aclose()

    run(main)


def test_the_environment_chooses_the_proxy_and_no_proxy_and_loopback_bypass_it(
        tls: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with ConnectProxy() as proxy, Upstream(each(ok), ssl_context=server_ctx) as up:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url())
            monkeypatch.setenv("NO_PROXY", "direct.test,10.0.0.0/8")
            client = build_client(verify=client_ctx, egress=Egress(None))
            assert (await call(client, "GET", up.url("/via", host="upstream.test"))).content == b"GET /via"
            assert (await call(client, "GET", up.url("/direct", host="localhost"))).content == b"GET /direct"
            assert proxy.tunnels == [f"upstream.test:{up.port}"]  # loopback went direct
            assert [r.target for r in up.requests] == ["/via", "/direct"]
            await client.aclose()

    run(main)


# ---- downloads ------------------------------------------------------------------------------------


def test_downloads_go_through_the_proxy_and_keep_their_checks(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with ConnectProxy() as proxy, Upstream(each(files), ssl_context=server_ctx) as up:
            downloads = Downloads(64 * MiB, Egress(proxy.url()), verify=client_ctx)
            cfg = config(up)  # the upstream's origin: https://127.0.0.1:port
            # a public-looking name this machine cannot resolve: the proxy's network decides
            got = await fetch(downloads, cfg, up.url("/png", host="upstream.test"), up.url("/to/png"))
            assert got == [PNG_BYTES, PNG_BYTES]
            assert set(proxy.tunnels) == {f"upstream.test:{up.port}", f"127.0.0.1:{up.port}"}
            tunnels = len(proxy.tunnels)
            # a name that resolves here to a private address is refused before any tunnel
            with pytest.raises(ProxyError) as caught:
                await fetch(downloads, cfg, up.url("/png", host="localhost"))
            assert caught.value.kind is Kind.UPSTREAM_UNAVAILABLE and "private address" in caught.value.message
            assert len(proxy.tunnels) == tunnels

    run(main)


# ---- choosing the proxy ------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://proxy.corp:3128", EgressProxy("proxy.corp", 3128, None)),
    ("proxy.corp:3128", EgressProxy("proxy.corp", 3128, None)),
    ("http://proxy.corp", EgressProxy("proxy.corp", 80, None)),
    ("http://u%40corp:p%3Ass@proxy.corp:8080/", EgressProxy("proxy.corp", 8080,
                                                            b"Basic " + base64.b64encode(b"u@corp:p:ss"))),
    ("http://[fd00::1]:3128", EgressProxy("fd00::1", 3128, None)),
])
def test_parse_proxy(url: str, expected: EgressProxy) -> None:
    assert parse_proxy(url, "x") == expected


@pytest.mark.parametrize("url", ["https://proxy.corp:3128", "socks5://proxy.corp:1080", "http://", "http://p:99999"])
def test_parse_proxy_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="x: "):
        parse_proxy(url, "x")


@pytest.mark.parametrize(("host", "listed", "bypass"), [
    ("api.example.com", "", False), ("api.example.com", "*", True), ("api.example.com", "example.com", True),
    ("api.example.com", ".example.com", True), ("example.com", ".example.com", True),
    ("badexample.com", "example.com", False), ("API.Example.COM", "example.com", True),
    ("10.1.2.3", "10.0.0.0/8", True), ("10.1.2.3", "10.1.2.3", True), ("11.0.0.1", "10.0.0.0/8", False),
    ("fd00::5", "fd00::/8", True), ("api.example.com", " other.org , example.com ", True),
])
def test_no_proxy(host: str, listed: str, bypass: bool) -> None:
    assert no_proxy(host, listed) is bypass


def test_the_setting_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://env-http:3128")
    monkeypatch.setenv("NO_PROXY", "direct.example")
    from_env = Egress(None)
    assert from_env.for_origin("https", "api.example") == EgressProxy("env-proxy", 3128, None)
    assert from_env.for_origin("http", "api.example") == EgressProxy("env-http", 3128, None)
    assert from_env.for_origin("https", "direct.example") is None
    assert from_env.for_origin("https", "127.0.0.1") is None and from_env.for_origin("https", "localhost") is None
    setting = Egress("http://corp:8080")  # every origin, NO_PROXY and loopback included
    assert {setting.for_origin("https", h) for h in ("api.example", "direct.example", "127.0.0.1")} == \
        {EgressProxy("corp", 8080, None)}
    assert Egress("").for_origin("https", "api.example") is None  # "" turns the environment's off
    monkeypatch.setenv("HTTPS_PROXY", "socks5://env-proxy:1080")
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        Egress(None)


def test_config_checks_the_proxy_and_scrubs_its_password() -> None:
    base = {"clients": [{"name": "alice", "key": CLIENT_KEY}]}
    config = parse_config({**base, "server": {"upstream_proxy": "http://user:pa55word@proxy.corp:3128"}})
    assert "pa55word" in config.secrets()
    with pytest.raises(ConfigError, match=r"server\.upstream_proxy"):
        parse_config({**base, "server": {"upstream_proxy": "socks5://proxy.corp:1080"}})
