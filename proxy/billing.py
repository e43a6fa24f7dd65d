"""Money: what a call costs, client budgets held by reservation, the usage ledger.

A budget is held, not just checked: a request reserves its expected cost before it calls
an upstream, and each call settles its share to the real cost once recorded (or to nothing,
if it failed before costing anything); what is left is released when the request ends. So
concurrent requests never overspend a budget together: each one sees what the others hold.
With shared state the holds and the spend of the period are kept in Redis, for every replica
(a hold lapses if its process dies); without, in this process, and when N processes serve
without sharing (`--workers N`, or Redis down) each may spend only 1/N of what was left of
the budget when it began counting alone: together they cannot spend more than the budget.
"""

from __future__ import annotations

import asyncio
import calendar
import secrets
import time
from dataclasses import dataclass, field

from proxy.config import ClientConfig, Config
from proxy.errors import Kind, ProxyError
from proxy.pool import KeyPool, UpstreamKey
from proxy.providers.base import ModelInfo
from proxy.shared import Shared, SharedDown
from proxy.store import Store, UsageRecord

_PERIOD_NAMES = {"daily": "daily ", "monthly": "monthly ", "total": ""}


def period_start(period: str, now: float) -> float:
    if period == "total":
        return 0.0
    t = time.gmtime(now)
    day = 1 if period == "monthly" else t.tm_mday
    return float(calendar.timegm((t.tm_year, t.tm_mon, day, 0, 0, 0)))


