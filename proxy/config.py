"""The TOML configuration: msgspec Structs, ${ENV} interpolation, errors naming the key path."""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from proxy.egress import Egress, parse_proxy
from proxy.providers import DIALECTS
from proxy.struct_errors import explain

SQLITE_NEEDED = (3, 33, 0)  # the store's writes (proxy/store/sqlite.py)
DAY = 86400.0  # the upper bound of a time in seconds: a larger one is a typo or an attack
Seconds = Annotated[float, msgspec.Meta(gt=0, le=DAY)]
Wait = Annotated[float, msgspec.Meta(ge=0, le=DAY)]  # seconds where 0 means "do not wait"


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming the key path."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Table):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080  # 0: any free port (as `proxy demo --port 0`)
    # Where clients reach the proxy from outside, e.g. "https://ai.example.com"; used for
    # URLs the proxy serves itself.
    public_url: str | None = None
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1, le=2**40)] = 25 * 1024 * 1024
    shutdown_grace: Wait = 30.0
    # Browser clients: origins allowed by CORS (["*"] for any); empty turns CORS off.
    cors_origins: list[str] = []
    # Seconds a connection has to send a complete request head; then it is closed.
    header_timeout: Seconds = 10.0
    # Seconds a request's body has to arrive whole after its head; then 408 and it is closed.
    body_timeout: Seconds = 60.0
    # Open client connections per process; past it the one idle longest is closed for the new
    # one. Unset: the open-file limit less what upstream connections and the store need.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # The egress HTTP proxy for upstream calls and downloads ("http://[user:pass@]host:port");
    # unset: HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment; "": none (proxy/egress.py).
    upstream_proxy: str | None = None
    max_answer_bytes: int = 16 * 1024 * 1024  # a larger upstream API answer is an upstream error

    def egress(self) -> Egress:
        """The egress proxies for `upstream_proxy` and the environment; a proxy of the environment
        that is not one is a config error, naming the variable."""
        try:
            return Egress(self.upstream_proxy)
        except ValueError as error:  # HTTPS_PROXY or HTTP_PROXY not an http:// proxy
            raise ConfigError(f"{error}; set [server] upstream_proxy to override the environment") from None


class ClientConfig(_Table):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    key: str | None = None
    key_sha256: str | None = None
    rpm: int | None = None  # requests per minute; over it: 429 rate_limit_exceeded
    models: list[str] | None = None  # allowed model ids, globs allowed; None: every model
    budget: float | None = None  # spending cap in the upstreams' own units
    budget_period: Literal["daily", "monthly", "total"] = "total"


class UpstreamKeyConfig(_Table):
    value: str
    weight: int = 1
    rpm: int | None = None  # calls per rate_window, polls included; None: the upstream's known limit
    max_concurrent: int | None = None


class ProviderConfig(_Table):
    base_url: str = ""  # default: the dialect's own (proxy/providers/__init__.py)
    keys: list[str] = []
    key: list[UpstreamKeyConfig] = []  # [[providers.<name>.key]] tables: keys with weights and limits
    # Which upstream dialect this table speaks; defaults to the table's name, so two
    # Fengyuan accounts can be [providers.fengyuan] and [providers.fy2] with type = "fengyuan".
    type: str | None = None
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 120.0
    catalogue_ttl: float = 300.0
    # how long an exhausted (balance short) key is set aside before it is tried again
    recheck_after: float = 300.0
    strategy: Literal["round_robin", "least_busy", "most_credits"] = "round_robin"
    rpm: int | None = None  # default per-key limit; Fengyuan: 60, or 300 for VIP keys, when unset
    rate_window: float = 60.0  # seconds the rpm limits count over (the upstream's own window)
    max_concurrent: int | None = None  # default per key
    queue_timeout: Wait = 30.0  # seconds a request waits for a key under its limits before 429
    balance_interval: float = 300.0  # seconds between reads of each key's credits (Fengyuan)
    # bearer tokens with this prefix are this upstream's keys
    passthrough_prefix: Annotated[str, msgspec.Meta(min_length=1)] | None = None

    def all_keys(self) -> list[UpstreamKeyConfig]:
        return [UpstreamKeyConfig(value=k) for k in self.keys] + list(self.key)


