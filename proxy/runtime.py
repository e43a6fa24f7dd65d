"""What a running app holds: its config, the shared HTTP client, the gateway, the clients."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from proxy.clients import Clients
from proxy.config import Config
from proxy.gateway import Gateway


@dataclass(slots=True)
class Runtime:
    config: Config
    http: httpx.AsyncClient
    gateway: Gateway
    clients: Clients
