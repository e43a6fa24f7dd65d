"""Tasks no process polls: adopted and resumed with the key that started them.

At start, and every HOUSEKEEPING_EVERY seconds, a process claims the unfinished tasks of
processes that stopped (released at a graceful stop, silent for ORPHANED_AFTER seconds, or
known dead on this host) and polls them on. With shared state each process holds a lease in
Redis, renewed while it lives: once a process's lease lapses (`[shared] lease` seconds), the
next replica to look adopts its tasks; replicas look every half lease. A task started with a caller's own key, which
the proxy never keeps, is parked until its owner asks for it again with that key. Old
records are purged on the same beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time

import structlog

from proxy.gateway import Gateway
from proxy.pool import UpstreamKey
from proxy.providers.base import TaskState
from proxy.shared import SharedDown
from proxy.store import TaskRecord
from proxy.tasks import Task

log = structlog.get_logger("proxy.recovery")

HOUSEKEEPING_EVERY = 10.0  # seconds: heartbeat of owned tasks, adoption of orphaned ones, purge
ORPHANED_AFTER = 60.0  # seconds without a heartbeat before another process adopts a task


def owner_name() -> str:
    """host:pid:random: who polls a task, in the store; host and pid tell a crashed one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def dead_here(owner: str) -> bool:
    """An owner on this host whose process is gone: its tasks need not wait for the timeout."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Recovery:
    def __init__(self, gateway: Gateway, lease: float = 10.0) -> None:
        self.gateway = gateway  # its providers and pools follow config reloads
        self.store = gateway.store
        self.owner = gateway.owner
        self.shared = gateway.shared
        self.lease = lease
        self.parked: dict[str, TaskRecord] = {}  # own-key tasks resumed without their key
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Resume what a previous process left; then adopt and purge on every beat."""
        await self.gateway.tasks.durations.load()
        await self.gateway.restore_calls(HOUSEKEEPING_EVERY + 1.0)  # the upstream still counts the last process's calls
        self.gateway.save_calls()  # a checkpoint at once: dying before the first beat forgets nothing
        if self.shared is not None:
            with contextlib.suppress(SharedDown):
                await self.shared.lease(self.lease)
        await self.adopt(stale_before=time.time() - ORPHANED_AFTER)
        self._loops = [asyncio.create_task(self._housekeeping(), name="housekeeping")]
        if self.shared is not None:
            self._loops.append(asyncio.create_task(self._leases(), name="leases"))

    async def adopt(self, stale_before: float) -> None:
        owners = [o for o in await self.store.unfinished_owners() if o != self.owner]
        dead = [o for o in owners if dead_here(o)]
        if self.shared is not None and self.shared.active:
            try:
                alive = await self.shared.alive(owners)
            except SharedDown:
                alive = set(owners)
            dead += [o for o in owners if o not in alive and o not in dead]
        for record in await self.store.claim_unfinished(self.owner, stale_before, dead):
            await self.resume(record)

    async def _leases(self) -> None:
        """Renew this process's lease; adopt the tasks of processes whose lease lapsed."""
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.shared.lease(self.lease)
                await self.adopt(stale_before=time.time() - ORPHANED_AFTER)
            except SharedDown:
                pass  # the housekeeping beat adopts by the store's heartbeats meanwhile
            except Exception as exc:
                log.error("lease_failed", error=repr(exc))

    async def resume(self, record: TaskRecord) -> None:
        gateway = self.gateway
        provider = gateway.providers.get(record.upstream)
        pool = gateway.pools.get(record.upstream)
        key = pool.find(record.key) if pool else None
        if provider is not None and key is None and record.client.startswith("own-key:"):
            self.parked[record.id] = record
            log.info("task_parked", task_id=record.id, upstream=record.upstream)
            return
        if provider is None or pool is None or key is None:
            record.state, record.reason = "failed", "the upstream key that started it is no longer configured"
            await self.store.save_task(record)
            return
        log.info("task_resumed", task_id=record.id, upstream=record.upstream)
        state = TaskState(status="running", task_id=record.upstream_task_id)
        await gateway.tasks.start(Task(record=record, provider=provider, key=key, pool=pool, state=state))

    async def unpark(self, task_id: str, key: UpstreamKey | None) -> None:
        """Its owner asked again with the key that started it: poll a parked task from now on."""
        record = self.parked.get(task_id)
        provider = self.gateway.providers.get(record.upstream) if record is not None else None
        if record is None or provider is None or key is None or key.fingerprint != record.key:
            return
        del self.parked[task_id]
        state = TaskState(status="running", task_id=record.upstream_task_id)
        await self.gateway.tasks.start(Task(record=record, provider=provider, key=key, pool=None, state=state))

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY)
            try:
                await self.store.heartbeat(self.owner)
                self.gateway.save_calls()  # a crash loses at most this beat's calls
                await self.adopt(stale_before=time.time() - ORPHANED_AFTER)
                config, now = self.gateway.config, time.time()
                await self.store.purge(now - config.tasks.keep_results * 3600,
                                       now - config.storage.idempotency_hours * 3600)
            except Exception as exc:
                log.error("housekeeping_failed", error=repr(exc))

    async def close(self) -> None:
        """Stop the beat; this process's unfinished tasks become free for the next one at once."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.store.release(self.owner)
