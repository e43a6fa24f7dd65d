"""Upstream keys per provider: choose one, set bad ones aside, bring them back.

States: active; cooling (rate limited, until Retry-After); exhausted (balance short,
tried again after `recheck_after`); disabled (the upstream refused the key). A call that
fails in a way proving the upstream did not take it moves on to a key not yet tried.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from proxy.errors import Kind, ProxyError

T = TypeVar("T")
KeyState = Literal["active", "cooling", "exhausted", "disabled"]

DEFAULT_COOLDOWN = 10.0  # seconds a rate-limited key rests when the upstream names no Retry-After


def fingerprint(secret: str) -> str:
    """A stable, non-reversible name for a key, safe for logs and admin pages."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(eq=False)
class UpstreamKey:
    provider: str
    secret: str = field(repr=False)
    fingerprint: str
    state: KeyState = "active"
    until: float = 0.0  # monotonic time the current state ends (cooling, exhausted)
    reason: str | None = None
    in_flight: int = 0
    requests: int = 0
    failures: int = 0

    def usable(self, now: float) -> bool:
        if self.state == "active":
            return True
        if self.state in ("cooling", "exhausted") and now >= self.until:
            return True  # let the next request through: it proves whether the key is back
        return False


class KeyPool:
    def __init__(self, provider: str, secrets: list[str], *, recheck_after: float) -> None:
        self.provider = provider
        self.recheck_after = recheck_after
        self.keys = [UpstreamKey(provider, s, fingerprint(s)) for s in dict.fromkeys(secrets)]
        self._next = 0

    def choose(self, exclude: set[str]) -> UpstreamKey | None:
        now = time.monotonic()
        count = len(self.keys)
        for offset in range(count):
            key = self.keys[(self._next + offset) % count]
            if key.fingerprint not in exclude and key.usable(now):
                self._next = (self._next + offset + 1) % count
                return key
        return None

    def succeeded(self, key: UpstreamKey) -> None:
        if key.state != "disabled":
            key.state, key.until, key.reason = "active", 0.0, None

    def failed(self, key: UpstreamKey, error: ProxyError) -> None:
        key.failures += 1
        now = time.monotonic()
        if error.kind is Kind.AUTH:
            key.state, key.until, key.reason = "disabled", 0.0, error.message
        elif error.kind is Kind.BALANCE:
            key.state, key.until, key.reason = "exhausted", now + self.recheck_after, error.message
        elif error.kind is Kind.RATE_LIMITED:
            pause = error.retry_after if error.retry_after is not None else DEFAULT_COOLDOWN
            key.state, key.until, key.reason = "cooling", now + pause, error.message

    def nobody_left(self, last: ProxyError | None) -> ProxyError:
        """The error to answer when no key can take the call: the most hopeful state wins."""
        now = time.monotonic()
        cooling = [k.until - now for k in self.keys if k.state == "cooling" and k.until > now]
        if cooling or (last is not None and last.kind is Kind.RATE_LIMITED):
            wait = max(1.0, min(cooling)) if cooling else DEFAULT_COOLDOWN
            return ProxyError(Kind.RATE_LIMITED, f"every {self.provider} key is rate limited; retry later",
                              retry_after=wait)
        if any(k.state == "exhausted" for k in self.keys):
            return ProxyError(Kind.BALANCE, f"every {self.provider} key is short of balance or credits")
        if last is not None and last.kind is Kind.UPSTREAM_UNAVAILABLE:
            return last
        return ProxyError(Kind.NO_UPSTREAM_KEY, f"no usable {self.provider} key: every key is disabled")

    async def run(self, call: Callable[[str], Awaitable[T]]) -> tuple[T, UpstreamKey]:
        """Run `call(secret)` on one key after another until one answers or none is left.

        Moves on only when the failure proves the upstream did not take the call: a paid
        request is never sent twice.
        """
        tried: set[str] = set()
        last: ProxyError | None = None
        while (key := self.choose(tried)) is not None:
            tried.add(key.fingerprint)
            key.requests += 1
            key.in_flight += 1
            try:
                result = await call(key.secret)
            except ProxyError as error:
                self.failed(key, error)
                if not error.retryable_elsewhere:
                    raise
                last = error
                continue
            finally:
                key.in_flight -= 1
            self.succeeded(key)
            return result, key
        raise self.nobody_left(last)
