"""proxy/downloads.py: which result URLs are fetched, what answers are taken, and how much is
held at once; against raw loopback servers (test_upstream_http.py) and through the proxy."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import msgspec
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from test_upstream_http import Req, Upstream, answer, each, run

from proxy.config import Config, parse_config
from proxy.downloads import Budget, Downloaded, Downloads, data_url_base64, media_type_allowed, private_address
from proxy.errors import Kind, ProxyError
from proxy.openai.types import ImageData, ImagesResponse
from proxy.sim.assets import PNG_BYTES

MiB = 1024 * 1024

# ---- pure functions ---------------------------------------------------------------------

ADDRESSES = {
    "8.8.8.8": False, "1.1.1.1": False, "2001:4860:4860::8888": False, "::ffff:8.8.8.8": False,
    "64:ff9b::808:808": False,
    "127.0.0.1": True, "127.8.9.10": True, "10.1.2.3": True, "172.16.0.1": True, "192.168.1.1": True,
    "169.254.169.254": True, "100.64.0.1": True, "0.0.0.0": True, "224.0.0.1": True, "239.255.255.250": True,
    "255.255.255.255": True, "240.0.0.1": True, "192.0.2.1": True, "198.18.0.1": True,
    "::1": True, "::": True, "fe80::1": True, "fe80::1%eth0": True, "fc00::1": True, "fd12:3456::1": True,
    "ff02::1": True, "fec0::1": True, "2001:db8::1": True,
    "::ffff:127.0.0.1": True, "::ffff:10.0.0.1": True, "::ffff:169.254.169.254": True, "64:ff9b::7f00:1": True,
}


@pytest.mark.parametrize(("address", "private"), ADDRESSES.items())
def test_private_address(address: str, private: bool) -> None:
    assert private_address(address) is private


CONTENT_TYPES = {
    b"image/png": True, b"IMAGE/JPEG; charset=binary": True, b"video/mp4": True, b"audio/mpeg": True,
    b"application/octet-stream": True, b" image/webp ": True,
    None: False, b"": False, b"text/html": False, b"application/json": False, b"text/plain; charset=utf-8": False,
    b"application/xml": False, b"image": False, b"multipart/form-data": False,
}


@pytest.mark.parametrize(("content_type", "allowed"), CONTENT_TYPES.items())
def test_media_type_allowed(content_type: bytes | None, allowed: bool) -> None:
    assert media_type_allowed(content_type) is allowed


@pytest.mark.parametrize(("url", "data"), [
    ("data:image/png;base64,iVBORw0KGgo=", "iVBORw0KGgo="), ("data:video/mp4;base64,AAAA", "AAAA"),
    ("data:text/html;base64,PGI+", None), ("data:image/png,rawbytes", None), ("data:image/png;base64,", None),
    ('data:image/png;base64,AA"},{"x":"', None), ("data:image/png;base64,AA AA", None),
    ("https://cdn.example/a.png", None), ("javascript:alert(1)", None),
])
def test_data_url_base64(url: str, data: str | None) -> None:
    assert data_url_base64(url) == data


@pytest.mark.parametrize("sizes", [[0], [1], [2], [3], [65536 * 3], [65536 * 3 + 1], [7, 100_000, 1, 2, 300_000],
                                   [196_607, 2, 196_609]])
def test_base64_in_pieces_is_the_base64_of_the_whole(sizes: list[int]) -> None:
    budget = Budget(10 * MiB)
    downloaded = Downloaded(budget, 1, 10 * MiB)
    data = bytes(range(256)) * (sum(sizes) // 256 + 1)
    asyncio.run(budget.take(sum(sizes)))
    downloaded.hold(0, sum(sizes))
    at = 0
    for size in sizes:
        downloaded.add(0, data[at:at + size], 10 * MiB)
        at += size
    pieces = list(downloaded.base64(0))
    assert b"".join(pieces) == base64.b64encode(data[:at])
    assert all(b"=" not in piece for piece in pieces[:-1])  # only the last piece may be padded
    assert budget.free == budget.total  # each piece's bytes let go as it was written
    downloaded.release()
    assert budget.free == budget.total


def test_budget_serves_its_line_in_order_and_a_waiter_that_gives_up_takes_nothing() -> None:
    async def main() -> None:
        budget = Budget(10)
        await budget.take(6)
        granted: list[str] = []

        async def want(name: str, size: int) -> None:
            await budget.take(size)
            granted.append(name)

        big = asyncio.ensure_future(want("big", 8))
        small = asyncio.ensure_future(want("small", 2))  # would fit now, but waits behind "big": no overtaking
        gone = asyncio.ensure_future(want("gone", 1))
        await asyncio.sleep(0.01)
        assert granted == [] and budget.free == 4
        gone.cancel()
        budget.give(6)
        await asyncio.gather(big, small, return_exceptions=True)
        assert granted == ["big", "small"] and budget.free == 0
        assert gone.cancelled()
        budget.give(10)
        assert budget.free == budget.total

    asyncio.run(main())


# ---- against raw servers -----------------------------------------------------------------


def config(up: Upstream, **images: Any) -> Config:
    return parse_config({"clients": [{"name": "alice", "key": CLIENT_KEY}],
                         "providers": {"xffuw": {"base_url": up.url("/api/v1/"), "keys": ["xf_k"]}},
                         "images": images})


def files(up: Upstream, req: Req) -> bytes:
    """/png: a PNG; /to/<path>: a redirect there; /html, /untyped, /octet: what they say."""
    if req.target.startswith("/to/"):
        rest = req.target[4:]
        return answer(302, b"", [("Location", rest if rest.startswith("http") else "/" + rest)], reason="Found")
    if req.target == "/html":
        return answer(200, b"<html>sign in</html>", [("Content-Type", "text/html")])
    if req.target == "/untyped":
        return answer(200, PNG_BYTES)
    if req.target == "/octet":
        return answer(200, PNG_BYTES, [("Content-Type", "application/octet-stream")])
    if req.target == "/gzip":
        return answer(200, PNG_BYTES, [("Content-Type", "image/png"), ("Content-Encoding", "gzip")])
    if req.target == "/busy":
        return answer(503, b"busy", [("Content-Type", "text/plain")])
    return answer(200, PNG_BYTES, [("Content-Type", "image/png")])


async def fetch(downloads: Downloads, cfg: Config, *urls: str) -> list[bytes]:
    """The results' bytes, by way of their base64 (the budget let go of once written)."""
    downloaded = await downloads.fetch([(url, "xffuw") for url in urls], cfg)
    try:
        return [base64.b64decode(b"".join(downloaded.base64(i))) for i in range(len(urls))]
    finally:
        downloaded.release()