class TasksConfig(_Table):
    poll_interval: float = 3.0
    # the first poll comes this soon after submit (never later than poll_interval)
    first_poll: float = 1.0
    timeout: float = 600.0  # seconds a request waits for its tasks; then 504, and the tasks go on
    # After a request's timeout its tasks are still polled, this often, until final or give_up_after
    # hours from their start: a task the upstream charged for is never given up while it may finish.
    late_poll_interval: float = 30.0
    give_up_after: float = 24.0
    keep_results: Annotated[float, msgspec.Meta(gt=0)] = 24.0  # hours a finished task's result stays retrievable


ImageFormat = Literal["url", "b64_json"]
# What OpenAI answers these models with (its clients send no response_format for them and
# expect it); consulted after [images] response_format.
BUILT_IN_IMAGE_FORMATS: dict[str, ImageFormat] = {"gpt-image-*": "b64_json", "chatgpt-image-*": "b64_json"}


class ImagesConfig(_Table):
    # b64_json downloads the result: capped in size and time (proxy/downloads.py)
    max_download_bytes: int = 32 * 1024 * 1024  # one result
    max_request_download_bytes: int = 128 * 1024 * 1024  # a request's results together
    # all downloads held at once, on this machine (each of N workers holds 1/N; read at start)
    download_memory_bytes: int = 256 * 1024 * 1024
    download_timeout: float = 60.0
    # fetch results from loopback and private addresses too (the upstream's own origin always is)
    allow_private_hosts: bool = False
    # Images uploaded for edits are kept in memory for the upstream to fetch, this much in all;
    # each client may hold its share (this over the clients, at least one request's body).
    uploads_max_bytes: int = 256 * 1024 * 1024
    # The response_format of a request that sends none, by the model id or alias it names
    # (globs, first match; then BUILT_IN_IMAGE_FORMATS; else "url").
    response_format: dict[str, ImageFormat] = {}

    def default_format(self, model: str) -> ImageFormat:
        """`model` as the client named it; "xffuw/gpt-image-2" also matches "gpt-image-*"."""
        names = [name for name in (model.lower(), model.partition("/")[2].lower()) if name]
        for table in (self.response_format, BUILT_IN_IMAGE_FORMATS):
            for glob, form in table.items():
                if any(fnmatch.fnmatchcase(name, glob.lower()) for name in names):
                    return form
        return "url"


class AuthConfig(_Table):
    # Forward requests whose bearer token is an upstream key (by its prefix) with that key:
    # no pool, no budget. For people who bring their own key.
    passthrough: bool = False


class AdminConfig(_Table):
    keys: list[str] = []
    keys_sha256: list[str] = []


class SharedConfig(_Table):
    # Redis for state every worker and replica shares: limits, key states, budget holds,
    # Idempotency-Key marks, uploads, conversations ("" keeps each process's own, so
    # redis_url = "${REDIS_URL:-}" serves both).
    redis_url: Annotated[str, msgspec.Meta(pattern=r"^(rediss?://.+|unix://.+)?$")] = ""
    prefix: Annotated[str, msgspec.Meta(min_length=1)] = "xfproxy"  # two proxies may share one Redis
    # seconds a replica's lease on its tasks lasts unrenewed: a replica that dies has its tasks
    # adopted by another within about this long
    lease: Annotated[float, msgspec.Meta(gt=0)] = 10.0

    def secrets(self) -> list[str]:
        password = urlsplit(self.redis_url).password if self.redis_url else None
        return [unquote(password)] if password else []


class StorageConfig(_Table):
    # SQLite file for usage, tasks and idempotency records; ":memory:" keeps nothing.
    path: str = "data/proxy.sqlite3"
    # PostgreSQL instead of the file, for replicas on several machines ("" keeps the file, so
    # url = "${DATABASE_URL:-}" serves both).
    url: Annotated[str, msgspec.Meta(pattern=r"^(postgres(ql)?://.+)?$")] = ""
    idempotency_hours: Annotated[float, msgspec.Meta(gt=0)] = 24.0
    # days raw usage rows are kept; the per-day totals behind /admin/usage and budgets stay
    keep_usage_days: Annotated[float, msgspec.Meta(gt=0)] = 90.0

    def secrets(self) -> list[str]:
        """The password in the url, if any."""
        password = urlsplit(self.url).password if self.url else None
        return [unquote(password)] if password else []


