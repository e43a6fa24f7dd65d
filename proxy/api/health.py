"""GET /healthz: 200 while the process serves; no auth, no upstream call. `shared` says whether
the state replicas share (Redis) answers: "up", "down" (serving from this process's own state,
limits split), or "off" (not configured)."""

from __future__ import annotations

from typing import Any

from litestar import Request, get


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz(request: Request[Any, Any, Any]) -> dict[str, str]:
    runtime = request.app.state.get("runtime")
    shared = runtime.shared if runtime is not None else None
    return {"status": "ok", "shared": "off" if shared is None else "up" if shared.active else "down"}
