"""Who may call the proxy, and within which limits: client keys (compared in constant time),
requests per minute, allowed models; and, with [auth] passthrough, people's own upstream keys."""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import hmac
import time
from collections import deque

import cachetools

from proxy.clip import clip
from proxy.config import ClientConfig, Config
from proxy.errors import Kind, ProxyError
from proxy.gateway import Caller
from proxy.pool import Admission, UpstreamKey, fingerprint, part, passthrough_key
from proxy.providers.engine import Provider
from proxy.router import Route
from proxy.shared import Shared, SharedDown, Window

NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
          "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
BAD_KEY = "Incorrect API key provided. Ask the proxy's administrator for a valid key."
WINDOW = 60.0
# [auth] passthrough: a source address whose own keys the upstream refused this often within
# PASSTHROUGH_WINDOW seconds gets no more passthrough calls until the window moves on.
PASSTHROUGH_FAILURES = 10
PASSTHROUGH_WINDOW = 600.0
# GET /v1/models with an own key: the key is checked with its upstream first, the verdict kept
# OWN_KEY_TTL seconds; one address gets at most OWN_KEY_CHECKS such upstream calls a minute.
OWN_KEY_TTL = 60.0
OWN_KEY_CHECKS = 10
OWN_KEYS_KEPT = 4096
# an own key its upstream accepted (a call or a check) escapes its address's refusal and check
# limits for ACCEPTED_TTL seconds after its latest acceptance: others' made-up keys cannot lock it out
ACCEPTED_TTL = 86_400.0
ADDRESSES = 10_000  # source addresses remembered; beyond, the least recently seen are forgotten


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def digest_of(client: ClientConfig) -> bytes:
    if client.key_sha256:
        return bytes.fromhex(client.key_sha256)
    return key_digest(client.key or "")


def key_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def match_digest(token: str, digests: list[bytes]) -> int | None:
    """Index of the digest the token hashes to; every entry is compared, so the time does not
    depend on which one matches."""
    digest = key_digest(token)
    found = None
    for i, known in enumerate(digests):
        if hmac.compare_digest(known, digest):
            found = i
    return found


class PerAddress:
    """Events per source address within a sliding window, for a bounded number of addresses."""

    def __init__(self, limit: int, span: float) -> None:
        self.limit, self.span = limit, span
        # an address is dropped `span` seconds after its latest event: all its events are past then
        self._times: cachetools.TTLCache[str, deque[float]] = cachetools.TTLCache(ADDRESSES, span)

    def wait(self, source: str | None) -> float | None:
        """Seconds until the address is below its limit again; None: it is now."""
        times = self._times.get(source or "")
        if not times:
            return None
        now = time.monotonic()
        while times and times[0] <= now - self.span:
            times.popleft()
        return times[0] + self.span - now if len(times) >= self.limit else None

    def add(self, source: str | None) -> None:
        times = self._times.get(source or "") or deque(maxlen=self.limit)
        times.append(time.monotonic())
        self._times[source or ""] = times  # set again: its time to live starts over