def period_end(period: str, start: float) -> float:
    """When the period that began at `start` ends (math.inf: never)."""
    if period == "total":
        return float("inf")
    if period == "daily":
        return start + 86_400
    t = time.gmtime(start)
    return float(calendar.timegm((t.tm_year + t.tm_mon // 12, t.tm_mon % 12 + 1, 1, 0, 0, 0)))


def price(model: ModelInfo | None, key: UpstreamKey | None) -> float:
    """What one call costs with this key: the catalogue price, discounted on VIP keys."""
    if model is None or model.price is None:
        return 0.0
    if key is not None and model.vip_discount and (key.vip_level or 0) >= 1:
        return model.price * model.vip_discount
    return model.price


@dataclass(eq=False)
class Reservation:
    """A request's hold on its client's budget: `per_call` for each of `calls` upstream calls."""

    client: str
    per_call: float
    calls: int
    released: bool = field(default=False)
    hold: str | None = None  # its id in Redis, when held there
    period: float = 0.0  # the start of the budget period it holds in
    settling: list[asyncio.Future[None]] = field(default_factory=list)  # its calls' settles in Redis, under way
    running: int = 0  # its calls under way: a stream's go on after its request (Gateway.start_chats)
    ended: bool = False  # its request is over: released once `running` is 0

    @property
    def held(self) -> float:
        return 0.0 if self.released else self.per_call * self.calls


class Billing:
    """Budgets and the usage ledger of one process."""

    def __init__(self, store: Store, shared: Shared | None = None, share: int = 1) -> None:
        self.store = store
        self.shared = shared
        self.share = share  # processes spending each budget without seeing each other's holds
        # client -> (period start, share, spent then, this process's recorded cost then): where
        # this process's part of what was left began, while it counts alone
        self._alone: dict[str, tuple[float, int, float, float]] = {}
        self._periods: dict[str, str] = {}  # client -> its budget period
        self._held: dict[str, float] = {}  # client -> reserved by requests under way
        # client -> cost this process recorded (a running total): what a spend read that was
        # under way meanwhile may not include yet
        self._recorded: dict[str, float] = {}
        # client -> (period start, held) as Redis last told: what other replicas may still be
        # spending when this process loses Redis and counts alone
        self._last_held: dict[str, tuple[float, float]] = {}

    def configure(self, config: Config) -> None:
        self._periods = {c.name: c.budget_period for c in config.clients if c.budget is not None}

    async def held(self, client: ClientConfig, now: float) -> float:
        """What requests under way hold of the client's budget: on every replica with shared
        state, else in this process."""
        if self.shared is not None and self.shared.active:
            try:
                return await self.shared.held(client.name, period_start(client.budget_period, now))
            except SharedDown:
                pass
        return self._held.get(client.name, 0.0)

    async def reserve(self, client: ClientConfig | None, model: ModelInfo | None, keys: list[UpstreamKey],
                      calls: int) -> Reservation | None:
        """Hold the expected cost of `calls` calls on the client's budget, or refuse (429).

        The expected cost is the dearest price a usable key would pay: the key is chosen only
        when the call is made, and a hold must never be smaller than the spend it stands for."""
        if client is None or client.budget is None:
            return None
        per_call = max((price(model, k) for k in keys), default=price(model, None))
        recorded_before = self._recorded.get(client.name, 0.0)
        start = period_start(client.budget_period, time.time())
        spent = await self.store.spent(client.name, start)
        expected = per_call * calls
        if self.shared is not None and self.shared.active:
            hold = secrets.token_hex(8)
            try:
                ok, spent, held = await self.shared.reserve(
                    client.name, start, known_spent=spent, budget=client.budget, expected=expected, hold=hold,
                    period_ends=period_end(client.budget_period, start))
            except SharedDown:
                pass  # held in this process from now on
            else:
                self._last_held[client.name] = (start, held)
                self._alone.pop(client.name, None)  # counting alone, if ever again, begins anew
                if not ok:
                    raise _spent(client, spent, held, expected)
                return Reservation(client.name, per_call, calls, hold=hold, period=start)
        # Counted twice at worst (written meanwhile and in `spent`): a hold errs on the safe side.
        spent += self._recorded.get(client.name, 0.0) - recorded_before
        held = self._held.get(client.name, 0.0)
        if spent + held + expected > client.budget + 1e-9 or (expected == 0 and spent >= client.budget):
            raise _spent(client, spent, held, expected)
        last = self._last_held.get(client.name)
        elsewhere = last[1] if last is not None and last[0] == start else 0.0
        if self._over_part(client, start, spent + elsewhere, held + expected):
            raise _spent(client, spent, held, expected, self.share)
        self._held[client.name] = held + expected
        return Reservation(client.name, per_call, calls)

    def _over_part(self, client: ClientConfig, start: float, spent: float, holding: float) -> bool:
        """Whether this process, one of `share` that cannot see each other's holds, would go
        past its part: 1/share of what was left when it began counting alone, less what it
        has recorded since. Each part is taken from a spend that already counts every earlier
        one (and, after Redis went away, the holds it last told of), so the parts together
        never exceed the budget."""
        if self.share <= 1 or not client.budget:
            self._alone.pop(client.name, None)
            return False
        recorded = self._recorded.get(client.name, 0.0)
        began = self._alone.get(client.name)
        if began is None or began[:2] != (start, self.share):
            began = self._alone[client.name] = (start, self.share, spent, recorded)
        part = (client.budget - began[2]) / self.share
        return recorded - began[3] + holding > part + 1e-9

    @staticmethod
    def call_started(reservation: Reservation | None) -> None:
        if reservation is not None:
            reservation.running += 1

    def call_ended(self, reservation: Reservation | None, client: str, cost: float | None) -> None:
        """One call of a request is over: its share of the hold becomes its recorded cost (None:
        the call cost nothing)."""
        try:
            self._call_ended(reservation, client, cost)
        finally:
            if reservation is not None:
                reservation.running = max(0, reservation.running - 1)
                if reservation.ended and not reservation.running:
                    self.release(reservation)  # the last call of a request already over

    def _call_ended(self, reservation: Reservation | None, client: str, cost: float | None) -> None:
        if cost:
            self._recorded[client] = self._recorded.get(client, 0.0) + cost
        if reservation is not None and reservation.hold is not None and self.shared is not None:
            share = reservation.per_call if not reservation.released and reservation.calls > 0 else 0.0
            reservation.calls -= share > 0
            settle = self.shared.settle(client, reservation.period, reservation.hold, share, cost or 0.0)
            reservation.settling.append(self.shared.soon(settle))
        elif reservation is not None and not reservation.released and reservation.calls > 0:
            reservation.calls -= 1
            self._unhold(client, reservation.per_call)

    def release(self, reservation: Reservation) -> None:
        """The request is over: whatever it still holds goes back, once its calls under way end
        (a call that outlives its request is still held until it records its cost)."""
        reservation.ended = True
        if reservation.released or reservation.running:
            return
        if reservation.hold is not None and self.shared is not None:
            self.shared.soon(self._release_after_settles(reservation))
        else:
            self._unhold(reservation.client, reservation.held)
        reservation.released = True

    async def _release_after_settles(self, reservation: Reservation) -> None:
        """Give back the rest of a hold in Redis once its calls' costs are there: released
        first, a cost would be in neither the holds nor the spend for a moment, and a hold
        made then could overspend the budget."""
        assert self.shared is not None and reservation.hold is not None
        pending = [settle for settle in reservation.settling if not settle.done()]
        if pending:
            await asyncio.wait(pending)
        await self.shared.release(reservation.client, reservation.period, reservation.hold)

    def adjust(self, client: str, delta: float, at: float) -> None:
        """A cost recorded at `at` (unix time) changed after the fact (a task's final cost)."""
        if not delta:
            return
        self._recorded[client] = self._recorded.get(client, 0.0) + delta
        period = self._periods.get(client)
        if period is not None and self.shared is not None and self.shared.active:
            self.shared.soon(self.shared.adjust(client, period_start(period, at), delta))

    def _unhold(self, client: str, amount: float) -> None:
        left = self._held.get(client, 0.0) - amount
        if left > 1e-9:
            self._held[client] = left
        else:
            self._held.pop(client, None)

    def record(self, record: UsageRecord) -> None:
        self.store.add_usage(record)

    @staticmethod
    def usable_keys(pool: KeyPool) -> list[UpstreamKey]:
        return [k for k in pool.keys if k.state != "disabled"]


def _spent(client: ClientConfig, spent: float, held: float, expected: float, share: int = 1) -> ProxyError:
    period = _PERIOD_NAMES[client.budget_period]
    in_flight = f", {held:g} held by requests under way" if held else ""
    alone = (f" This server runs {share} processes that share no state, so each may spend only its "
             "part of what is left (configure [shared] redis_url to pool it).") if share > 1 else ""
    return ProxyError(Kind.BALANCE, f"The {period}budget of {client.budget:g} for client '{client.name}' is spent "
                      f"({spent:g} used{in_flight}; this request would cost {expected:g}).{alone}",
                      code="insufficient_quota")
