"""What a running app holds: its config, the shared HTTP client, the store, the gateway, the clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy.clients import Clients
from proxy.config import Config, load_config
from proxy.gateway import Gateway
from proxy.redact import redact
from proxy.store import Store
from proxy.upstream_http import UpstreamClient

log = structlog.get_logger("proxy")


@dataclass(slots=True)
class Runtime:
    config: Config
    config_path: Path | None
    http: UpstreamClient
    store: Store
    gateway: Gateway
    clients: Clients

    def reload(self) -> Config:
        """Re-read the config file: clients, keys, limits, aliases. Requests in flight keep what
        they hold; a bad file raises ConfigError and the running config stays."""
        if self.config_path is None:
            raise ValueError("this proxy was not started from a config file")
        config = load_config(self.config_path)
        redact.add_config(config)
        clients = Clients(config)
        clients.adopt(self.clients)
        self.gateway.configure(config)
        self.clients, self.config = clients, config
        log.info("config_reloaded", clients=len(config.clients), providers=list(config.providers))
        return config
