"""Each key's credits and VIP level, read from upstreams that tell (Fengyuan's user info) at
start and every balance_interval; an exhausted key is read every recheck_after and comes
back as soon as its credits can pay for the cheapest model again."""

from __future__ import annotations

import asyncio
import time

import structlog

from proxy.errors import ProxyError
from proxy.gateway import Gateway
from proxy.pool import KeyPool, UpstreamKey

log = structlog.get_logger("proxy.balances")


class Balances:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway  # its providers, pools and catalogue follow config reloads
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="balances")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            gateway = self.gateway
            for name, pool in list(gateway.pools.items()):
                if not gateway.providers[name].has_balance:
                    continue
                for key in list(pool.keys):
                    if due(pool, key, time.time()):
                        await self.read(name, pool, key)
            await asyncio.sleep(self._tick())

    def _tick(self) -> float:
        periods = [min(t.balance_interval, t.recheck_after) for t in self.gateway.config.providers.values()] or [30.]
        return min(30.0, max(0.1, min(periods) / 4))

    async def read(self, name: str, pool: KeyPool, key: UpstreamKey) -> None:
        try:
            await pool.slot(key, time.monotonic() + 5.0)
        except ProxyError:
            return  # the key is busy up to its limit: read it next round, it refused nothing
        try:
            info = await self.gateway.providers[name].balance(key.secret)
        except ProxyError as error:
            pool.balance_unread(key, error)
            log.warning("balance_read_failed", upstream=name, key=key.fingerprint, error=error.message)
            return
        finally:
            pool.landed(key)
        if pool.balance_read(key, info, await self._cheapest(name)):
            log.info("key_recovered", upstream=name, key=key.fingerprint, credits=key.credits)

    async def _cheapest(self, name: str) -> float:
        models = [m for m in await self.gateway.catalogue.models_of(name) if m.price]
        return min((m.price or 0.0 for m in models), default=0.0) or 1e-9


def due(pool: KeyPool, key: UpstreamKey, now: float) -> bool:
    """Whether the key's balance should be read now."""
    if key.state == "disabled":
        return False
    if key.checked_at is None:
        return True
    age = now - key.checked_at
    return age >= (pool.config.recheck_after if key.state == "exhausted" else pool.config.balance_interval)
