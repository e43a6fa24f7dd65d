"""GET /v1/tasks/{id}: a documented extension; the state, progress and result of one of the
caller's own upstream tasks (ids are in x-proxy-task-ids and in timeout/failure messages)."""

from __future__ import annotations

import msgspec
from litestar import Response, get
from litestar.params import FromPath

from proxy.api.common import json_response
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clip import clip
from proxy.errors import Kind, ProxyError
from proxy.openai.errors import error_payload
from proxy.openai.openapi import documented
from proxy.openai.types import ErrorBody
from proxy.store import TaskRecord
from proxy.tasks import Task, error_of


class TaskView(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: str
    status: str  # pending | running | succeeded | failed | timeout
    model: str
    upstream: str
    created: int
    updated: int
    progress: float | None = None
    data: list[dict[str, str]] = []  # like an images response: [{"url": …}]
    media_type: str | None = None
    error: ErrorBody | None = None


@get("/v1/tasks/{task_id:str}", **documented(TaskView, errors=(401, 404)))
async def retrieve_task(task_id: FromPath[str], caller: CallerDep,
                        runtime: RuntimeDep) -> Response[bytes]:
    gateway = runtime.gateway
    recovery = runtime.recovery
    await recovery.unpark(task_id, caller.own_key)
    found = await gateway.tasks.find(task_id)
    record = found.record if isinstance(found, Task) else found
    if not isinstance(record, TaskRecord) or record.client != caller.name:
        raise ProxyError(Kind.NOT_FOUND, f"No task '{clip(task_id)}' for this client.", param="task_id")
    error = error_of(record)
    return json_response(TaskView(
        id=record.id, object="proxy.task", status=record.state, model=record.model, upstream=record.upstream,
        created=int(record.created), updated=int(record.updated), progress=record.progress,
        data=[{"url": url} for url in record.urls], media_type=record.media_type,
        error=error_payload(error).error if error else None))