class Clients:
    def __init__(self, config: Config, share: int = 1, shared: Shared | None = None) -> None:
        self.clients = list(config.clients)
        self.share = share  # processes that each keep their part of every client's rpm
        self.shared = shared  # with shared state, every client's rpm is counted in Redis
        self._digests = [digest_of(c) for c in self.clients]
        # longest prefix first, so "sk-fy-" wins over "sk-"
        self._prefixes = sorted(((p.passthrough_prefix or "", name) for name, p in config.providers.items()
                                 if p.passthrough_prefix), key=lambda item: -len(item[0])) \
            if config.auth.passthrough else []
        self._calls: dict[str, deque[float]] = {}
        self._refused = PerAddress(PASSTHROUGH_FAILURES, PASSTHROUGH_WINDOW)  # own keys the upstream refused
        self._checks = PerAddress(OWN_KEY_CHECKS, WINDOW)  # own keys checked with their upstream
        # sha256 of an own key -> its check, pending or done: one upstream call per key and TTL
        self._verdicts: cachetools.TTLCache[bytes, asyncio.Task[bool]] = cachetools.TTLCache(
            OWN_KEYS_KEPT, OWN_KEY_TTL)
        # sha256 of own keys their upstream accepted; only real keys get here, so no stranger can flush it
        self._accepted: cachetools.TTLCache[bytes, bool] = cachetools.TTLCache(OWN_KEYS_KEPT, ACCEPTED_TTL)

    def _find(self, token: str) -> ClientConfig | str | None:
        """The client a token belongs to, or the provider whose passthrough prefix it has."""
        index = match_digest(token, self._digests)
        if index is not None:
            return self.clients[index]
        return next((provider for prefix, provider in self._prefixes if token.startswith(prefix)), None)

    def authenticate(self, authorization: str | None, request_id: str | None = None,
                     source: str | None = None) -> Caller:
        token = bearer_token(authorization)
        if token is None:
            raise ProxyError(Kind.INVALID_API_KEY, NO_KEY)
        found = self._find(token)
        if isinstance(found, ClientConfig):
            return Caller(name=found.name, client=found, request_id=request_id)
        if found is not None:
            self._admit_passthrough(source, token)
            return Caller(name=f"own-key:{fingerprint(token)}", client=None, request_id=request_id,
                          own_key=passthrough_key(found, token), source=source)
        raise ProxyError(Kind.INVALID_API_KEY, BAD_KEY)

    def own_key(self, authorization: str | None) -> UpstreamKey | None:
        """The upstream key a passthrough caller brought, if that is what the header carries."""
        token = bearer_token(authorization)
        found = self._find(token) if token is not None else None
        return passthrough_key(found, token) if isinstance(found, str) and token is not None else None

    def _admit_passthrough(self, source: str | None, token: str) -> None:
        """Someone probing keys through the proxy: their refusals are counted per address."""
        if key_digest(token) in self._accepted:
            return
        wait = self._refused.wait(source)
        if wait is not None:
            raise ProxyError(Kind.RATE_LIMITED, "Too many refused upstream keys from this address; retry later.",
                             retry_after=wait)

    def own_key_verdict(self, caller: Caller, accepted: bool) -> None:
        """What the upstream made of a caller's own key: a refusal counts against its address."""
        assert caller.own_key is not None
        digest = key_digest(caller.own_key.secret)
        if accepted:
            self._accepted[digest] = True  # set again: its time to live starts over
        else:
            self._accepted.pop(digest, None)  # revoked since
            self._refused.add(caller.source)

    async def check_own_key(self, caller: Caller, provider: Provider) -> None:
        """For answers that call no upstream with the key (the model list): 401 unless its
        upstream accepts it, asked once per key and OWN_KEY_TTL, a few new keys per address a minute."""
        assert caller.own_key is not None
        digest = key_digest(caller.own_key.secret)
        check = self._verdicts.get(digest)
        if check is None:
            if digest not in self._accepted:  # a key its upstream accepted is not a new one
                wait = self._checks.wait(caller.source)
                if wait is not None:
                    raise ProxyError(Kind.RATE_LIMITED, "Too many new upstream keys from this address; "
                                     "retry later.", retry_after=wait)
                self._checks.add(caller.source)
            check = self._verdicts[digest] = asyncio.create_task(accepted(provider, caller.own_key.secret))
            check.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, even if no one waits
        try:
            valid = await asyncio.shield(check)  # a caller gone does not cancel it for the others
        except BaseException:
            if check.done() and self._verdicts.get(digest) is check:
                del self._verdicts[digest]  # no verdict (upstream down, rate limited): asked again next time
            raise
        if not valid:
            self.own_key_verdict(caller, False)
            raise ProxyError(Kind.INVALID_API_KEY, f"{provider.name} refused the key you sent.")
        if can_ask(provider):  # a key waved through unasked earns no exemption
            self.own_key_verdict(caller, True)

    def identify(self, authorization: str | None) -> str | None:
        """The caller's name, without counting a request: for keying idempotency records."""
        token = bearer_token(authorization)
        found = self._find(token) if token is not None else None
        if isinstance(found, ClientConfig):
            return found.name
        return f"own-key:{fingerprint(token)}" if found is not None and token is not None else None

    async def admit(self, caller: Caller, defer: bool = False) -> None:
        """Requests per minute, per client, over a sliding minute: across every replica when
        shared, else this process's part. `defer`: with shared state, counted with the
        request's first upstream call (`caller.admission`), one round trip for both."""
        client = caller.client
        if client is None or client.rpm is None:
            return
        if defer and self.shared is not None and self.shared.active:
            caller.admission = Admission(rpm_window(client), functools.partial(self.over, client),
                                         functools.partial(self.count, client))
            return
        await self.count(client)

    async def count(self, client: ClientConfig) -> None:
        """Count one request of the client: 429 if its window is full."""
        if self.shared is not None and self.shared.active:
            try:
                member, _, wait = await self.shared.take(rpm_window(client))
            except SharedDown:
                pass  # counted here from now on, split across the replicas last seen
            else:
                if member is None:
                    raise self.over(client, wait)
                return
        self._admit(client)

    def over(self, client: ClientConfig, wait: float) -> ProxyError:
        return ProxyError(Kind.RATE_LIMITED, f"Rate limit reached for client '{client.name}': "
                          f"{client.rpm} requests per minute.", retry_after=wait)

    def _admit(self, client: ClientConfig) -> None:
        rpm = part(client.rpm, self.share)
        if rpm is None:
            return
        now = time.monotonic()
        calls = self._calls.setdefault(client.name, deque())
        while calls and calls[0] <= now - WINDOW:
            calls.popleft()
        if len(calls) >= rpm:
            raise self.over(client, calls[0] + WINDOW - now)
        calls.append(now)

    def adopt(self, old: Clients) -> None:
        """After a reload: clients that stay keep their rate-limit windows."""
        self._refused, self._accepted = old._refused, old._accepted
        for name, calls in old._calls.items():
            if any(c.name == name for c in self.clients):
                self._calls[name] = calls


