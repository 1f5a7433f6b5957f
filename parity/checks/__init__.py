"""The parity checks, one module each, and the registry that numbers them.

| # | module | what it compares |
|---|--------|------------------|
| 1 | `init` | both frameworks' own inits; the bit-exact weight conversion |
| 2 | `forward` | logits, activations, BN running statistics, conv padding |
| 3 | `gradients` | per-parameter gradients of the trainers' own loss |
| 4 | `optimizer` | the LR at every step, K optimizer updates, the EMA, Muon |
| 5 | `augmentation` | the shared stream's batches, byte for byte |
| 6 | `trainer` | the trainers' own step loop and evaluation, step by step |
| 7 | `curves` | per-epoch accuracy over matched seeds, against a same-framework null |

Checks 1-6 are deterministic and compare at float32 full precision (no TF32);
check 7 is statistical and runs the trainers in their normal mode.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

from parity.checks import augmentation, curves, forward, gradients, init, optimizer, trainer
from parity.checks.base import CheckResult, Context, Figure, synthetic_dataset
from parity.harness import full_precision

CHECKS: dict[int, tuple[str, Callable[[Context], CheckResult]]] = {
    1: ("initialisation", init.check_init),
    2: ("forward", forward.check_forward),
    3: ("gradients", gradients.check_gradients),
    4: ("optimizer", optimizer.check_optimizer),
    5: ("augmentation", augmentation.check_augment),
    6: ("trainer", trainer.check_trainer),
    7: ("epoch accuracy curves", curves.check_curves),
}
STATISTICAL: frozenset[int] = frozenset({7})  # run in the trainers' normal precision

__all__ = ["CHECKS", "CheckResult", "Context", "Figure", "run_check", "synthetic_dataset"]


def run_check(number: int, ctx: Context) -> CheckResult:
    """Run one check; a crash becomes a failed result carrying the traceback."""
    name, fn = CHECKS[number]
    t0 = time.perf_counter()
    try:
        if number in STATISTICAL:
            res = fn(ctx)
        else:
            with full_precision():
                res = fn(ctx)
    except Exception as e:  # noqa: BLE001 - reported as a failed check, traceback kept
        res = CheckResult(number, name, error=f"{type(e).__name__}: {e}")
        res.details["traceback"] = traceback.format_exc()
    res.seconds = time.perf_counter() - t0
    return res
