"""The parity checks, one module each, and the registry that numbers them.

Checks 1-6 are deterministic and compare at float32 full precision (no TF32); check 7 is
statistical and runs the trainers in their normal mode.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable

from parity.checks import augmentation, curves, forward, gradients, init, optimizer, trainer
from parity.checks.base import CheckResult, Context, Figure, synthetic_dataset
from parity.harness import full_precision

CHECKS: dict[int, tuple[str, Callable[[Context], CheckResult]]] = {
    1: ("initialisation", init.check_init),  # own inits; the bit-exact weight conversion
    2: ("forward", forward.check_forward),  # logits, activations, BN statistics, padding
    3: ("gradients", gradients.check_gradients),  # of the trainers' own loss
    4: ("optimizer", optimizer.check_optimizer),  # LR, K updates, the EMA, Muon
    5: ("augmentation", augmentation.check_augment),  # the shared stream's batches, bytes
    6: ("trainer", trainer.check_trainer),  # the trainers' own loop, step by step
    7: ("epoch accuracy curves", curves.check_curves),  # matched seeds vs a torch-only null
}
STATISTICAL: frozenset[int] = frozenset({7})  # run in the trainers' normal precision

__all__ = ["CHECKS", "CheckResult", "Context", "Figure", "run_check", "synthetic_dataset"]


def run_check(number: int, ctx: Context) -> CheckResult:
    """Run one check; a crash becomes a failed result carrying the traceback."""
    name, fn = CHECKS[number]
    t0 = time.perf_counter()
    try:
        with contextlib.nullcontext() if number in STATISTICAL else full_precision():
            res = fn(ctx)
    except Exception as e:  # noqa: BLE001 - reported as a failed check, traceback kept
        res = CheckResult(number, name, error=f"{type(e).__name__}: {e}")
        res.details["traceback"] = traceback.format_exc()
    res.seconds = time.perf_counter() - t0
    return res
