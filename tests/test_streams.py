"""Both trainers see bit-identical batches for a seed in shared-stream mode.

The batches themselves are compared: each framework's `apply_plan` on the same
`stream.epoch_plan`, and the augmented uint8 batches the two trainers actually
feed their training steps (recorded by wrapping each trainer's `apply_plan`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_dataset

from jaxbench.configs import Config, tiny
from jaxbench.data import Dataset
from jaxbench.stream import apply_plan_numpy, epoch_plan, steps_per_epoch
from torch_ref import augment as taug
from torch_ref import fast
from torch_ref import train as ttrain

jax = pytest.importorskip("jax", reason="jax not installed")
jaug = pytest.importorskip("jaxbench.augment", reason="jaxbench.augment not written yet")

CASES = [
    {},  # resnet9 augmentation: pad 4, random flip, cutout 8
    {"crop_pad": 2, "flip": "alternating", "cutout": 0},  # airbench-style
    {"crop_pad": 16, "flip": "random", "cutout": 32},  # extremes of the ranges
    {"crop_pad": 0, "flip": "none", "cutout": 1},
]


@pytest.mark.parametrize("changes", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_apply_plan_bit_identical_across_frameworks(seed: int, changes: dict[str, Any]) -> None:
    """The JAX trainer's shared path (`plan_to_device` + in-jit slice + apply) == torch's."""
    cfg = tiny().replace(subset=None, batch_size=40, seed=seed, **changes)
    images = random_dataset(130, 1, seed=5).train_images  # 3 batches, 10 images dropped
    j_images, t_images = jax.numpy.asarray(images), torch.from_numpy(images)
    for epoch in range(2):
        plan = epoch_plan(cfg, epoch, len(images))
        j_plan = jaug.plan_to_device(plan)
        t_plan = taug.plan_to_device(plan.as_dict(), "cpu")
        for step in range(steps_per_epoch(cfg, len(images))):
            j = np.asarray(jaug.apply_epoch_plan_jit(j_images, j_plan, step, cfg))
            t = taug.apply_plan(t_images, taug.slice_plan(t_plan, step, cfg.batch_size), cfg)
            ref = apply_plan_numpy(images, plan.batch(step, cfg.batch_size), cfg)
            assert j.dtype == np.uint8 and t.dtype == torch.uint8
            np.testing.assert_array_equal(t.numpy(), j)
            np.testing.assert_array_equal(j, ref)


def _record_torch_batches(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    real = taug.apply_plan

    def recording(
        images: torch.Tensor, plan: dict[str, torch.Tensor], cfg: Config, **kw: Any
    ) -> Any:
        out = real(images, plan, cfg, **kw)
        seen.append(out.cpu().numpy().copy())
        return out

    monkeypatch.setattr(taug, "apply_plan", recording)
    return seen


def _record_jax_batches(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Wrap `jaxbench.augment.apply_plan` with an ordered host callback inside the jit."""
    seen: list[np.ndarray] = []
    real = jaug.apply_plan

    def recording(images: Any, plan: Any, cfg: Config) -> Any:
        out = real(images, plan, cfg)
        jax.debug.callback(lambda a: seen.append(np.array(a)), out, ordered=True)
        return out

    monkeypatch.setattr(jaug, "apply_plan", recording)
    return seen


@pytest.mark.slow
def test_trainers_receive_identical_batches_in_shared_mode(
    monkeypatch: pytest.MonkeyPatch, tiny_data: Dataset
) -> None:
    jtrain = pytest.importorskip("jaxbench.train", reason="jaxbench.train not written yet")
    cfg = tiny().replace(
        widths=(4, 8, 8, 8),
        subset=None,
        test_subset=None,
        batch_size=32,
        eval_batch_size=20,
        epochs=2,
        lr_peak_epoch=1.0,
        flip="alternating",  # exercises the once-drawn base flips and the epoch parity
        seed=3,
        loop="step",
    )
    data = tiny_data  # 100 images: 3 steps an epoch, 4 images dropped
    kw: dict[str, Any] = {"data": data, "stream": "shared", "progress": False, "quiet": True}
    t_seen = _record_torch_batches(monkeypatch)
    j_seen = _record_jax_batches(monkeypatch)
    fast.forget_warmups()  # warm up in this test, whatever ran before in the process
    ttrain.train_and_evaluate(cfg, **kw)
    jtrain.train_and_evaluate(cfg, **kw)
    jax.effects_barrier()
    steps = steps_per_epoch(cfg, 100)
    n = cfg.epochs * steps
    assert len(j_seen) == n  # the callback fires once per executed step
    # The torch trainer's warm-up also augments (a throwaway batch); the run's are the last n.
    assert len(t_seen) in (n + 1, n + 2)
    t_seen = t_seen[-n:]
    for i, (t, j) in enumerate(zip(t_seen, j_seen, strict=True)):
        assert t.shape == (cfg.batch_size, 32, 32, 3) and t.dtype == np.uint8
        np.testing.assert_array_equal(t, j, err_msg=f"batch {i} differs")
        epoch, step = divmod(i, steps)
        ref = apply_plan_numpy(data.train_images, epoch_plan(cfg, epoch, 100).batch(step, 32), cfg)
        np.testing.assert_array_equal(t, ref)
    assert not np.array_equal(t_seen[0], t_seen[steps])  # epochs differ


def test_fast_paths_draw_from_the_same_ranges() -> None:
    """Both frameworks' on-device draws cover exactly the shared stream's value ranges."""
    cfg = tiny().replace(subset=None, batch_size=100, crop_pad=3, cutout=6)
    n = 5000
    j = jax.device_get(jaug.draw_plan(jax.random.PRNGKey(0), 0, n, cfg))
    t = taug.draw_plan(torch.Generator().manual_seed(0), 0, n, cfg, "cpu")
    s = epoch_plan(cfg, 0, n).as_dict()
    for name in ("crop_y", "crop_x", "cutout_y", "cutout_x", "flip"):
        support = [set(np.unique(np.asarray(p[name]).astype(np.int64))) for p in (j, t, s)]
        assert support[0] == support[1] == support[2], name
    for p in (j, t, s):
        assert sorted(np.asarray(p["indices"]).tolist()) == list(range(n))
