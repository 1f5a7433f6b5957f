"""`eval_every` skips monitoring evaluations in both trainers but never the final one."""

from __future__ import annotations

import numpy as np
import pytest

from jaxbench.configs import tiny
from jaxbench.data import Dataset


def _data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 64).astype(np.int32)
    return Dataset("cifar10", [str(i) for i in range(10)], x, y, x[:32], y[:32])


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_eval_every_skips_monitoring_but_not_the_final_evaluation(framework: str) -> None:
    cfg = tiny().replace(
        widths=(4, 4, 4, 4), subset=64, test_subset=32, batch_size=32, epochs=3, eval_every=2
    )
    if framework == "jax":
        from jaxbench.train import train_and_evaluate
    else:
        from torch_ref.train import train_and_evaluate
    summary = train_and_evaluate(cfg, data=_data(), progress=False, quiet=True)
    evaluated = [row["val_acc"] is not None for row in summary["epochs"]]
    assert evaluated == [False, True, True]  # epoch 2 (every 2nd) and epoch 3 (the last)
    assert summary["final"]["val_acc"] is not None
    assert summary["final"]["ema_val_acc"] is not None


def test_eval_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"--eval-every must be in \[1, 1000\] epochs"):
        tiny().replace(eval_every=0)
