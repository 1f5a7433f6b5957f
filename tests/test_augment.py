"""On-device augmentation: bit-identical to the numpy reference, and the right distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import augment
from jaxbench.configs import Config
from jaxbench.stream import FILL_RGB, apply_plan_numpy, epoch_plan, normalize_numpy

N = 64


def _images(n: int = N, high: int = 256) -> np.ndarray:
    return np.random.default_rng(0).integers(0, high, (n, 32, 32, 3), dtype=np.uint8)


def _cfg(**kw: object) -> Config:
    return Config(batch_size=32, subset=None, **kw)  # type: ignore[arg-type]


def _neutral_plan(n: int, pad: int, **over: np.ndarray) -> dict[str, np.ndarray]:
    plan = dict(
        indices=np.arange(n, dtype=np.int32),
        crop_y=np.full(n, pad, np.int32),
        crop_x=np.full(n, pad, np.int32),
        flip=np.zeros(n, bool),
        cutout_y=np.zeros(n, np.int32),
        cutout_x=np.zeros(n, np.int32),
    )
    plan.update(over)
    return plan


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"crop_pad": 2, "cutout": 12, "flip": "alternating"},
        {"crop_pad": 0, "cutout": 0, "flip": "none"},
        {"crop_pad": 16, "cutout": 32},
    ],
)
def test_apply_plan_is_bit_identical_to_numpy_reference(kw: dict[str, object]) -> None:
    cfg = _cfg(**kw)
    images = _images()
    for epoch in (0, 1):
        plan = epoch_plan(cfg, epoch, N)
        want = apply_plan_numpy(images, plan, cfg)
        got = np.asarray(augment.apply_plan(jnp.asarray(images), plan, cfg))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        # the jitted per-step path over a device plan gives the same batches
        dev = augment.plan_to_device(plan)
        for step in range(N // cfg.batch_size):
            b = augment.apply_epoch_plan_jit(jnp.asarray(images), dev, step, cfg=cfg)
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            np.testing.assert_array_equal(np.asarray(b), want[sl])


def test_crop_is_a_pure_shift_that_stays_in_bounds() -> None:
    cfg = _cfg(crop_pad=4, cutout=0, flip="none")
    plan = jax.device_get(augment.draw_plan(jax.random.PRNGKey(3), 0, N, cfg))
    assert plan["crop_y"].min() >= 0 and plan["crop_y"].max() <= 8
    assert plan["crop_x"].min() >= 0 and plan["crop_x"].max() <= 8
    assert len(np.unique(plan["crop_y"])) == 9  # every offset reachable
    images = _images()
    out = np.asarray(augment.apply_plan(jnp.asarray(images), plan, cfg))
    for b in range(N):
        dy, dx = plan["crop_y"][b] - 4, plan["crop_x"][b] - 4
        src = images[plan["indices"][b]]
        # the part of the window inside the image is the image shifted by (dy, dx)
        ys, xs = slice(max(0, -dy), 32 - max(0, dy)), slice(max(0, -dx), 32 - max(0, dx))
        ys_src = slice(max(0, dy), 32 + min(0, dy))
        xs_src = slice(max(0, dx), 32 + min(0, dx))
        np.testing.assert_array_equal(out[b][ys, xs], src[ys_src, xs_src])


def test_flip_is_exact() -> None:
    cfg = _cfg(crop_pad=4, cutout=0)
    images = _images(8)
    plan = _neutral_plan(8, 4, flip=np.array([1, 0] * 4, bool))
    out = np.asarray(augment.apply_plan(jnp.asarray(images), plan, cfg))
    np.testing.assert_array_equal(out[0::2], images[0::2, :, ::-1])
    np.testing.assert_array_equal(out[1::2], images[1::2])


def test_cutout_fills_exactly_the_square_with_the_mean() -> None:
    cfg = _cfg(crop_pad=0, cutout=8, flip="none")
    images = _images(N, high=100)  # never equal to FILL_RGB
    plan = jax.device_get(augment.draw_plan(jax.random.PRNGKey(4), 0, N, cfg))
    assert plan["cutout_y"].min() >= 0 and plan["cutout_y"].max() <= 24
    out = np.asarray(augment.apply_plan(jnp.asarray(images), plan, cfg))
    for b in range(N):
        filled = np.all(out[b] == np.asarray(FILL_RGB, np.uint8), axis=-1)
        assert filled.sum() == 64, "cutout must cover exactly 8x8 pixels"
        y, x = plan["cutout_y"][b], plan["cutout_x"][b]
        assert filled[y : y + 8, x : x + 8].all()
        np.testing.assert_array_equal(out[b][~filled], images[plan["indices"][b]][~filled])


def test_draw_plan_is_a_pure_function_of_key_and_epoch() -> None:
    cfg = _cfg()
    draw = jax.jit(lambda k, e: augment.draw_plan(k, e, 100, cfg))
    key = jax.random.PRNGKey(0)
    a, b, c = (jax.device_get(draw(key, e)) for e in (0, 0, 1))
    for f in augment.PLAN_FIELDS:
        np.testing.assert_array_equal(a[f], b[f])
    assert not np.array_equal(a["indices"], c["indices"])
    n = (100 // 32) * 32
    assert a["indices"].shape == (n,) and len(np.unique(a["indices"])) == n
    assert a["indices"].min() >= 0 and a["indices"].max() < 100
    images = jnp.asarray(_images(100))
    np.testing.assert_array_equal(
        augment.apply_plan(images, a, cfg), augment.apply_plan(images, b, cfg)
    )
    other = jax.device_get(draw(jax.random.PRNGKey(1), 0))
    assert not np.array_equal(a["indices"], other["indices"])


def test_draw_plan_flip_distributions() -> None:
    key = jax.random.PRNGKey(5)
    n = 4096
    rand = jax.device_get(augment.draw_plan(key, 0, n, _cfg(flip="random")))
    assert 0.45 < rand["flip"].mean() < 0.55
    assert not np.any(jax.device_get(augment.draw_plan(key, 0, n, _cfg(flip="none")))["flip"])
    alt = _cfg(flip="alternating")
    per_image = []
    for epoch in range(3):
        p = jax.device_get(augment.draw_plan(key, epoch, n, alt))
        f = np.zeros(n, bool)
        f[p["indices"]] = p["flip"]
        per_image.append(f)
    assert 0.45 < per_image[0].mean() < 0.55
    np.testing.assert_array_equal(per_image[1], ~per_image[0])  # odd epochs flip the rest
    np.testing.assert_array_equal(per_image[2], per_image[0])


def test_normalize_matches_numpy() -> None:
    images = _images(4)
    np.testing.assert_allclose(
        augment.normalize(jnp.asarray(images)), normalize_numpy(images), rtol=1e-6, atol=1e-6
    )
    assert augment.normalize(jnp.asarray(images), dtype=jnp.bfloat16).dtype == jnp.bfloat16
