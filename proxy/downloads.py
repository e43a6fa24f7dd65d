"""Result downloads for `response_format: b64_json`, through httpcore (httpx's own transport).

Which hosts: a result on the origin of the upstream that produced it, or on a public
address. A name is resolved here when connecting, every address it resolves to is checked,
and the connection goes to a checked address (TLS still verifies the name), so DNS
rebinding cannot lead it elsewhere; `[images] allow_private_hosts` turns the check off. Up
to MAX_REDIRECTS redirects are followed, each hop checked the same way. The answer must be
an image, video or audio file.

How much: a download is held in memory until its base64 is written into the answer. It
counts against a process-wide budget (`download_memory_bytes`) from before it starts (the
largest size it may have, then the length its answer announces) until it is written; one
that finds no room waits in line within its timeout, then gets 429. A request's results
together are capped too (`max_request_download_bytes`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx
import structlog

from proxy.config import Config, ImagesConfig
from proxy.egress import Egress, EgressProxy
from proxy.errors import Kind, ProxyError
from proxy.loop import running_loop

log = structlog.get_logger("proxy.downloads")

MAX_REDIRECTS = 3
ATTEMPTS = 3  # a GET is safe to repeat: a download that failed on the way is tried twice more
RETRY_AFTER = 5.0  # seconds, when the download budget is full
PIECE = 3 * 65536  # bytes encoded at a time: a multiple of 3, so the pieces of base64 join without padding
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = [(b"user-agent", b"xf-openai-proxy"), (b"accept", b"image/*, video/*, audio/*"),
            (b"accept-encoding", b"identity")]  # the bytes as stored: base64 of a gzip stream is no image
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def private_address(text: str) -> bool:
    """Loopback, private, link-local, multicast, unspecified, reserved or otherwise not a
    public address (IPv4 inside IPv6 judged as IPv4)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.is_site_local:
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_unspecified or ip.is_reserved)


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def data_url_base64(url: str) -> str | None:
    """The base64 of a `data:` URL of a media file (a base64-only upstream's result), else None."""
    head, comma, data = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma and data):
        return None
    if not media_type_allowed(head[5:-7].encode("latin-1")) or not _BASE64.fullmatch(data):
        return None
    return data


def media_type_allowed(content_type: bytes | None) -> bool:
    """image/*, video/*, audio/*, and application/octet-stream: object stores (S3, OSS, COS)
    answer so for files stored without a type, and the address check keeps internal
    services out whatever type they answer."""
    kind = (content_type or b"").partition(b";")[0].strip().lower()
    return kind.startswith((b"image/", b"video/", b"audio/")) or kind == b"application/octet-stream"