async def refused_download(downloads: Downloads, cfg: Config, url: str) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        await fetch(downloads, cfg, url)
    assert caught.value.kind is Kind.UPSTREAM_UNAVAILABLE
    assert downloads.budget.free == downloads.budget.total  # nothing held after a refusal
    return caught.value


def test_results_on_the_upstreams_own_origin_are_fetched_and_other_loopback_hosts_are_not() -> None:
    async def main() -> None:
        async with Upstream(each(files)) as up, Upstream(each(files)) as other:
            downloads, cfg = Downloads(64 * MiB), config(up)
            assert await fetch(downloads, cfg, up.url("/png"), up.url("/to/png")) == [PNG_BYTES, PNG_BYTES]
            assert await fetch(downloads, cfg, up.url("/octet")) == [PNG_BYTES]
            for url in (other.url("/png"),  # another loopback port
                        up.url("/png", host="localhost"),  # a name that resolves to 127.0.0.1
                        up.url("/to/" + other.url("/png")),  # a redirect from the upstream's origin to one
                        f"http://[::ffff:127.0.0.1]:{up.port}/png"):
                error = await refused_download(downloads, cfg, url)
                assert "private address" in error.message, url
            assert other.requests == []  # refused before connecting, not after
            assert [r.target for r in up.requests if r.target != "/png"] == \
                ["/to/png", "/octet", f"/to/{other.url('/png')}"]

    run(main)


