"""A wall-clock budget for the benchmark (`--max-seconds`): plan rounds, stop in time;
`Watchdog` interrupts a run far slower than predicted."""

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
    """Whether work predicted to take `estimate` s may start, `reserve` s kept for later."""
    return remaining - reserve >= estimate * SAFETY + SLACK_S


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """ABAB: `items` in order in even rounds, reversed in odd ones, so drift (clocks, heat,
    allocator state) hits every contender alike."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


class BudgetExceeded(Exception):
    """Raised inside a guarded run when the wall-clock budget runs out."""


class Watchdog:
    """A SIGALRM `reserve` s before the budget ends that interrupts a run in `guard()` (once
    its call into C returns), else only marks the budget spent. Main thread; no-op unlimited."""

    def __init__(self, budget: Budget, reserve: float = 0.0) -> None:
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