class Budget:
    """Bytes held by downloads, process-wide; who asks for more than is free waits in line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._line: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, size: int) -> None:
        if not self._line and size <= self.free:
            self.free -= size
            return
        entry = (size, running_loop().create_future())
        self._line.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.give(size)  # granted just as the wait ended
            elif entry in self._line:
                self._line.remove(entry)
                self._wake()  # those behind it may fit now
            raise

    def give(self, size: int) -> None:
        self.free += size
        self._wake()

    def _wake(self) -> None:
        while self._line and self._line[0][0] <= self.free:
            size, waiter = self._line.popleft()
            if not waiter.done():
                self.free -= size
                waiter.set_result(None)


class Downloaded:
    """A request's results, held until written: `base64(i)` gives result i as base64 in
    pieces, letting go of its bytes (and their share of the budget) as it goes."""

    def __init__(self, budget: Budget, count: int, request_limit: int) -> None:
        self._budget = budget
        self._request_limit = request_limit
        self.bodies: list[collections.deque[bytes]] = [collections.deque() for _ in range(count)]
        self.given: list[str | None] = [None] * count  # base64 the upstream answered itself (data: URLs)
        self.sizes = [0] * count
        self.reserved = [0] * count  # of the budget, per result

    def __len__(self) -> int:
        return len(self.bodies)

    def hold(self, index: int, size: int) -> None:
        """Result `index` holds `size` bytes of the budget, taken already."""
        self.reserved[index] = size

    def shrink(self, index: int, size: int) -> None:
        """Result `index` needs no more than `size` bytes: the rest of its share goes back."""
        if size < self.reserved[index]:
            self._let_go(index, self.reserved[index] - size)

    def add(self, index: int, chunk: bytes, limit: int) -> None:
        self.sizes[index] += len(chunk)
        cap = min(limit, self.reserved[index])  # less than the limit where a worker's budget is smaller
        if self.sizes[index] > cap:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"The result is larger than {cap} bytes; ask for "
                             "response_format url instead.")
        if sum(self.sizes) > self._request_limit:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"The results together are larger than "
                             f"{self._request_limit} bytes; ask for response_format url instead.")
        self.bodies[index].append(chunk)

    def restart(self, index: int) -> None:
        """Forget what arrived of result `index`: it is being downloaded again."""
        self.bodies[index].clear()
        self.sizes[index] = 0

    def base64(self, index: int) -> Iterator[bytes]:
        given = self.given[index]
        if given is not None:
            for at in range(0, len(given), PIECE):
                yield given[at:at + PIECE].encode("ascii")
            return
        chunks, pending = self.bodies[index], bytearray()
        while chunks:
            chunk = chunks.popleft()
            pending += chunk
            if len(pending) >= PIECE:
                cut = len(pending) - len(pending) % 3
                yield base64.b64encode(pending[:cut])
                del pending[:cut]
            self._let_go(index, len(chunk))
        yield base64.b64encode(pending)

    def _let_go(self, index: int, size: int) -> None:
        size = min(size, self.reserved[index])
        self.reserved[index] -= size
        self._budget.give(size)

    def release(self) -> None:
        """Let go of everything still held (idempotent)."""
        for index, body in enumerate(self.bodies):
            body.clear()
            self._let_go(index, self.reserved[index])

    def __del__(self) -> None:  # an answer dropped before it was written must not keep the budget
        with contextlib.suppress(RuntimeError):  # its event loop closed already
            self.release()


class _Refused(httpcore.ConnectError):
    """A host a download may not reach."""


async def _addresses(host: str, port: int) -> list[str]:
    try:
        found = await running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve the result's host: {exc.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


class _Guard(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only where a download may: each name resolved
    here, every address checked, the connection made to a checked address."""

    def __init__(self, trusted: set[tuple[str, int]], allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._trusted = trusted
        self._allow_private = allow_private

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's)
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        if self._allow_private or (host.lower(), port) in self._trusted:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        addresses = await _addresses(host, port)
        if any(private_address(address) for address in addresses):
            raise _Refused(f"{host} is a private address")
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:  # every one checked: a name resolving to any private address is refused
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    async def check_name(self, host: str, port: int) -> None:
        """Through an egress proxy, which resolves names itself: a name that resolves here is
        checked here; one that does not is left to the proxy's own rules."""
        if self._allow_private or (host.lower(), port) in self._trusted:
            return
        try:
            addresses = await _addresses(host, port)
        except httpcore.ConnectError:
            return
        if any(private_address(address) for address in addresses):
            raise _Refused(f"{host} is a private address")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise _Refused("downloads do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Again(Exception):
    """A failure worth another attempt: the download broke on the way, or the host was busy."""


def _origin(url: httpx.URL) -> tuple[str, int]:
    return url.raw_host.decode("ascii").lower(), url.port or (443 if url.scheme == "https" else 80)


class _Session:
    """One request's downloads: their connection pools (direct, and through each egress
    proxy), closed together at the end."""

    def __init__(self, tls: ssl.SSLContext, egress: Egress | None, guard: _Guard) -> None:
        self._tls, self._egress, self.guard = tls, egress, guard
        self._pools: dict[EgressProxy | None, httpcore.AsyncConnectionPool] = {}

    def pool(self, url: httpx.URL) -> tuple[httpcore.AsyncConnectionPool, bool]:
        """The pool for `url`, and whether it goes through an egress proxy."""
        proxy = self._egress.for_origin(url.scheme, url.host) if self._egress is not None else None
        pool = self._pools.get(proxy)
        if pool is None:
            if proxy is None:
                pool = httpcore.AsyncConnectionPool(ssl_context=self._tls, network_backend=self.guard)
            else:  # its connections go to the proxy only; the target's name is checked before
                headers = [(b"proxy-authorization", proxy.authorization)] if proxy.authorization else None
                pool = httpcore.AsyncHTTPProxy(proxy_url=proxy.url, proxy_headers=headers, ssl_context=self._tls)
            self._pools[proxy] = pool
        return pool, proxy is not None

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


class Downloads:
    """The process's result downloads: a byte budget, TLS settings and the egress proxy;
    each request's downloads get connection pools of their own."""

    def __init__(self, memory_bytes: int, egress: Egress | None = None, verify: ssl.SSLContext | bool = True) -> None:
        self.budget = Budget(memory_bytes)
        self._egress = egress
        self._tls = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)

    async def fetch(self, results: list[tuple[str, str]], config: Config) -> Downloaded:
        """Each result (its URL, and the name of the upstream that produced it) downloaded
        whole; raises ProxyError when any cannot be."""
        images = config.images
        trusted = {_origin(httpx.URL(config.providers[name].base_url))
                   for _, name in results if name in config.providers}
        session = _Session(self._tls, self._egress, _Guard(trusted, images.allow_private_hosts))
        downloaded = Downloaded(self.budget, len(results), images.max_request_download_bytes)
        try:
            async with asyncio.TaskGroup() as group:
                for index, (url, _) in enumerate(results):
                    if url.startswith("data:"):
                        downloaded.given[index] = _given(url)
                    else:
                        group.create_task(self._one(session, downloaded, index, url, images))
        except BaseExceptionGroup as failed:
            downloaded.release()
            raise next((e for e in failed.exceptions if isinstance(e, ProxyError)), failed.exceptions[0]) from None
        except BaseException:
            downloaded.release()
            raise
        finally:
            await session.aclose()
        return downloaded

    async def _one(self, session: _Session, downloaded: Downloaded, index: int, url: str,
                   images: ImagesConfig) -> None:
        deadline = running_loop().time() + images.download_timeout
        most = min(images.max_download_bytes, images.max_request_download_bytes, self.budget.total)
        try:
            async with asyncio.timeout_at(deadline):
                await self.budget.take(most)
        except TimeoutError:
            # after paid tasks: the handler names them, which makes it x-should-retry: false
            raise ProxyError(Kind.RATE_LIMITED, "The proxy is holding as many downloaded results as it may. "
                             "The images are ready: GET /v1/tasks/{id} for the ids in x-proxy-task-ids, or ask "
                             "with response_format url.", retry_after=RETRY_AFTER) from None
        downloaded.hold(index, most)
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(ATTEMPTS):
                    try:
                        await self._get(session, downloaded, index, _parsed(url), images)
                        break
                    except _Again as again:
                        if attempt == ATTEMPTS - 1:
                            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, str(again)) from None
                        downloaded.restart(index)
                        await asyncio.sleep(0.2 * (attempt + 1))
        except TimeoutError:
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "Downloading the result timed out; ask for "
                             "response_format url instead.") from None
        downloaded.shrink(index, downloaded.sizes[index])

    async def _get(self, session: _Session, downloaded: Downloaded, index: int, url: httpx.URL,
                   images: ImagesConfig) -> None:
        timeouts = {"connect": images.download_timeout, "read": images.download_timeout,
                    "write": images.download_timeout, "pool": images.download_timeout}
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https"):
                raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The result is not at an http(s) URL.")
            pool, proxied = session.pool(url)
            target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
            try:
                if proxied:
                    await session.guard.check_name(*_origin(url))
                async with pool.stream(b"GET", target, headers=_HEADERS, extensions={"timeout": timeouts}) as answer:
                    location = _header(answer.headers, b"location")
                    if answer.status in _REDIRECTS and location is not None:
                        url = _parsed(location.decode("latin-1"), url)
                        continue
                    length = _check(answer.status, answer.headers, images.max_download_bytes)
                    if length is not None:
                        downloaded.shrink(index, length)
                    async for chunk in answer.aiter_stream():
                        downloaded.add(index, chunk, images.max_download_bytes)
                    return
            except _Refused as refused:
                log.warning("download_refused", host=url.host, reason=str(refused))
                raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The result URL is on a private address; the proxy "
                                 "fetches results only from the upstream's own origin or public hosts "
                                 "([images] allow_private_hosts).") from None
            except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError,
                    httpcore.ProxyError, httpcore.UnsupportedProtocol, OSError) as exc:
                raise _Again(f"Downloading the result failed ({exc.__class__.__name__}).") from None
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"The result URL redirected more than {MAX_REDIRECTS} times.")


