"""Scrub secrets from any text that leaves the process: log lines, error messages.

A configured secret is scrubbed whole, and so is any stretch of text that shows 8 or more
consecutive characters of it, of its URL-encoded form or of its base64 at any alignment:
an upstream that echoes a key cut short ("xf_live_9fK2…"), its tail, or the key inside an
encoded credential leaks it as surely as the whole key. Fewer than 8 characters (a masked
"xf_l…pL1") name a key without giving it away, and are kept; so are 8 characters that are
all inside a name the config gives to something (a client named "backend-bot" whose key is
"sk-backend-bot-…" keeps its name in the logs).

Pieces are looked for only in text this process wrote or an upstream sent (`redact`), and
not where the client itself sent them: what goes back to a client (`redact.whole`) is scrubbed
of whole secrets and key shapes alone, and upstream text of pieces the request to it did not
hold (`sent`): a client's own text echoed back with its pieces scrubbed, by us or by an
upstream quoting it, would tell, character by character, how much of it matches a secret.
Upstream text is scrubbed where it comes in (`proxy/providers/engine.py`).

The text is cut into runs of the characters keys and their encodings are made of; a run
that contains a secret or an 8-character piece of one is replaced whole. Verdicts on runs
are remembered (most runs in log lines recur: field names, paths, model ids), so a line
costs one regex scan and a few dict lookups.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from proxy.config import Config

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


def _alternation(secrets: Iterable[str]) -> re.Pattern[str] | None:
    ordered = sorted(secrets, key=len, reverse=True)  # longest first: no partial leftovers
    return re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


class Redactor:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._public: set[str] = set()
        self._odd: re.Pattern[str] | None = None  # secrets no run holds: short, or odd characters
        self._whole: re.Pattern[str] | None = None  # the others, looked for in runs
        self._pieces: frozenset[str] = frozenset()
        self._quarters: frozenset[str] = frozenset()  # 4-character stretches of the pieces
        self._verdicts: dict[str, str] = {}

    def add(self, secrets: Iterable[str], public: Iterable[str] = ()) -> None:
        """Scrub `secrets` from now on; pieces of them inside a `public` name are kept."""
        fresh = {s for s in secrets if len(s) >= 4} - self._secrets
        named = set(public) - self._public
        if not fresh and not named:
            return
        self._secrets |= fresh
        self._public |= named
        odd = [s for s in self._secrets if len(s) < 7 or not _ONE_RUN.fullmatch(s)]  # 7: the shortest run
        self._odd = _alternation(odd)
        self._whole = _alternation(self._secrets.difference(odd))
        pieces = set().union(*(_pieces(form) for secret in self._secrets for form in forms(secret)))
        names = "\n".join(self._public)
        self._pieces = frozenset(piece for piece in pieces if piece not in names)
        self._quarters = frozenset(piece[start:start + 4] for piece in self._pieces for start in range(4))
        self._verdicts = {}

    def add_config(self, config: Config) -> None:
        """Every secret of a config; the names it gives clients, upstreams and aliases are public."""
        self.add(config.secrets(), public=[*(c.name for c in config.clients), *config.providers, *config.aliases])

    def _shows_a_piece(self, run: str, sent: str = "") -> bool:
        # Any 8 characters of the run hold the 4 that start at a multiple of 4: only if one such
        # stretch is a quarter of a piece can a piece be there (a line's unique ids, mostly not).
        quarters = self._quarters
        for start in range(0, len(run) - 3, 4):
            if run[start:start + 4] in quarters:
                break
        else:
            return False
        pieces = self._pieces
        for start in range(len(run) - PIECE + 1):  # a loop, not any(): a quarter faster
            piece = run[start:start + PIECE]
            if piece in pieces and piece not in sent:
                return True
        return False

    def _verdict(self, run: str, sent: str = "") -> str:
        """The run as it may be shown; pieces in `sent` (the client's own) are no secret's."""
        if self._shows_a_piece(run, sent) or (self._whole is not None and self._whole.search(run)):
            shown = REDACTED
        elif "xf_" in run or "sk-" in run:
            shown = _KEY_SHAPES.sub(REDACTED, run)
        else:
            shown = run
        if sent:
            return shown  # a verdict for this text only
        if len(self._verdicts) >= _REMEMBERED:
            self._verdicts = {}
        self._verdicts[run] = shown
        return shown

    def whole(self, text: str) -> str:
        """Whole secrets and key shapes scrubbed; pieces kept (see the module docstring)."""
        for pattern in (self._odd, self._whole):
            if pattern is not None:
                text = pattern.sub(REDACTED, text)
        return _KEY_SHAPES.sub(REDACTED, text) if "xf_" in text or "sk-" in text else text

    def pieces_in(self, text: str) -> str:
        """The pieces of secrets `text` shows, one a line; "" for none (nearly always): what a
        request held that its upstream may quote back later (a task's reason), kept that long."""
        pieces = self._pieces
        found = {run[i:i + PIECE] for run in _RUN.findall(text) if self._shows_a_piece(run)
                 for i in range(len(run) - PIECE + 1) if run[i:i + PIECE] in pieces}
        return "\n".join(sorted(found))

    def __call__(self, text: str, sent: str = "") -> str:
        """`text` scrubbed; `sent`: what the client sent that `text` may quote (see the docstring)."""
        if self._odd is not None:
            text = self._odd.sub(REDACTED, text)
        verdicts = {} if sent else self._verdicts
        changed: dict[str, str] | None = None
        for run in _RUN.findall(text):
            shown = verdicts.get(run) or self._verdict(run, sent)
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
