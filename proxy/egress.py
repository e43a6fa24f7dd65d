"""Which egress HTTP proxy an upstream call or a download goes through.

`[server] upstream_proxy` wins when set: every upstream call and every download goes through
it ("" turns proxies off). Unset, the environment decides as curl reads it: HTTPS_PROXY
for https URLs, HTTP_PROXY for http ones, NO_PROXY listing hosts, domain suffixes,
addresses or ranges reached directly ("*": all); loopback hosts are always reached
directly. Only http:// proxies are supported; a proxy URL's user:password becomes a Basic
Proxy-Authorization.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.request
from typing import NamedTuple
from urllib.parse import unquote, urlsplit


class EgressProxy(NamedTuple):
    host: str
    port: int
    authorization: bytes | None  # the Proxy-Authorization value, when the URL carries credentials

    @property
    def url(self) -> str:
        """The proxy's address, without its credentials: safe to log."""
        return f"http://{self.host}:{self.port}" if ":" not in self.host else f"http://[{self.host}]:{self.port}"


def parse_proxy(url: str, where: str) -> EgressProxy:
    """`http://[user:password@]host[:port]`; raises ValueError naming `where` otherwise."""
    parts = urlsplit(url if "://" in url else "http://" + url)  # curl takes "proxy:3128" too
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{where}: expected an http://host:port proxy URL (https and socks proxies are not supported)")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{where}: the proxy URL has an invalid port") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = b"Basic " + base64.b64encode(pair)
    return EgressProxy(parts.hostname, port, authorization)


class Egress:
    """The egress proxy of each origin, decided once at start."""

    def __init__(self, setting: str | None) -> None:
        self._all: EgressProxy | None = None
        self._by_scheme: dict[str, EgressProxy] = {}
        self._environment: dict[str, str] = {}
        if setting is not None:
            self._all = parse_proxy(setting, "server.upstream_proxy") if setting else None
            return
        self._environment = urllib.request.getproxies_environment()
        for scheme in ("http", "https"):
            if self._environment.get(scheme):
                self._by_scheme[scheme] = parse_proxy(self._environment[scheme], f"{scheme.upper()}_PROXY")

    def for_origin(self, scheme: str, host: str) -> EgressProxy | None:
        if self._all is not None:
            return self._all
        found = self._by_scheme.get(scheme)
        if found is None or _loopback(host) or no_proxy(host, self._environment.get("no", "")):
            return None
        return found


def no_proxy(host: str, listed: str) -> bool:
    """Whether NO_PROXY lists `host`, as curl reads it: "*", a host name or a domain suffix
    (".example.com" and "example.com" alike), an IP address or a CIDR range."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in listed.split(",")):
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = entry.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _loopback(host: str) -> bool:
    """Never through a proxy from the environment, as in Go's ProxyFromEnvironment: the
    simulated upstreams of the demo and the tests live there."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