def _parsed(url: str, base: httpx.URL | None = None) -> httpx.URL:
    """`url` (relative to `base`, a redirect's Location), or ProxyError when it is none."""
    try:
        return httpx.URL(url) if base is None else base.join(url)
    except httpx.InvalidURL:
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The result URL is not a valid URL.") from None


def _given(url: str) -> str:
    """A data: URL's base64, already in memory with the task: written as it is, nothing held."""
    data = data_url_base64(url)
    if data is None:
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The upstream answered a data: URL that is no base64 image, "
                         "video or audio file.")
    return data


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _check(status: int, headers: list[tuple[bytes, bytes]], limit: int) -> int | None:
    """An answer worth reading: a file, of a type and size a result may have; its announced length."""
    if status >= 500 or status == 429:
        raise _Again(f"Downloading the result answered HTTP {status}.")
    if status != 200:
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"Downloading the result answered HTTP {status}.")
    if not media_type_allowed(_header(headers, b"content-type")):
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The result URL answered something other than an image, "
                         "video or audio file.")
    encoding = (_header(headers, b"content-encoding") or b"identity").strip().lower()
    if encoding != b"identity":
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "The result URL answered compressed bytes though none were "
                         "asked for.")
    length = _header(headers, b"content-length")
    if length is None or not length.strip().isdigit():
        return None
    if int(length) > limit:
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"The result is larger than {limit} bytes; ask for "
                         "response_format url instead.")
    return int(length)