def test_allow_private_hosts_lets_every_host_through() -> None:
    async def main() -> None:
        async with Upstream(each(files)) as up, Upstream(each(files)) as other:
            downloads, cfg = Downloads(64 * MiB), config(up, allow_private_hosts=True)
            got = await fetch(downloads, cfg, other.url("/png"), up.url("/png", host="localhost"),
                              up.url("/to/" + other.url("/png")))
            assert got == [PNG_BYTES] * 3
            assert len(other.requests) == 2

    run(main)


@pytest.mark.parametrize(("path", "says"), [("/html", "other than an image"), ("/untyped", "other than an image"),
                                            ("/gzip", "compressed"), ("/busy", "HTTP 503"),
                                            ("/to/to/to/to/png", "more than 3 times")])
def test_answers_that_are_not_a_result_file(path: str, says: str) -> None:
    async def main() -> None:
        async with Upstream(each(files)) as up:
            downloads = Downloads(64 * MiB)
            error = await refused_download(downloads, config(up), up.url(path))
            assert says in error.message
            tries = [r for r in up.requests if r.target == "/busy"]
            assert len(tries) == (3 if path.endswith("busy") else 0)  # a busy host is tried thrice, the rest once

    run(main)


def test_a_non_http_or_invalid_result_url_is_refused() -> None:
    async def main() -> None:
        async with Upstream(each(files)) as up:
            error = await refused_download(Downloads(64 * MiB), config(up), "file:///etc/passwd")
            assert "http(s)" in error.message
            error = await refused_download(Downloads(64 * MiB), config(up), "http://cdn.example:port/a.png")
            assert "not a valid URL" in error.message

    run(main)


async def drip(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
    """A file that arrives a byte every 20 ms, forever."""
    await up.read(reader, conn)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(1_000_000):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.02)


def test_download_timeout_bounds_a_dripping_download() -> None:
    async def main() -> None:
        async with Upstream(drip) as up:
            downloads = Downloads(64 * MiB)
            started = time.monotonic()
            error = await refused_download(downloads, config(up, download_timeout=0.5), up.url("/png"))
            assert "timed out" in error.message
            assert 0.45 <= time.monotonic() - started < 2

    run(main)


