"""One module per upstream; this table is the only place that knows them all."""

from __future__ import annotations

from proxy.config import ProviderConfig
from proxy.providers.base import Observe, Provider
from proxy.providers.fengyuan import Fengyuan
from proxy.providers.xffuw import Xffuw
from proxy.upstream_http import UpstreamClient

DIALECTS: dict[str, type[Xffuw] | type[Fengyuan]] = {"xffuw": Xffuw, "fengyuan": Fengyuan}


def build_provider(name: str, config: ProviderConfig, http: UpstreamClient,
                   observe: Observe | None = None) -> Provider:
    return DIALECTS[config.type or name](name, config, http, observe)
