"""A wall-clock budget for the benchmark (`--max-seconds`): plan rounds, stop in time.

GPUs are rented by the minute, so `python -m jaxbench.bench --max-seconds S`
must give the most comparison that fits in S seconds and then stop with its
results written. Three pieces, all pure or injectable so tests can use a fake
clock:

* `Budget`: seconds allowed from a start on a clock.
* `fits`: whether work predicted to take `estimate` seconds may start now; the
  estimate is inflated by `SAFETY` and `SLACK_S` (one slow run must not overrun).
* `Watchdog`: a SIGALRM near the end of the budget that interrupts a run far
  slower than predicted, and nothing else (never a file write).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

SAFETY = 1.25  # predicted cost x this must fit (runs vary)
SLACK_S = 5.0  # plus this much, for writing files and the plot

T = TypeVar("T")


@dataclass
class Budget:
    """`seconds` allowed from `start` on `clock` (inf: no limit); the clock is injectable."""

    seconds: float = math.inf
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=math.nan)

    def __post_init__(self) -> None:
        if math.isnan(self.start):
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    @property
    def limited(self) -> bool:
        return math.isfinite(self.seconds)


def fits(remaining: float, estimate: float, reserve: float = 0.0) -> bool:
    """Whether work predicted to take `estimate` s may start with `remaining` s left.

    `reserve` is kept for work that must still run afterwards.
    """
    return remaining - reserve >= estimate * SAFETY + SLACK_S


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """ABAB: round 0 runs `items` in order, round 1 reversed, and so on.

    Alternating who goes first spreads drift during the command (clocks, heat,
    allocator state) over every contender alike.
    """
    return list(items) if round_index % 2 == 0 else list(reversed(items))


class BudgetExceeded(Exception):
    """Raised inside a guarded run when the wall-clock budget runs out."""


class Watchdog:
    """A SIGALRM at the end of the budget that interrupts a guarded run, and nothing else.

    The planner predicts costs and should end in time on its own; this is the
    backstop for a run far slower than predicted. Outside `guard()` the alarm
    only marks the budget spent, so writing results is never interrupted.
    Main thread only (a signal handler); a no-op without `setitimer` or limit.
    """

    def __init__(self, budget: Budget, reserve: float = 0.0) -> None:
        """`reserve`: seconds before the end at which to fire, kept for what must follow
        (writing the results). The signal lands only once a compile or training call in
        C returns, so a budget with no reserve ends late by that much, and more on a
        loaded machine."""
        self.budget = budget
        self.reserve = reserve
        self.expired = False
        self.active = False
        self.armed = False

    def arm(self) -> bool:
        if not self.budget.limited or not hasattr(signal, "setitimer"):
            return False
        signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.budget.remaining() - self.reserve, 0.001))
        self.armed = True
        return True

    def disarm(self) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            self.armed = False

    def _fire(self, signum: int, frame: Any) -> None:
        self.expired = True
        if self.active:
            self.active = False
            raise BudgetExceeded(f"the {self.budget.seconds:.0f} s budget ran out during a run")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.expired:
            raise BudgetExceeded(f"the {self.budget.seconds:.0f} s budget is spent")
        self.active = True
        try:
            yield
        finally:
            self.active = False
