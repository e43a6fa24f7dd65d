"""Who may call the proxy: client keys from the config, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from proxy.config import ClientConfig
from proxy.errors import Kind, ProxyError

NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
          "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
BAD_KEY = "Incorrect API key provided. Ask the proxy's administrator for a valid key."


class Clients:
    def __init__(self, clients: list[ClientConfig]) -> None:
        # Only digests are kept: comparing them in constant time leaks nothing of the keys.
        self._digests = [
            (bytes.fromhex(c.key_sha256) if c.key_sha256 else hashlib.sha256((c.key or "").encode()).digest(), c)
            for c in clients
        ]

    def authenticate(self, authorization: str | None) -> ClientConfig:
        if not authorization:
            raise ProxyError(Kind.INVALID_API_KEY, NO_KEY)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ProxyError(Kind.INVALID_API_KEY, NO_KEY)
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, client in self._digests:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(known, digest):
                found = client
        if found is None:
            raise ProxyError(Kind.INVALID_API_KEY, BAD_KEY)
        return found