class LogConfig(_Table):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Table):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    clients: list[ClientConfig] = []
    providers: dict[str, ProviderConfig] = {}
    tasks: TasksConfig = msgspec.field(default_factory=TasksConfig)
    images: ImagesConfig = msgspec.field(default_factory=ImagesConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    shared: SharedConfig = msgspec.field(default_factory=SharedConfig)
    aliases: dict[str, str] = {}

    def secrets(self) -> list[str]:
        """Every configured secret, so log lines and error texts can be scrubbed of them."""
        found = [c.key for c in self.clients if c.key] + list(self.admin.keys)
        proxy = self.server.upstream_proxy
        password = urlsplit(proxy if "://" in proxy else "http://" + proxy).password if proxy else None
        if password:  # the egress proxy's, as written and as sent
            found += [password, unquote(password)]
        for provider in self.providers.values():
            found.extend(k.value for k in provider.all_keys())
        found.extend(self.storage.secrets())
        found.extend(self.shared.secrets())
        return [s for s in found if s]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: str, env: dict[str, str]) -> Any:
    """${ENV} substituted in every string; any number that is not finite refused, naming its path
    (nan, inf or 1e400 would pass every `> 0` and `<= limit` check and turn a limit off)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path or 'config'}: {value} is not a number the proxy can use")
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _ENV.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else k, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _convert(raw: Any, kind: type[Any], path: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message, where = explain(exc, path)
        raise ConfigError(f"{where or path or 'config'}: {message}") from None


def parse_config(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    raw = _interpolate(raw, "", dict(os.environ) if env is None else env)
    # Tables keyed by name are converted one by one so errors name the table.
    providers = raw.pop("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError("providers: expected a table of [providers.<name>] tables")
    config: Config = _convert(raw, Config, "")
    config.providers = {
        name: _convert(table, ProviderConfig, f"providers.{name}") for name, table in providers.items()
    }
    _check(config)
    return config


def _check(config: Config) -> None:
    for i, digest in enumerate(config.admin.keys_sha256):
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"admin.keys_sha256[{i}]: expected 64 hex digits (sha256 of the key)")
    if not config.clients:
        raise ConfigError("clients: at least one [[clients]] entry with a key is required")
    names: set[str] = set()
    for i, client in enumerate(config.clients):
        where = f"clients[{i}]"
        if client.name in names:
            raise ConfigError(f"{where}.name: duplicate client name {client.name!r}")
        names.add(client.name)
        if bool(client.key) == bool(client.key_sha256):
            raise ConfigError(f"{where}: set exactly one of key or key_sha256")
        if client.budget is not None and client.budget < 0:
            raise ConfigError(f"{where}.budget: must be >= 0")
        if client.rpm is not None and client.rpm < 1:
            raise ConfigError(f"{where}.rpm: must be >= 1")
        if client.key_sha256 is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", client.key_sha256):
                raise ConfigError(f"{where}.key_sha256: expected 64 hex digits (sha256 of the key)")
            client.key_sha256 = client.key_sha256.lower()
    for name, provider in config.providers.items():
        where = f"providers.{name}"
        provider.type = provider.type or name
        registered = DIALECTS.get(provider.type)
        if registered is None:
            raise ConfigError(f"{where}.type: unknown upstream {provider.type!r}; one of {tuple(DIALECTS)}")
        provider.base_url = provider.base_url or registered.base_url or ""
        if not provider.base_url:
            raise ConfigError(f"{where}.base_url: required for type {provider.type!r}")
        if not re.match(r"https?://", provider.base_url):
            raise ConfigError(f"{where}.base_url: expected an http(s) URL")
        if "/" in name:
            raise ConfigError(f"{where}: a provider name may not contain '/'")
        for i, key in enumerate(provider.keys):
            if not key.strip():
                raise ConfigError(f"{where}.keys[{i}]: empty key")
        for i, table in enumerate(provider.key):
            if not table.value.strip():
                raise ConfigError(f"{where}.key[{i}].value: empty key")
            if table.weight < 1:
                raise ConfigError(f"{where}.key[{i}].weight: must be >= 1")
        values = [k.value for k in provider.all_keys()]
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: the same key is listed twice")
        if provider.rate_window <= 0:
            raise ConfigError(f"{where}.rate_window: must be > 0")
        if provider.passthrough_prefix is None:
            provider.passthrough_prefix = registered.passthrough_prefix
    _check_keys_distinct(config)
    if config.auth.passthrough:
        for name, provider in config.providers.items():
            prefix = provider.passthrough_prefix
            for i, client in enumerate(config.clients):
                if prefix and client.key and client.key.startswith(prefix):
                    raise ConfigError(f"clients[{i}].key: starts with providers.{name}.passthrough_prefix "
                                      f"{prefix!r}; with [auth] passthrough a mistyped key would be sent upstream")
    tasks = config.tasks
    if tasks.poll_interval <= 0:
        raise ConfigError("tasks.poll_interval: must be > 0")
    if tasks.timeout <= 0:
        raise ConfigError("tasks.timeout: must be > 0")
    if tasks.late_poll_interval < tasks.poll_interval:
        raise ConfigError("tasks.late_poll_interval: must be >= tasks.poll_interval")
    if tasks.give_up_after * 3600 < tasks.timeout:
        raise ConfigError("tasks.give_up_after: must be at least tasks.timeout (it is in hours)")
    tasks.first_poll = min(max(tasks.first_poll, 0.0), tasks.poll_interval)
    if config.server.upstream_proxy:
        try:
            parse_proxy(config.server.upstream_proxy, "server.upstream_proxy")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if config.server.max_answer_bytes < 1024:
        raise ConfigError("server.max_answer_bytes: must be >= 1024")
    if not config.storage.url and config.storage.path != ":memory:":
        _check_storage_path(config.storage.path)
    if not config.storage.url and sqlite3.sqlite_version_info < SQLITE_NEEDED:
        raise ConfigError(f"storage.path: SQLite {'.'.join(map(str, SQLITE_NEEDED))} or newer is needed (UPDATE "
                          f"FROM, 32,766 bound values); this Python uses {sqlite3.sqlite_version}. Use a Python "
                          "built with a newer SQLite, or PostgreSQL (storage.url)")
    images = config.images
    for name in ("max_download_bytes", "max_request_download_bytes", "download_memory_bytes"):
        if getattr(images, name) < 1:
            raise ConfigError(f"images.{name}: must be >= 1")
    if images.download_timeout <= 0:
        raise ConfigError("images.download_timeout: must be > 0")
    if images.max_download_bytes > images.download_memory_bytes:
        raise ConfigError("images.max_download_bytes: must not exceed images.download_memory_bytes")
    if config.server.public_url is not None:
        if not re.match(r"https?://", config.server.public_url):
            raise ConfigError("server.public_url: expected an http(s) URL")
        config.server.public_url = config.server.public_url.rstrip("/")
    for alias, target in config.aliases.items():
        if not target:
            raise ConfigError(f"aliases.{alias}: empty target")


def _check_keys_distinct(config: Config) -> None:
    """Every client, admin and upstream key is its own: a client key that is also an admin key
    opens /admin, one that is also an upstream key is that key. Compared by sha256, as some are
    given only so; the error names both places and never the key."""
    places: list[tuple[str, str]] = []  # (where, sha256)
    for i, client in enumerate(config.clients):
        if client.key:
            places.append((f"clients[{i}].key", sha256_hex(client.key)))
        elif client.key_sha256:
            places.append((f"clients[{i}].key_sha256", client.key_sha256))
    for i, key in enumerate(config.admin.keys):
        if not key.strip():
            raise ConfigError(f"admin.keys[{i}]: empty key")
        places.append((f"admin.keys[{i}]", sha256_hex(key)))
    places += [(f"admin.keys_sha256[{i}]", d.lower()) for i, d in enumerate(config.admin.keys_sha256)]
    for name, provider in config.providers.items():
        places += [(f"providers.{name}.keys[{i}]", sha256_hex(k)) for i, k in enumerate(provider.keys)]
        places += [(f"providers.{name}.key[{i}].value", sha256_hex(k.value)) for i, k in enumerate(provider.key)]
    seen: dict[str, str] = {}
    for where, digest in places:
        first = seen.setdefault(digest, where)
        # two providers may share an upstream key (two tables for one account); nothing else may
        if first != where and not (first.startswith("providers.") and where.startswith("providers.")):
            raise ConfigError(f"{where}: the same as {first}")


def _check_storage_path(path: str) -> None:
    """A SQLite file the store can create or open: not a directory, nor under a file."""
    if path.endswith(("/", os.sep)) or Path(path).is_dir():
        raise ConfigError(f"storage.path: {path!r} is a directory; name a file in it")
    for parent in Path(path).absolute().parents:  # the store creates the missing ones
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"storage.path: {str(parent)!r} is not a directory")
            return


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ConfigError(f"{path}: not usable TOML: {str(exc).partition(':')[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not usable TOML: arrays or tables nested too deep") from None
    return parse_config(raw, env)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
