"""The admin API: upstream keys, usage, reload, metrics. Needs an [admin] key; none shows a secret."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import time
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath

from proxy.api.common import json_response
from proxy.api.dependencies import GatewayDep, RuntimeDep, provide_runtime
from proxy.billing import period_start
from proxy.clients import bearer_token, match_digest
from proxy.clip import clip
from proxy.config import ConfigError
from proxy.errors import Kind, ProxyError, bad_request
from proxy.gateway import Gateway
from proxy.openai.openapi import documented
from proxy.redact import redact
from proxy.store import UsageRow

NO_ADMIN = "The admin API needs an admin key: set [admin] keys (or keys_sha256) in the config."


class KeyView(msgspec.Struct, kw_only=True):
    provider: str
    fingerprint: str
    state: str
    reason: str | None
    until: float | None  # unix time the current state ends (cooling, exhausted)
    in_flight: int
    requests: int
    failures: int
    calls_in_window: int
    rate_limit: int | None
    weight: int
    credits: float | None
    vip_level: int | None
    checked_at: float | None


class KeyList(msgspec.Struct, kw_only=True):
    object: str
    data: list[KeyView]


class KeyStateChange(msgspec.Struct, kw_only=True):
    fingerprint: str
    provider: str
    state: str


class Reloaded(msgspec.Struct, kw_only=True):
    status: str
    clients: int
    providers: list[str]


class UsageTotal(msgspec.Struct, kw_only=True):
    requests: int
    cost: float
    failed: int


class UsageReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    object: str
    group_by: str
    data: list[UsageRow]
    total: UsageTotal
    split_by: str | None = None  # each row's `split` is this dimension


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The guard of every admin route: the bearer token must be an admin key (401 otherwise)."""
    admin = provide_runtime(connection.app.state).config.admin
    digests = [hashlib.sha256(k.encode()).digest() for k in admin.keys] + \
              [bytes.fromhex(d) for d in admin.keys_sha256]
    token = bearer_token(connection.headers.get("authorization"))
    if not digests or token is None or match_digest(token, digests) is None:
        raise ProxyError(Kind.INVALID_API_KEY, NO_ADMIN if not digests else "Incorrect admin key provided.")


@get("/admin/keys", **documented(KeyList, errors=(401,)))
async def admin_keys(gateway: GatewayDep) -> Response[bytes]:
    now, wall = time.monotonic(), time.time()
    views = []
    for name, pool in gateway.pools.items():
        for key in pool.keys:
            views.append(KeyView(
                provider=name, fingerprint=key.fingerprint, state=key.state,
                reason=redact(key.reason) if key.reason else None,
                until=wall + (key.until - now) if key.until > now else None, in_flight=key.in_flight,
                requests=key.requests, failures=key.failures, calls_in_window=pool.calls_in_window(key),
                rate_limit=pool.limit(key), weight=key.weight, credits=key.credits, vip_level=key.vip_level,
                checked_at=key.checked_at))
    return json_response({"object": "list", "data": views})


def _set_key(gateway: Gateway, fingerprint: str, enable: bool) -> Response[bytes]:
    found = gateway.find_key(fingerprint)
    if found is None:
        raise ProxyError(Kind.NOT_FOUND, f"No upstream key with fingerprint '{clip(fingerprint)}'.",
                         param="fingerprint")
    pool, key = found
    pool.set_state(key, "active" if enable else "disabled", None if enable else "disabled by an admin")
    return json_response({"fingerprint": key.fingerprint, "provider": pool.provider, "state": key.state})


@post("/admin/keys/{fingerprint:str}/disable", status_code=200, **documented(KeyStateChange, errors=(401, 404)))
async def admin_disable_key(gateway: GatewayDep, fingerprint: FromPath[str]) -> Response[bytes]:
    return _set_key(gateway, fingerprint, enable=False)


