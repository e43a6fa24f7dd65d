"""The admin API the console reads (and scripts may too): budgets, tasks, live traffic.

Each route needs an admin key, like the rest of the admin API; none shows a secret.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.params import FromPath

from proxy.api.common import json_response
from proxy.api.dependencies import RuntimeDep
from proxy.api.forms import whole_number
from proxy.billing import period_start
from proxy.clip import clip
from proxy.errors import Kind, ProxyError, bad_request
from proxy.live import BUCKET, SPAN, LiveCounts
from proxy.openai.openapi import documented
from proxy.redact import redact
from proxy.shared import SharedDown
from proxy.store import UNFINISHED, TaskRecord
from proxy.tasks import Task

HOUR = 3600.0
FINAL_STATES = ("succeeded", "failed", "timeout")
WAITING_SHOWN = 1000  # unfinished tasks listed at most, the oldest first


class BudgetView(msgspec.Struct, kw_only=True):
    client: str
    budget: float | None  # None: no budget, spending is only counted
    period: str  # daily | monthly | total
    period_start: float  # unix time the current period began
    spent: float
    held: float  # reserved by requests under way (every replica's, with shared state)
    share: float | None  # spent / budget
    over_80: bool
    requests_last_hour: int  # billable upstream calls recorded in the last hour
    cost_last_hour: float


class BudgetList(msgspec.Struct, kw_only=True):
    object: str
    data: list[BudgetView]


class TaskSummary(msgspec.Struct, kw_only=True):
    id: str
    client: str
    model: str
    upstream: str
    key: str  # fingerprint of the key that created it
    state: str  # pending | running | succeeded | failed | timeout
    created: float
    updated: float
    age: float  # seconds since it was created
    progress: float | None
    reason: str | None  # why it failed or was given up
    polls: int | None  # polls so far; None when another process polls it
    last_problem: str | None  # the last failed poll's message
    late: bool  # its request timed out; the task goes on


class TaskDetail(TaskSummary, kw_only=True):
    request_id: str | None
    upstream_task_id: str | None
    urls: list[str]
    media_type: str | None
    deadline: float
    owner: str | None  # the process polling it


class TaskBoard(msgspec.Struct, kw_only=True):
    object: str
    counts: dict[str, int]
    waiting: list[TaskSummary]
    finished: list[TaskSummary]


class LiveBucket(msgspec.Struct, kw_only=True):
    at: int  # unix time the bucket begins
    requests: int
    errors: int  # answered 5xx (or not at all)
    refused: int  # answered 4xx


class LiveSeries(msgspec.Struct, kw_only=True):
    object: str
    bucket_seconds: int
    span_seconds: int
    scope: str  # "proxy": every replica's answers (Redis configured); "process": this process's own
    data: list[LiveBucket]


def _summary(record: TaskRecord, live: Task | None, now: float) -> dict[str, Any]:
    """A task's fields as TaskSummary documents them (a dict: the detail adds its own)."""
    return {
        "id": record.id, "client": record.client, "model": record.model, "upstream": record.upstream,
        "key": record.key, "state": record.state, "created": record.created, "updated": record.updated,
        "age": round(max(0.0, now - record.created), 3), "progress": record.progress,
        "reason": redact(record.reason) if record.reason else None,
        "polls": live.polls if live is not None else None,
        "last_problem": redact(live.last_problem) if live is not None and live.last_problem else None,
        "late": live.late if live is not None else False,
    }


def _limit(request: Request[Any, Any, Any]) -> int:
    limit = whole_number(request.query_params.get("limit") or "100")
    if limit is None or not 1 <= limit <= 1000:
        raise bad_request("'limit' must be a whole number from 1 to 1000.", param="limit")
    return limit


@get("/admin/budgets", **documented(BudgetList, errors=(401,)))
async def admin_budgets(runtime: RuntimeDep) -> Response[bytes]:
    now = time.time()
    last_hour = {row.group: row for row in await runtime.store.usage(
        client=None, model=None, since=now - HOUR, until=None, group_by="client")}
    billing = runtime.gateway.billing
    views = []
    for client in runtime.config.clients:
        start = period_start(client.budget_period, now)
        spent = await runtime.store.spent(client.name, start)
        share = spent / client.budget if client.budget else None
        hour = last_hour.get(client.name)
        views.append(BudgetView(
            client=client.name, budget=client.budget, period=client.budget_period, period_start=start,
            spent=round(spent, 6), held=round(await billing.held(client, now), 6),
            share=round(share, 6) if share is not None else None, over_80=share is not None and share > 0.8,
            requests_last_hour=hour.requests if hour else 0, cost_last_hour=round(hour.cost, 6) if hour else 0.0))
    return json_response({"object": "list", "data": views})


@get("/admin/tasks", **documented(TaskBoard, errors=(400, 401)))
async def admin_tasks(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Response[bytes]:
    limit = _limit(request)
    store, live = runtime.store, runtime.gateway.tasks.live
    now = time.time()
    waiting = await store.recent_tasks(WAITING_SHOWN, UNFINISHED)
    waiting.sort(key=lambda r: r.created)
    finished = await store.recent_tasks(limit, FINAL_STATES)
    counts = {state: 0 for state in (*UNFINISHED, *FINAL_STATES)} | await store.task_counts()
    return json_response(TaskBoard(
        object="proxy.task_board", counts=counts,
        waiting=[TaskSummary(**_summary(r, live.get(r.id), now)) for r in waiting],
        finished=[TaskSummary(**_summary(r, None, now)) for r in finished]))


@get("/admin/tasks/{task_id:str}", **documented(TaskDetail, errors=(401, 404)))
async def admin_task(runtime: RuntimeDep, task_id: FromPath[str]) -> Response[bytes]:
    live = runtime.gateway.tasks.live.get(task_id)
    record = live.record if live is not None else await runtime.store.get_task(task_id)
    if record is None:
        raise ProxyError(Kind.NOT_FOUND, f"No task '{clip(task_id)}'.", param="task_id")
    return json_response(TaskDetail(
        **_summary(record, live, time.time()), request_id=record.request_id,
        upstream_task_id=record.upstream_task_id, urls=record.urls, media_type=record.media_type,
        deadline=record.deadline, owner=record.owner))


@get("/admin/live", **documented(LiveSeries, errors=(401,)))
async def admin_live(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Response[bytes]:
    counts: LiveCounts = request.app.state.live
    series, scope = counts.series(), "process"
    if runtime.shared is not None:
        with contextlib.suppress(SharedDown):  # Redis away: this process's own counts
            series, scope = counts.with_unsent(await runtime.shared.live_totals()), "proxy"
    return json_response(LiveSeries(
        object="proxy.live", bucket_seconds=BUCKET, span_seconds=SPAN, scope=scope,
        data=[LiveBucket(at=at, requests=n, errors=errors, refused=refused) for at, n, errors, refused in series]))


CONSOLE_ADMIN_ROUTES = [admin_budgets, admin_tasks, admin_task, admin_live]
