"""What a running app holds: its config, the shared HTTP client, the store, the gateway, the clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy.clients import Clients
from proxy.config import Config, load_config
from proxy.gateway import Gateway
from proxy.recovery import Recovery
from proxy.redact import redact
from proxy.shared import Shared
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
    recovery: Recovery
    clients: Clients
    share: int = 1  # processes serving together, each keeping its part of every limit
    shared: Shared | None = None  # state every replica shares (Redis), when configured
    workers: int = 1  # processes of this server (uvicorn --workers)

    def reload(self, tell_replicas: bool = True) -> Config:
        """Re-read the config file: clients, keys, limits, aliases. Requests in flight keep what
        they hold; a bad file raises ConfigError and the running config stays. With shared
        state, every replica re-reads its own within a second (`tell_replicas`)."""
        if self.config_path is None:
            raise ValueError("this proxy was not started from a config file")
        config = load_config(self.config_path)
        redact.add_config(config)
        clients = Clients(config, self.share, self.shared)
        clients.adopt(self.clients)
        self.gateway.configure(config)
        self.clients, self.config = clients, config
        log.info("config_reloaded", clients=len(config.clients), providers=list(config.providers))
        if tell_replicas and self.shared is not None:
            self.shared.soon(self.shared.reloaded())
        return config

    def shared_changed(self, up: bool) -> None:
        """Redis answers again (every limit is counted there) or stopped: each process keeps
        its part of every limit, split across the processes last seen."""
        assert self.shared is not None
        self.set_share(1 if up else max(self.workers, self.shared.replicas))

    def set_share(self, share: int) -> None:
        self.share = share
        self.clients.share = share
        self.gateway.set_share(share)
