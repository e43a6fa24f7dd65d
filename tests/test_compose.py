"""compose.yaml: two proxy replicas on one PostgreSQL and one Redis, health checks, a volume
for PostgreSQL, the replicas' config mounted from deploy/. Checked against the Compose
Specification's schema (tests/compose_spec/) and by reading the file everywhere, and by
`docker compose config` where docker's compose plugin is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from jsonschema import Draft7Validator

from proxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {"POSTGRES_PASSWORD": "pg-secret-123", "PROXY_CLIENT_KEY": "sk-team-0123456789",
       "PROXY_ADMIN_KEY": "adm-0123456789", "XFFUW_KEY": "xf_key_0123456789", "FENGYUAN_KEY": "sk-fy-0123456789"}
PROXIES = ("proxy-1", "proxy-2")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def interpolate(value: str) -> str:
    """Compose's ${VAR:?message} with the test's values."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: ENV[m[1]], value)


def test_the_file_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "compose_spec" / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft7Validator(schema).iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["proxy-1"]["healthcheck"]["interval"] = 5  # a duration is a string
    assert not Draft7Validator(schema).is_valid(broken)


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("docker's compose plugin is not installed (docker compose version failed)")
    result = subprocess.run([docker, "compose", "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **ENV})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {*PROXIES, "postgres", "redis"}
    for name in PROXIES:
        assert services[name]["environment"]["DATABASE_URL"] == "postgresql://proxy:pg-secret-123@postgres:5432/proxy"
    missing = subprocess.run([docker, "compose", "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True,
                             text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # a secret left unset is named


def test_two_replicas_share_one_postgresql_and_one_redis_with_health_checks() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {*PROXIES, "postgres", "redis"}
    assert "postgres-data" in spec["volumes"]
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    ports = set()
    for name in PROXIES:
        proxy = services[name]
        assert proxy["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert proxy["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                       "redis": {"condition": "service_healthy"}}
        assert "/healthz" in " ".join(proxy["healthcheck"]["test"])
        env = proxy["environment"]
        assert set(env) >= {"DATABASE_URL", "REDIS_URL"}
        assert interpolate(env["DATABASE_URL"]).startswith("postgresql://proxy:pg-secret-123@postgres:5432/")
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        ports.add(proxy["ports"][0].split(":")[0])
    assert len(ports) == 2  # each replica on its own host port
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"]


def test_the_mounted_config_is_valid_and_uses_the_shared_services() -> None:
    proxy = compose()["services"]["proxy-1"]
    (mount,) = proxy["volumes"]
    source, target, _ = mount.split(":")
    assert target == "/config/config.toml"  # where the Dockerfile's CMD reads it
    env = {name: interpolate(str(value)) for name, value in proxy["environment"].items()}
    config = load_config(ROOT / source, env)
    assert config.storage.url == env["DATABASE_URL"]
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert [c.key for c in config.clients] == [ENV["PROXY_CLIENT_KEY"]]
    assert ENV["POSTGRES_PASSWORD"] in config.secrets()  # kept out of every log line
