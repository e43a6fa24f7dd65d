"""State that outlives a request: usage, tasks, idempotency records, learned task durations.

One small interface, two implementations: SQLite (the default: one file per deployment,
shared by the worker processes of one machine) and PostgreSQL (`[storage] url`: shared by
replicas on several machines). `open_store` picks one; nothing above it knows which runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

if TYPE_CHECKING:
    from proxy.config import StorageConfig

TaskPhase = Literal["pending", "running", "succeeded", "failed", "timeout"]
UNFINISHED: tuple[TaskPhase, ...] = ("pending", "running")


class UsageRecord(msgspec.Struct, kw_only=True):
    at: float  # unix time
    client: str
    model: str
    upstream: str
    key: str  # the upstream key's fingerprint
    cost: float
    outcome: str  # ok | failed | submitted
    kind: str  # chat | image
    task_id: str | None = None
    request_id: str | None = None


class TaskRecord(msgspec.Struct, kw_only=True):
    id: str
    client: str
    request_id: str | None
    idempotency_key: str | None
    upstream: str
    key: str  # fingerprint of the key that created it: polls use the same key
    upstream_task_id: str | None
    model: str
    state: TaskPhase
    urls: list[str] = []
    media_type: str | None = None
    progress: float | None = None
    reason: str | None = None
    created: float = 0.0
    updated: float = 0.0
    deadline: float = 0.0  # unix time the proxy stops waiting
    owner: str | None = None  # the process polling it


class IdempotencyRecord(msgspec.Struct, kw_only=True):
    client: str
    key: str
    fingerprint: str  # hash of method, path and body: the same key with another body is a conflict
    created: float
    done: bool = False
    status: int = 0
    content_type: str = "application/json"
    headers: dict[str, str] = {}
    body: bytes = b""
    task_ids: list[str] = []
    response_format: str = "url"  # how to answer again from the tasks alone
    expected: int = 0  # how many tasks the request starts: a repeat waits until all are known
    submitted: bool = False  # the request is done submitting (some may have failed)
    finished: float = 0.0  # unix time the answer was kept


class UsageRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    group: str
    requests: int
    cost: float
    failed: int
    split: str | None = None  # with split_by: the second dimension (e.g. per day *and* client)


class Store(Protocol):
    def add_usage(self, record: UsageRecord) -> None: ...  # queued, not awaited

    def settle_usage(self, task_id: str, outcome: str, cost: float | None) -> None: ...  # queued too

    async def spent(self, client: str, since: float) -> float: ...

    async def usage(self, *, client: str | None, model: str | None, since: float | None, until: float | None,
                    group_by: str, split_by: str | None = None) -> list[UsageRow]: ...

    async def save_task(self, record: TaskRecord) -> None: ...  # committed when it returns

    def finish_task(self, record: TaskRecord) -> None: ...  # a final state: queued like usage, not awaited

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def task_counts(self) -> dict[str, int]: ...  # tasks per state

    async def recent_tasks(self, limit: int = 100,
                           states: tuple[str, ...] | None = None) -> list[TaskRecord]: ...  # newest `updated` first

    async def unfinished_owners(self) -> list[str]: ...

    async def claim_unfinished(self, owner: str, stale_before: float,
                               dead: list[str] | None = None) -> list[TaskRecord]: ...

    async def heartbeat(self, owner: str) -> None: ...

    async def release(self, owner: str) -> None: ...

    async def purge(self, tasks_before: float, idempotency_before: float) -> None: ...

    async def idempotency_begin(self, record: IdempotencyRecord) -> IdempotencyRecord | None: ...

    async def idempotency_get(self, client: str, key: str) -> IdempotencyRecord | None: ...

    async def idempotency_finish(self, record: IdempotencyRecord) -> None: ...

    async def idempotency_drop(self, client: str, key: str) -> None: ...

    async def load_durations(self) -> dict[tuple[str, str], list[float]]: ...  # by (upstream, model)

    def save_durations(self, upstream: str, model: str, durations: list[float]) -> None: ...  # queued, replaces

    # each upstream key's recent calls, flattened (wall time, count, ...): a restart keeps counting
    async def load_calls(self) -> dict[tuple[str, str], list[float]]: ...  # by (upstream, key fingerprint)

    def save_calls(self, upstream: str, key: str, calls: list[float]) -> None: ...  # queued, replaces

    async def close(self) -> None: ...  # writes everything queued first


async def open_store(config: StorageConfig) -> Store:
    """The store the config names: PostgreSQL when `url` is set, else the SQLite file at `path`.
    Either is created or upgraded to the current schema before this returns."""
    if config.url:
        from proxy.store.postgres import PostgresStore

        return await PostgresStore.open(config.url, keep_usage_days=config.keep_usage_days)
    from proxy.store.sqlite import SQLiteStore

    return SQLiteStore(config.path, keep_usage_days=config.keep_usage_days)