def big(size: int, chunked: bool) -> Any:
    async def handler(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while await up.read(reader, conn) is not None:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
            piece = b"p" * 65536
            if chunked:
                writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
                for _ in range(size // len(piece)):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(head + b"Content-Length: %d\r\n\r\n" % size)
                for _ in range(size // len(piece)):
                    writer.write(piece)
                    await writer.drain()
            await writer.drain()

    return handler


@pytest.mark.parametrize("chunked", [False, True])
def test_a_result_over_max_download_bytes_is_refused(chunked: bool) -> None:
    async def main() -> None:
        async with Upstream(big(4 * MiB, chunked)) as up:
            error = await refused_download(Downloads(64 * MiB), config(up, max_download_bytes=MiB), up.url("/png"))
            assert f"larger than {MiB} bytes" in error.message

    run(main)


def test_a_requests_results_together_are_capped() -> None:
    async def main() -> None:
        async with Upstream(big(MiB, True)) as up:
            downloads, cfg = Downloads(64 * MiB), config(up, max_download_bytes=2 * MiB,
                                                          max_request_download_bytes=3 * MiB)
            assert [len(b) for b in await fetch(downloads, cfg, *[up.url(f"/{n}") for n in range(3)])] == [MiB] * 3
            with pytest.raises(ProxyError) as caught:
                await fetch(downloads, cfg, *[up.url(f"/{n}") for n in range(4)])
            assert f"together are larger than {3 * MiB} bytes" in caught.value.message
            assert downloads.budget.free == downloads.budget.total

    run(main)


def test_concurrent_downloads_stay_within_the_process_budget_and_one_that_waits_too_long_gets_429() -> None:
    """Budget 3 MiB, results of 2 MiB sent chunked (no length known before the end): a download
    holds 2 MiB from before it starts, so a second waits until the first is written out."""

    async def main() -> None:
        async with Upstream(big(2 * MiB, True)) as up:
            downloads = Downloads(3 * MiB)
            cfg = config(up, max_download_bytes=2 * MiB, download_memory_bytes=3 * MiB)
            first = await downloads.fetch([(up.url("/first"), "xffuw")], cfg)
            assert downloads.budget.free == MiB
            second = asyncio.ensure_future(downloads.fetch([(up.url("/second"), "xffuw")], cfg))
            await asyncio.sleep(0.3)
            assert not second.done() and [r.target for r in up.requests] == ["/first"]  # waiting for room
            with pytest.raises(ProxyError) as caught:  # a third gives up after its timeout
                await downloads.fetch([(up.url("/third"), "xffuw")], config(up, max_download_bytes=2 * MiB,
                                                                             download_timeout=0.2))
            assert (caught.value.kind, caught.value.retry_after) == (Kind.RATE_LIMITED, 5.0)
            caught.value.task_ids = ("task_1",)  # as the images handler names the request's tasks
            assert (caught.value.shape.status, caught.value.should_retry) == (429, False)  # no paying SDK retry
            assert base64.b64decode(b"".join(first.base64(0))) == b"p" * 2 * MiB  # written: its bytes let go
            first.release()
            later = await asyncio.wait_for(second, 5)
            assert [r.target for r in up.requests] == ["/first", "/second"]
            assert later.sizes == [2 * MiB] and downloads.budget.free == MiB
            later.release()
            assert downloads.budget.free == downloads.budget.total

    run(main)


def test_an_answer_dropped_before_it_was_written_gives_its_budget_back() -> None:
    async def main() -> None:
        async with Upstream(each(files)) as up:
            downloads = Downloads(64 * MiB)
            downloaded = await downloads.fetch([(up.url("/png"), "xffuw")], config(up))
            assert downloads.budget.free == downloads.budget.total - len(PNG_BYTES)
            del downloaded
            assert downloads.budget.free == downloads.budget.total

    run(main)


# ---- through the proxy --------------------------------------------------------------------


def images(proxy: RunningProxy, **body: Any) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/images/generations", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                      json={"model": "flux-schnell", "prompt": "a cat", **body}, timeout=30)


def test_b64_json_answer_is_streamed_and_byte_identical_to_the_whole_encoding(proxy: RunningProxy) -> None:
    reply = images(proxy, response_format="b64_json", n=3)
    assert reply.status_code == 200, reply.text
    assert "content-length" not in reply.headers  # written as it is encoded, not built first
    created = reply.json()["created"]
    whole = msgspec.json.encode(ImagesResponse(created=created, data=[
        ImageData(b64_json=base64.b64encode(PNG_BYTES).decode())] * 3))
    assert reply.content == whole


@pytest.mark.parametrize(("base", "allow", "status"), [("http://localhost:{port}", False, 502),
                                                         ("http://localhost:{port}", True, 200),
                                                         ("ftp://127.0.0.1:{port}", False, 502)])
def test_result_urls_through_the_proxy(sims: Sims, start_proxy: Any, proxy_config: dict[str, Any],
                                       base: str, allow: bool, status: int) -> None:
    """The xffuw simulator hands out results at its public_base: here a name for loopback
    (or another scheme) rather than the upstream's own origin."""
    port = httpx.URL(sims.xffuw_url).port
    proxy_config["images"] = {"allow_private_hosts": allow}
    proxy = start_proxy(proxy_config)
    saved = sims.xffuw.public_base
    sims.xffuw.public_base = base.format(port=port)
    try:
        for response_format in ("b64_json", "url"):
            reply = images(proxy, response_format=response_format)
            expected = 502 if base.startswith("ftp") else (200 if response_format == "url" else status)
            assert reply.status_code == expected, (response_format, reply.text)
            if expected == 502:
                assert reply.json()["error"]["code"] == "upstream_error"
                assert reply.headers["x-proxy-task-ids"]  # the task succeeded; its result stays retrievable
            elif response_format == "b64_json":
                assert base64.b64decode(reply.json()["data"][0]["b64_json"]) == PNG_BYTES
    finally:
        sims.xffuw.public_base = saved
