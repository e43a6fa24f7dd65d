"""An app factory for ASGI servers that import by name (uvicorn --workers N)."""

from __future__ import annotations

import os

from litestar import Litestar

from proxy.app import create_app
from proxy.config import load_config


def app_from_env() -> Litestar:
    path = os.environ["PROXY_CONFIG"]
    return create_app(load_config(path), path, workers=int(os.environ.get("PROXY_WORKERS", "1")))
