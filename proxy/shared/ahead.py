"""Slots of wide windows taken one call ahead, so that a call finds its slot ready and does not
wait on Redis.

A slot is counted in Redis like a call under way; the call that uses it counts from its use
(its client window is told so), and a slot left unused for READY_LIFE seconds leaves its window
again. Only windows wide enough for that to cost the others next to nothing take slots ahead:
no concurrency limit, at least AHEAD_SHARE calls per replica, no more than one slot ahead per
AHEAD_SHARE calls of the limit, and only while the window is at most half full.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

from proxy.shared.window import Window

AHEAD_SHARE = 50
READY_LIFE = 1.0  # seconds a slot waits for its call before it is given back
# A slot taken ahead counts from this far ahead until its call uses it: if that news is lost,
# it counts from later than its use, never from earlier.
HOLD_AHEAD = 2 * READY_LIFE

Key = tuple[tuple[str, int | None, float], ...]  # (name, limit, seconds) of each window


@dataclass(slots=True)
class _Slot:
    member: str
    taken: float  # time.monotonic()
    names: tuple[str, ...]


def _key(windows: tuple[Window, ...]) -> Key:
    return tuple((w.name, w.limit, w.seconds) for w in windows)


class SlotsAhead:
    def __init__(self) -> None:
        self._ready: dict[Key, _Slot] = {}
        self._fetching: set[Key] = set()
        self._held: Counter[str] = Counter()  # window name -> its slots ready or being taken
        self.epoch = 0  # moves on when Redis goes away: a slot taken before is not kept
        self.closing = False

    def ahead(self, windows: tuple[Window, ...], replicas: int) -> tuple[Window, ...] | None:
        """The windows to take the next call's slot in, or None (too narrow, or one is there)."""
        key = _key(windows)
        if self.closing or key in self._fetching or key in self._ready:
            return None
        for w in windows:
            if w.most is not None or w.limit is None or self._held[w.name] >= w.limit // (AHEAD_SHARE * replicas):
                return None
        return tuple(replace(w, reserve=w.limit // 2 if w.limit else 0, hold=max(w.hold, HOLD_AHEAD))
                     for w in windows)

    def fetching(self, windows: tuple[Window, ...]) -> int:
        """A slot is being taken for these windows; the epoch to hand to `fetched`."""
        self._fetching.add(_key(windows))
        self._held.update(w.name for w in windows)
        return self.epoch

    def fetched(self, windows: tuple[Window, ...], member: str | None, epoch: int) -> bool:
        """Keep the slot taken (True), or it is to be given back (closing, Redis went away)."""
        key = _key(windows)
        self._fetching.discard(key)
        if epoch != self.epoch:  # cleared meanwhile, counts and all
            return member is None
        if member is None or self.closing:
            self._held.subtract(w.name for w in windows)
            return member is None
        self._ready[key] = _Slot(member, time.monotonic(), tuple(w.name for w in windows))
        return True

    def pop(self, windows: tuple[Window, ...]) -> tuple[str, bool] | None:
        """The slot taken ahead for a call in these windows, and whether it is fresh enough to use
        (else it is to be given back)."""
        slot = self._ready.pop(_key(windows), None)
        if slot is None:
            return None
        self._held.subtract(slot.names)
        fresh = time.monotonic() - slot.taken < READY_LIFE and all(
            w.limit is not None and w.reserve <= w.limit // 2 for w in windows)
        return slot.member, fresh

    def stale(self, every: bool = False) -> list[tuple[tuple[str, ...], str]]:
        """Slots unused for READY_LIFE (or all of them), taken out: (window names, member) each."""
        now = time.monotonic()
        out = [key for key, slot in self._ready.items() if every or now - slot.taken >= READY_LIFE]
        slots = [self._ready.pop(key) for key in out]
        for slot in slots:
            self._held.subtract(slot.names)
        return [(slot.names, slot.member) for slot in slots]

    def clear(self) -> None:
        """Redis went away: in Redis the slots lapse by themselves."""
        self._ready.clear()
        self._held.clear()
        self.epoch += 1
