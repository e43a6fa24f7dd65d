"""What the handlers are given, through Litestar's dependency injection: the caller (who asks,
within their rate; 401 or 429 otherwise) and the parts of the running proxy they use. A /v1
handler takes the caller and the runtime, one dependency at each depth."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from proxy.api.common import authenticate
from proxy.config import Config
from proxy.gateway import Caller, Gateway
from proxy.recovery import Recovery
from proxy.runtime import Runtime


async def provide_caller(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Caller:
    # Resolved after the runtime, not beside it: Litestar resolves two dependencies of one
    # depth in a task group, a task each, on every request (bench/README.md, "Run to run").
    return await authenticate(request)


def provide_runtime(state: State) -> Runtime:
    return state.runtime  # type: ignore[no-any-return]


def provide_gateway(state: State) -> Gateway:
    return provide_runtime(state).gateway


def provide_config(state: State) -> Config:
    return provide_runtime(state).config


def provide_recovery(state: State) -> Recovery:
    return provide_runtime(state).recovery


# Handlers annotate their parameters with these: the parameter's name picks the provider below.
CallerDep = NamedDependency[Caller]
GatewayDep = NamedDependency[Gateway]
RecoveryDep = NamedDependency[Recovery]
ConfigDep = NamedDependency[Config]
RuntimeDep = NamedDependency[Runtime]

DEPENDENCIES = {
    "caller": Provide(provide_caller),
    "runtime": Provide(provide_runtime, sync_to_thread=False),
    "gateway": Provide(provide_gateway, sync_to_thread=False),
    "config": Provide(provide_config, sync_to_thread=False),
    "recovery": Provide(provide_recovery, sync_to_thread=False),
}
