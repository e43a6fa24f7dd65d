"""The web console at /console: one page and its script and style, shipped in the package.

Everything it shows comes from the admin API, called by the page's script with the admin key
as a bearer token; the key lives in the page's memory only (never a URL, storage or cookie).
Nothing is fetched from elsewhere: teams run the proxy in closed networks.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath

from proxy.clip import clip
from proxy.errors import Kind, ProxyError

# Litestar adds "; charset=utf-8" to every text/ type.
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Only the proxy's own script and style run; the page may call the proxy alone and be framed by nobody.
_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidated (ETag): an upgraded proxy serves its new script at once
}


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file of static/ by name, with its ETag: read once; no other name is ever served."""
    found = {}
    for path in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + path.name.rsplit(".", 1)[-1]
        if path.is_file() and suffix in _TYPES:
            body = path.read_bytes()
            found[path.name] = (body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return found


def _serve(request: Request[Any, Any, Any], name: str) -> Response[bytes]:
    found = _assets().get(name)
    if found is None:
        raise ProxyError(Kind.NOT_FOUND, f"No console file '{clip(name)}'.")
    body, etag = found
    headers = {**_HEADERS, "etag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(b"", status_code=304, headers=headers)
    return Response(body, media_type=_TYPES["." + name.rsplit(".", 1)[1]], headers=headers)


@get(["/console", "/console/"], include_in_schema=False)
async def console_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    return _serve(request, "index.html")


@get("/console/static/{name:str}", include_in_schema=False)
async def console_asset(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
    return _serve(request, name)


CONSOLE_ROUTES = [console_page, console_asset]
