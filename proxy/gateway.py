"""The relay: route a normalised call to an upstream through its key pool, wait out tasks.

Handlers call this and never a provider; nothing here knows an upstream's dialect or
OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from proxy.config import Config
from proxy.errors import Kind, ProxyError
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers import build_provider
from proxy.providers.base import ChatAnswer, ChatCall, ImageCall, ModelInfo, Provider
from proxy.router import Catalogue, Route
from proxy.tasks import Task, TaskWaiter, new_task_id


@dataclass(slots=True)
class ChatResult:
    answer: ChatAnswer
    key: UpstreamKey


class Gateway:
    def __init__(self, config: Config, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self.providers: dict[str, Provider] = {
            name: build_provider(name, table, http) for name, table in config.providers.items()}
        self.pools = {name: KeyPool(name, table.keys, recheck_after=table.recheck_after)
                      for name, table in config.providers.items()}
        self.catalogue = Catalogue(self.providers, {name: self._fetcher(name) for name in self.providers},
                                   config.aliases,
                                   {name: table.catalogue_ttl for name, table in config.providers.items()})
        self.tasks = TaskWaiter(config.tasks)

    def _fetcher(self, name: str) -> Callable[[], Awaitable[list[ModelInfo]]]:
        provider, pool = self.providers[name], self.pools[name]

        async def fetch() -> list[ModelInfo]:
            models, _ = await pool.run(provider.list_models)
            return models

        return fetch

    async def chat(self, route: Route, call: ChatCall) -> ChatResult:
        provider = route.provider
        try:
            answer, key = await self.pools[provider.name].run(lambda secret: provider.chat(secret, call))
        except ProxyError as error:
            self._note_missing_model(route, error)
            raise
        return ChatResult(answer, key)

    async def start_image(self, route: Route, call: ImageCall, client: str) -> Task:
        """Submit one generation; the returned task is being waited on in the background."""
        provider = route.provider
        try:
            state, key = await self.pools[provider.name].run(
                lambda secret: provider.submit_image(secret, call))
        except ProxyError as error:
            self._note_missing_model(route, error)
            raise
        task = Task(id=new_task_id(), client=client, provider=provider, key=key, model=route.public_id,
                    state=state)
        return self.tasks.start(task)

    def _note_missing_model(self, route: Route, error: ProxyError) -> None:
        if error.kind is Kind.MODEL_NOT_FOUND:
            error.param = "model"
            self.catalogue.forget(route.provider.name)  # the list we routed by is out of date

    async def download(self, url: str) -> str:
        """Fetch a result as base64: http(s) only, capped in size and time, no redirects."""
        limit = self.config.images.max_download_bytes
        if not url.startswith(("http://", "https://")):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "the result is not at an http(s) URL")
        try:
            async with asyncio.timeout(self.config.images.download_timeout):
                async with self.http.stream("GET", url) as reply:
                    if reply.status_code != 200:
                        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                                         f"downloading the result answered HTTP {reply.status_code}")
                    chunks, size = [], 0
                    async for chunk in reply.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                                             f"the result is larger than {limit} bytes; ask for url instead")
                        chunks.append(chunk)
        except (httpx.HTTPError, OSError, TimeoutError):
            raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, "downloading the result failed") from None
        return base64.b64encode(b"".join(chunks)).decode("ascii")

    async def close(self) -> None:
        await self.tasks.close()
