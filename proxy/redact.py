"""Scrub secrets from any text that leaves the process: log lines, error messages.

A configured secret is scrubbed whole, and so is any stretch of text that shows 8 or more
consecutive characters of it, of its URL-encoded form or of its base64 at any alignment:
an upstream that echoes a key cut short ("xf_live_9fK2…"), its tail, or the key inside an
encoded credential leaks it as surely as the whole key. Fewer than 8 characters (a masked
"xf_l…pL1") name a key without giving it away, and are kept.

The text is cut into runs of the characters keys and their encodings are made of; a run
that contains an 8-character piece of a secret form is replaced whole. Verdicts on runs are
remembered (most runs in log lines recur: field names, paths, model ids), so a line costs
one regex scan and a few dict lookups.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
PIECE = 8  # characters of a secret that count as showing it
_ALPHABET = r"A-Za-z0-9_\-+/=%.~"  # keys, base64 (both alphabets), URL encoding
_RUN = re.compile(f"[{_ALPHABET}]{{7,}}")  # 7: the shortest key shape below
_ONE_RUN = re.compile(f"[{_ALPHABET}]+")
# Shapes of keys even when they are not configured (a client may send an upstream key).
_KEY_SHAPES = re.compile(r"\b(?:xf_|sk-)[A-Za-z0-9_\-]{4,}")
_REMEMBERED = 4096  # run verdicts kept; forgotten all at once past it


def forms(secret: str) -> set[str]:
    """The secret as an upstream may write it: as is, URL-encoded, and base64-encoded at each
    of the three alignments it can have inside longer data (only the characters that depend on
    the secret's bytes alone)."""
    found = {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
    raw = secret.encode()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(bytes(shift) + raw).decode()
            found.add(text[(8 * shift + 5) // 6:8 * (shift + len(raw)) // 6])
    return found


def _pieces(form: str) -> set[str]:
    # Pieces with fewer than 4 distinct characters ("00000000") say nothing of a key and would
    # scrub innocent text.
    return {piece for i in range(len(form) - PIECE + 1) if len(set(piece := form[i:i + PIECE])) >= 4}


class Redactor:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._whole: re.Pattern[str] | None = None  # secrets the runs cannot see: short, or odd characters
        self._pieces: frozenset[str] = frozenset()
        self._verdicts: dict[str, str] = {}

    def add(self, secrets: list[str]) -> None:
        fresh = {s for s in secrets if len(s) >= 4} - self._secrets
        if not fresh:
            return
        self._secrets |= fresh
        whole = sorted((s for s in self._secrets if len(s) < PIECE or not _ONE_RUN.fullmatch(s)),
                       key=len, reverse=True)  # longest first: no partial leftovers
        self._whole = re.compile("|".join(re.escape(s) for s in whole)) if whole else None
        self._pieces = self._pieces.union(*(_pieces(form) for secret in fresh for form in forms(secret)))
        self._verdicts = {}

    def _verdict(self, run: str) -> str:
        """The run as it may be shown."""
        pieces = self._pieces
        shown = run
        for i in range(len(run) - PIECE + 1):  # a loop, not any(): a quarter faster
            if run[i:i + PIECE] in pieces:
                shown = REDACTED
                break
        else:
            if "xf_" in run or "sk-" in run:
                shown = _KEY_SHAPES.sub(REDACTED, run)
        if len(self._verdicts) >= _REMEMBERED:
            self._verdicts = {}
        self._verdicts[run] = shown
        return shown

    def __call__(self, text: str) -> str:
        if self._whole is not None:
            text = self._whole.sub(REDACTED, text)
        verdicts = self._verdicts
        changed: dict[str, str] | None = None
        for run in _RUN.findall(text):
            shown = verdicts.get(run) or self._verdict(run)
            if shown != run:
                if changed is None:
                    changed = {}
                changed[run] = shown
        if changed:
            for run in sorted(changed, key=len, reverse=True):  # a run inside a longer one comes after it
                text = text.replace(run, changed[run])
        return text


# One per process: every app in it adds its configured secrets.
redact = Redactor()
