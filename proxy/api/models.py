"""GET /v1/models and /v1/models/{id}: the merged catalogue of every upstream; with an own key
([auth] passthrough), its upstream's models, once that upstream accepts the key."""

from __future__ import annotations

import fnmatch

from litestar import Response, get
from litestar.params import FromPath

from proxy.api.common import json_response
from proxy.api.dependencies import CallerDep, RuntimeDep
from proxy.clients import check_model
from proxy.gateway import Caller
from proxy.openai.openapi import documented
from proxy.openai.types import Model, ModelList
from proxy.router import Listed
from proxy.runtime import Runtime


def _model(entry: Listed) -> Model:
    return Model(id=entry.id, object="model", created=entry.created, owned_by=entry.provider,
                 kind=entry.model.kind, price=entry.model.price, name=entry.model.name)


def _allowed(caller: Caller, entry: Listed) -> bool:
    if caller.own_key is not None:
        return entry.provider == caller.own_key.provider
    patterns = caller.client.models if caller.client is not None else None
    names = (entry.id, f"{entry.provider}/{entry.model.id}", entry.model.id)
    return patterns is None or any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


async def _check_own_key(caller: Caller, runtime: Runtime) -> None:
    # no upstream call here would refuse a made-up key: its upstream is asked first
    if caller.own_key is not None:
        await runtime.clients.check_own_key(caller, runtime.gateway.providers[caller.own_key.provider])


@get("/v1/models", **documented(ModelList, errors=(401, 429, 502)))
async def list_models(caller: CallerDep, runtime: RuntimeDep) -> Response[bytes]:
    gateway = runtime.gateway
    await _check_own_key(caller, runtime)
    listing = await gateway.catalogue.listing()
    return json_response(ModelList(object="list", data=[_model(e) for e in listing if _allowed(caller, e)]))


@get("/v1/models/{model_id:path}", **documented(Model, errors=(401, 403, 404, 429, 502)))
async def retrieve_model(model_id: FromPath[str], caller: CallerDep, runtime: RuntimeDep) -> Response[bytes]:
    gateway = runtime.gateway
    await _check_own_key(caller, runtime)
    model_id = model_id.lstrip("/")
    catalogue = gateway.catalogue
    route = await catalogue.resolve(model_id)
    check_model(caller, route)
    model = route.model
    return json_response(Model(id=model_id, object="model", created=catalogue.created(route),
                               owned_by=route.provider.name,
                               kind=model.kind if model else None, price=model.price if model else None,
                               name=model.name if model else None))
