"""The registry of upstream dialects: the only place that knows them all (README.md here says how
to add one). A `[providers.<name>]` table picks its dialect with `type` (default: its name)."""

from __future__ import annotations

from typing import NamedTuple

from proxy.providers.base import Dialect
from proxy.providers.fengyuan import Fengyuan
from proxy.providers.openai import OpenAICompatible
from proxy.providers.xffuw import Xffuw


class Registered(NamedTuple):
    dialect: type[Dialect]
    base_url: str | None  # used when the config names none; None: the config must
    # bearer tokens with this prefix are this upstream's keys ([auth] passthrough); None: set one
    # on purpose (Fengyuan keys start "sk-" like most client keys, so a mistyped client key would
    # be sent there)
    passthrough_prefix: str | None


DIALECTS: dict[str, Registered] = {
    "xffuw": Registered(Xffuw, "https://ai.xffuw.com/api/v1/", "xf_"),
    "fengyuan": Registered(Fengyuan, "https://aivip.link", None),
    "openai": Registered(OpenAICompatible, None, None),
}
