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
from helpers import random_dataset, random_images

from jaxbench.configs import Config, tiny
from jaxbench.data import Dataset
from jaxbench.stream import (
    apply_plan_numpy,
    epoch_plan,
    jitter_numpy,
    normalize_numpy,
    steps_per_epoch,
)
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


# The record's colour jitter (cifar10_speedrun.py: brightness_range, contrast_range)
JITTER = {"jitter_brightness": 0.1399, "jitter_contrast": 0.1308}
GEOMETRY = ("indices", "crop_y", "crop_x", "flip", "cutout_y", "cutout_x")


def _draws(cfg: Config, n: int) -> list[dict[str, np.ndarray]]:
    """One epoch's plan from the shared stream and from each framework's device generator."""
    j = jax.device_get(jaug.draw_plan(jax.random.PRNGKey(0), 1, n, cfg))
    t = taug.draw_plan(torch.Generator().manual_seed(0), 1, n, cfg, "cpu")
    return [epoch_plan(cfg, 1, n).as_dict(), j, {k: v.numpy() for k, v in t.items()}]


def test_jitter_is_drawn_last_in_its_ranges() -> None:
    """Jitter changes no other draw of any plan; off, its factors are exactly 0 and 1; on,
    they fill [-B, B) and [1 - C, 1 + C) as float32."""
    cfg = tiny().replace(subset=None, batch_size=100)
    n = 2000
    for plain, jittered in zip(_draws(cfg, n), _draws(cfg.replace(**JITTER), n), strict=True):
        for name in GEOMETRY:
            np.testing.assert_array_equal(np.asarray(plain[name]), np.asarray(jittered[name]))
        assert not np.asarray(plain["brightness"]).any()
        assert (np.asarray(plain["contrast"]) == 1).all()
        b = np.asarray(jittered["brightness"], np.float64) / JITTER["jitter_brightness"]
        c = (np.asarray(jittered["contrast"], np.float64) - 1) / JITTER["jitter_contrast"]
        assert np.asarray(jittered["brightness"]).dtype == np.float32
        for x in (b, c):  # 2000 uniform draws reach within 1% of both ends
            assert -1.0 - 1e-6 <= x.min() < -0.99 and 0.99 < x.max() <= 1.0 + 1e-6
            assert abs(x.mean()) < 0.1  # centred (sd of the mean of 2000: 0.013)


@pytest.mark.parametrize("seed", [0, 1])
def test_jittered_inputs_agree_across_frameworks(seed: int) -> None:
    """The jitter of the same float32 images: JAX, torch and numpy bit for bit. Each
    trainer's whole input (its normalisation, then the jitter): numpy's to float32 rounding,
    as the normalisation alone is (XLA and torch round `x / 255` apart by an ulp)."""
    cfg = tiny().replace(subset=None, batch_size=64, seed=seed, **JITTER)
    images = random_images(200, seed=seed)
    bp = epoch_plan(cfg, seed, 200).batch(1, 64)
    u8 = apply_plan_numpy(images, bp, cfg)
    x = normalize_numpy(u8)
    ref = jitter_numpy(x, bp.brightness, bp.contrast)
    b, c = jaug.plan_jitter(bp, cfg)
    tb, tc = taug.plan_jitter(taug.plan_to_device(bp.as_dict(), "cpu"), cfg)
    np.testing.assert_array_equal(np.asarray(jaug.color_jitter(jax.numpy.asarray(x), b, c)), ref)
    np.testing.assert_array_equal(taug.color_jitter(torch.as_tensor(x), tb, tc).numpy(), ref)
    j = np.asarray(jaug.normalize(jax.numpy.asarray(u8), jitter=(b, c)))
    mean, std = taug.device_stats("cifar10", torch.device("cpu"))
    t = taug.normalize(torch.as_tensor(u8), mean, std, jitter=(tb, tc))
    t = t.permute(0, 2, 3, 1).numpy()
    assert j.dtype == t.dtype == np.float32
    np.testing.assert_allclose(j, ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(t, ref, rtol=1e-6, atol=2e-6)
    assert np.abs(ref - x).max() > 0.1  # the jitter is there


def test_both_trainers_train_on_the_jittered_batch(tiny_data: Dataset) -> None:
    """Each trainer's own loss on the same weights and batch: jitter on, the two agree to
    float32 noise, ten times closer than either is to the loss without jitter."""
    jtrain = pytest.importorskip("jaxbench.train")
    from jaxbench import models
    from parity.convert import flax_to_torch
    from torch_ref import model as tmodel

    cfg = tiny().replace(widths=(4, 8, 8, 8), subset=None, batch_size=32, **JITTER)
    bp = epoch_plan(cfg, 0, 100).batch(0, 32)
    u8 = apply_plan_numpy(tiny_data.train_images, bp, cfg)
    labels = tiny_data.train_labels[bp.indices]
    net = models.model_from_config(cfg)
    v = models.init_variables(net, jax.random.PRNGKey(0))
    loss_fn = jtrain.make_loss_fn(cfg, net)
    tnet = tmodel.model_from_config(cfg)
    tnet.load_state_dict(flax_to_torch(v))
    mean, std = taug.device_stats("cifar10", torch.device("cpu"))
    tplan = taug.plan_to_device(bp.as_dict(), "cpu")
    losses = {}
    for name, jitter in (("on", jaug.plan_jitter(bp, cfg)), ("off", None)):
        jl, _ = loss_fn(v["params"], v["batch_stats"], jax.numpy.asarray(u8), labels, jitter)
        tj = taug.plan_jitter(tplan, cfg) if jitter is not None else None
        kw = {"label_smoothing": cfg.label_smoothing, "reduction": cfg.loss_reduction}
        tl, _, _ = ttrain.train_forward(
            tnet, torch.as_tensor(u8), torch.as_tensor(labels).long(), mean, std,
            bf16=False, jitter=tj, **kw,
        )  # fmt: skip
        losses[name] = (float(jl), float(tl.detach()))
        assert abs(losses[name][0] - losses[name][1]) <= 1e-5 * abs(losses[name][1])
    apart = max(abs(a - b) for a, b in losses.values())
    assert abs(losses["on"][0] - losses["off"][0]) > 10 * apart
    assert abs(losses["on"][1] - losses["off"][1]) > 10 * apart
