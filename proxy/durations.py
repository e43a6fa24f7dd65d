"""How long each model's tasks take, learned per upstream and model: a task's first poll falls
near the early end of its model's durations (EARLY) instead of at `[tasks] first_poll`, so a
60-second task costs a poll or two rather than one every poll_interval from the start.
Kept in the store, so a restart keeps what was learnt."""

from __future__ import annotations

import asyncio
import math
from collections import deque

import structlog

from proxy.loop import running_loop
from proxy.store import Store

log = structlog.get_logger("proxy.durations")

MIN_SAMPLES = 5  # a model with fewer known durations uses the configured schedule
KEEP = 200  # the most recent durations kept per model
EARLY = 0.10  # the quantile the first poll aims at
SAVE_AFTER = 10.0  # seconds a learnt duration may wait to be written with others

Model = tuple[str, str]  # (upstream, upstream model id)


def quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values, nearest rank."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Durations:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._samples: dict[Model, deque[float]] = {}
        self._early: dict[Model, float] = {}
        self._stale: set[Model] = set()  # learnt more since its early quantile was computed
        self._dirty: set[Model] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def load(self) -> None:
        for model, values in (await self.store.load_durations()).items():
            self._samples[model] = deque(values[-KEEP:], maxlen=KEEP)
            self._refresh(model)

    def first_poll(self, model: Model) -> float | None:
        """Seconds after the submit to poll first; None: too little is known, use the config."""
        if model in self._stale:
            self._stale.discard(model)
            self._refresh(model)
        return self._early.get(model)

    def record(self, model: Model, seconds: float) -> None:
        if not 0 <= seconds < 86_400:
            return
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=KEEP)
        samples.append(seconds)
        self._stale.add(model)  # sorted when next asked, not once a task: answers come in bursts
        self._dirty.add(model)
        if self._timer is None:
            try:
                self._timer = running_loop().call_later(SAVE_AFTER, self.save)
            except RuntimeError:  # no loop (tools, tests): write now
                self.save()

    def _refresh(self, model: Model) -> None:
        samples = self._samples[model]
        if len(samples) >= MIN_SAMPLES:
            self._early[model] = quantile(sorted(samples), EARLY)

    def save(self) -> None:
        """Queue what was learnt since the last save (the store writes it with its next batch)."""
        self._timer = None
        for upstream, model in self._dirty:
            try:
                self.store.save_durations(upstream, model, list(self._samples[(upstream, model)]))
            except Exception as exc:  # learning is an optimisation: never fail a task for it
                log.warning("durations_not_saved", upstream=upstream, model=model, error=repr(exc))
        self._dirty.clear()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.save()
