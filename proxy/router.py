"""Model ids -> (provider, upstream model): the merged, cached catalogue of every upstream.

Ids are the upstream's own (xffuw slug, Fengyuan service_code). An id that two upstreams
share is listed as `<provider>/<id>` only; `<provider>/<id>` is always accepted; aliases
from the config are listed and routed. Each upstream's list is cached for its TTL and
served stale while that upstream is down.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import cachetools
import structlog

from proxy.clip import clip
from proxy.errors import Kind, ProxyError
from proxy.providers.base import ModelInfo
from proxy.providers.engine import Provider

log = structlog.get_logger("proxy.router")

RETRY_DOWN_AFTER = 5.0  # seconds before asking an upstream that just failed for its list again


@dataclass(frozen=True, slots=True)
class Route:
    public_id: str  # the id the client used
    provider: Provider
    model: ModelInfo | None  # None when the upstream's list is unknown (down, never loaded)

    @property
    def upstream_model(self) -> str:
        return self.model.id if self.model else self.public_id.split("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Listed:
    id: str
    provider: str
    model: ModelInfo
    created: int


Fetch = Callable[[], Awaitable[list[ModelInfo]]]


class _ProviderCatalogue:
    def __init__(self, provider: Provider, fetch: Fetch, ttl: float) -> None:
        self.provider = provider
        self.fetch = fetch
        self.fresh: cachetools.TTLCache[str, list[ModelInfo]] = cachetools.TTLCache(maxsize=1, ttl=ttl)
        self.stale: list[ModelInfo] | None = None
        self.failed_at = -RETRY_DOWN_AFTER
        self.last_error: ProxyError | None = None  # why the list is unknown, while it is
        self.first_seen: dict[str, int] = {}
        self.lock = asyncio.Lock()

    async def models(self) -> list[ModelInfo] | None:
        cached = self.fresh.get("models")
        if cached is not None:
            return cached
        if time.monotonic() - self.failed_at < RETRY_DOWN_AFTER:
            return self.stale
        async with self.lock:  # one refresh at a time; the others wait for it
            cached = self.fresh.get("models")
            if cached is not None:
                return cached
            try:
                models = await self.fetch()
            except ProxyError as error:
                self.failed_at = time.monotonic()
                self.last_error = error
                log.warning("catalogue_unavailable", upstream=self.provider.name, error=error.message,
                            serving_stale=self.stale is not None)
                return self.stale
            now = int(time.time())
            for model in models:
                self.first_seen.setdefault(model.id, now)
            self.fresh["models"] = self.stale = models
            self.last_error = None
            return models


class Catalogue:
    def __init__(self, providers: dict[str, Provider], fetchers: dict[str, Fetch], aliases: dict[str, str],
                 ttls: dict[str, float]) -> None:
        self.providers = providers
        self.aliases = aliases
        self._parts = {name: _ProviderCatalogue(p, fetchers[name], ttls[name]) for name, p in providers.items()}

    async def _all(self) -> dict[str, list[ModelInfo] | None]:
        cached = {name: part.fresh.get("models") for name, part in self._parts.items()}
        if None not in cached.values():
            return cached  # the common case: no task per upstream, nothing to wait for
        names = list(self._parts)
        results = await asyncio.gather(*(self._parts[n].models() for n in names))
        return dict(zip(names, results, strict=True))

    async def listing(self) -> list[Listed]:
        lists = await self._all()
        counts = Counter(m.id for models in lists.values() for m in models or [])
        listed: list[Listed] = []
        for name, models in lists.items():
            seen = self._parts[name].first_seen
            for model in models or []:
                public = model.id if counts[model.id] == 1 else f"{name}/{model.id}"
                if public not in self.aliases:  # an alias of the same name routes elsewhere: list it once
                    listed.append(Listed(public, name, model, seen.get(model.id, 0)))
        for alias in self.aliases:
            try:
                route = await self.resolve(alias)
            except ProxyError:
                continue  # an alias whose target is unknown right now is not listed
            if route.model is not None:
                listed.append(Listed(alias, route.provider.name, route.model, self.created(route)))
        return listed

    async def resolve(self, model_id: str) -> Route:
        target = self.aliases.get(model_id, model_id)
        prefix, _, rest = target.partition("/")
        if rest and prefix in self._parts:
            models = await self._parts[prefix].models()
            if models is None:  # list unknown: route on trust, the upstream will judge
                return Route(model_id, self.providers[prefix], None)
            for model in models:
                if model.id == rest:
                    return Route(model_id, self.providers[prefix], model)
        else:
            lists = await self._all()
            for name, models in lists.items():  # config order decides a shared plain id
                for model in models or []:
                    if model.id == target:
                        return Route(model_id, self.providers[name], model)
            # Not listed anywhere known. If an upstream's list is unknown, the model may well be
            # there: its error says more than "does not exist".
            for name, models in lists.items():
                error = self._parts[name].last_error
                if models is None and error is not None:
                    raise ProxyError(error.kind, error.message, retry_after=error.retry_after)
        raise ProxyError(Kind.MODEL_NOT_FOUND, f"The model '{clip(model_id)}' does not exist or you do not have "
                         "access to it.", param="model")

    def created(self, route: Route) -> int:
        """When the proxy first saw the model listed (upstreams give no creation time)."""
        return self._parts[route.provider.name].first_seen.get(route.model.id, 0) if route.model else 0

    async def models_of(self, provider: str) -> list[ModelInfo]:
        return await self._parts[provider].models() or []

    def forget(self, provider: str) -> None:
        """Drop a provider's cached list, e.g. after it said a listed model does not exist."""
        self._parts[provider].fresh.clear()