async def accepted(provider: Provider, secret: str) -> bool:
    """Whether the upstream accepts the key, by its cheapest call that needs one: the balance,
    else the model list. An upstream with neither cannot be asked without paying: accepted."""
    try:
        if provider.has_balance:
            await provider.balance(secret)
        elif can_ask(provider):
            await provider.list_models(secret)
    except ProxyError as error:
        if error.kind is Kind.AUTH:
            return False
        raise
    return True


def can_ask(provider: Provider) -> bool:
    """Whether the upstream has a call that tells, free of charge, if it accepts a key."""
    return provider.has_balance or provider.dialect.models_need_key


def rpm_window(client: ClientConfig) -> Window:
    return Window(f"client:{client.name}", client.rpm, WINDOW)


def check_model(caller: Caller, route: Route) -> None:
    if caller.own_key is not None and caller.own_key.provider != route.provider.name:
        raise ProxyError(Kind.BAD_REQUEST, f"The key you sent is a {caller.own_key.provider} key, but the model "
                         f"'{clip(route.public_id)}' is served by {route.provider.name}.", param="model")
    patterns = caller.client.models if caller.client is not None else None
    if patterns is None:
        return
    names = {route.public_id, f"{route.provider.name}/{route.upstream_model}", route.upstream_model}
    if not any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns):
        raise ProxyError(Kind.MODEL_NOT_ALLOWED, f"The client '{caller.name}' may not use the model "
                         f"'{clip(route.public_id)}'.", param="model")
