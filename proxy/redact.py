"""Scrub secrets from any text that leaves the process: log lines, error messages."""

from __future__ import annotations

import re

# Shapes of keys even when they are not configured (a client may send an upstream key).
_KEY_SHAPES = re.compile(r"\b(?:xf_|sk-)[A-Za-z0-9_\-]{4,}")


class Redactor:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: list[str]) -> None:
        fresh = {s for s in secrets if len(s) >= 4} - self._secrets
        if fresh:
            self._secrets |= fresh
            ordered = sorted(self._secrets, key=len, reverse=True)  # longest first: no partial leftovers
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub("[redacted]", text)
        return _KEY_SHAPES.sub("[redacted]", text)


# One per process: every app in it adds its configured secrets.
redact = Redactor()