@post("/admin/keys/{fingerprint:str}/enable", status_code=200, **documented(KeyStateChange, errors=(401, 404)))
async def admin_enable_key(gateway: GatewayDep, fingerprint: FromPath[str]) -> Response[bytes]:
    return _set_key(gateway, fingerprint, enable=True)


@post("/admin/reload", status_code=200, **documented(Reloaded, errors=(401,)))
async def admin_reload(runtime: RuntimeDep) -> Response[bytes]:
    try:
        config = runtime.reload()
    except (ConfigError, ValueError) as error:
        raise bad_request(f"The new config was refused; the running one stays: {error}") from None
    return json_response({"status": "reloaded", "clients": len(config.clients),
                          "providers": sorted(config.providers)})


# Plain ASCII decimals: float() would also take "inf", "nan", "1_0" and non-ASCII digits.
_SECONDS = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
# The span ISO dates reach (years 1 to 9999): past it the store's day numbers overflow.
_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC).timestamp()
_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC).timestamp()


def _time(value: str | None, name: str) -> float | None:
    """Unix seconds or an ISO date/time (UTC when no zone is given)."""
    if not value:
        return None
    wrong = bad_request(f"'{name}' must be unix seconds or an ISO date such as 2026-11-01, within the years "
                        "1 to 9999.", param=name)
    if _SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise wrong from None
        seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    if not _EARLIEST <= seconds <= _LATEST:  # also 1e400, read as inf
        raise wrong
    return seconds


@get("/admin/usage", **documented(UsageReport, errors=(401,)))
async def admin_usage(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Response[bytes]:
    query = request.query_params
    group_by = query.get("group_by") or "client"
    if group_by not in ("client", "model", "day", "upstream"):
        raise bad_request("'group_by' must be one of client, model, day, upstream.", param="group_by")
    split_by = query.get("split_by") or None
    if split_by is not None and (split_by not in ("client", "model", "upstream") or split_by == group_by):
        raise bad_request("'split_by' must be one of client, model, upstream, other than group_by.",
                          param="split_by")
    fmt = query.get("format") or "json"
    if fmt not in ("json", "csv"):
        raise bad_request("'format' must be json or csv.", param="format")
    rows = await runtime.store.usage(
        client=query.get("client") or None, model=query.get("model") or None,
        since=_time(query.get("since"), "since"), until=_time(query.get("until"), "until"), group_by=group_by,
        split_by=split_by)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([group_by, *([split_by] if split_by else []), "requests", "cost", "failed"])
        writer.writerows([r.group, *([r.split] if split_by else []), r.requests, r.cost, r.failed] for r in rows)
        name = f"usage-by-{group_by}{f'-and-{split_by}' if split_by else ''}.csv"
        return Response(out.getvalue().encode(), media_type="text/csv",  # Litestar adds the charset
                        headers={"content-disposition": f'attachment; filename="{name}"'})
    total = {"requests": sum(r.requests for r in rows), "cost": round(sum(r.cost for r in rows), 6),
             "failed": sum(r.failed for r in rows)}
    report: dict[str, Any] = {"object": "list", "group_by": group_by, "data": rows, "total": total}
    if split_by:
        report["split_by"] = split_by
    return json_response(report)


@get("/metrics", **documented(str, media_type="text/plain", errors=(401,),
                                    description="Prometheus text format."))
async def metrics(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Response[bytes]:
    registry = request.app.state.metrics
    for client in runtime.config.clients:
        if client.budget is not None:
            spent = await runtime.store.spent(client.name, period_start(client.budget_period, time.time()))
            registry.budget_spent.labels(client.name).set(spent)
            registry.budget_limit.labels(client.name).set(client.budget)
    return Response(registry.render(), media_type="text/plain; version=0.0.4")  # Litestar adds the charset


ADMIN_ROUTES = [admin_keys, admin_disable_key, admin_enable_key, admin_reload, admin_usage, metrics]
