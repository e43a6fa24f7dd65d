"""GET /healthz: 200 while the process serves; no auth, no upstream call."""

from __future__ import annotations

from litestar import get


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}
