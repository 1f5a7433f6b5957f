"""Optimizer, LR schedule, loss and EMA against the formulas of docs/design.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbench import optim
from jaxbench.configs import Config, check_supported, get_config, optimizer_scales
from jaxbench.schedule import lr_at, lr_knots, whiten_bias_lr_knots

STEPS_PER_EPOCH = 97


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "prep": {
            "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
            "bn": {
                "scale": jnp.asarray(rng.normal(size=4), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
            },
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)},
    }


@pytest.mark.parametrize(
    "cfg",
    [
        Config(),
        Config(epochs=4, lr_peak_epoch=1.0, batch_size=250, lr_start=0.1, lr_end=0.05),
        Config(loss_reduction="mean", lr=1.7, lr_peak_epoch=0.3, epochs=3),
    ],
)
def test_schedule_matches_lr_at_at_every_step(cfg: Config) -> None:
    total = cfg.epochs * STEPS_PER_EPOCH
    t = np.arange(total + 3)
    got = np.asarray(jax.vmap(optim.lr_schedule(cfg, STEPS_PER_EPOCH))(jnp.asarray(t)))
    want = lr_at(t, cfg, STEPS_PER_EPOCH)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_schedule_key_steps() -> None:
    cfg = Config(lr=0.4, batch_size=512, epochs=10, lr_peak_epoch=2.0)
    sched = optim.lr_schedule(cfg, 100)
    assert float(sched(0)) == 0.0
    assert float(sched(200)) == pytest.approx(0.4 / 512, rel=1e-7)
    assert float(sched(100)) == pytest.approx(0.2 / 512, rel=1e-6)
    assert float(sched(600)) == pytest.approx(0.2 / 512, rel=1e-6)
    assert float(sched(1000)) == 0.0
    assert lr_knots(cfg, 100)[0] == [0, 200, 1000]


def test_update_t_uses_lr_at_t_and_bn_bias_multiplier() -> None:
    cfg = Config(momentum=0.0, weight_decay=0.0, bn_bias_lr_mult=64.0, epochs=2, lr_peak_epoch=1)
    steps = 5
    tx = optim.make_optimizer(cfg, steps)
    params = _params()
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for t in range(2 * steps):
        updates, state = tx.update(grads, state, params)
        lr = lr_at(t, cfg, steps)
        np.testing.assert_allclose(updates["head"]["kernel"], -lr, rtol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(updates["prep"]["bn"]["bias"], -64 * lr, rtol=1e-6)
        np.testing.assert_allclose(updates["prep"]["bn"]["scale"], -lr, rtol=1e-6)


def test_nesterov_sgd_with_coupled_decay_matches_the_pytorch_formula() -> None:
    """buf = m * buf + (g + wd * w); step = g' + m * buf; w -= lr_t * step; BN-bias multipliers."""
    cfg = Config(epochs=2, lr_peak_epoch=1, bn_bias_lr_mult=4.0, bn_bias_wd_mult=0.25)
    steps = 3
    lr0, wd = optimizer_scales(cfg)
    tx = optim.make_optimizer(cfg, steps)
    params = _params()
    state = tx.init(params)
    ref = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    bufs = jax.tree_util.tree_map(np.zeros_like, ref)
    labels = optim.param_labels(params)
    assert labels["prep"]["bn"]["bias"] == "bn_bias" and labels["prep"]["bn"]["scale"] == "default"
    rng = np.random.default_rng(1)
    for t in range(2 * steps):
        grads = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape), ref)
        updates, state = tx.update(
            jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.float32), grads), state, params
        )
        params = optax.apply_updates(params, updates)

        def ref_step(path, w, g, buf, t=t):
            bn_bias = optim.is_bn_bias(tuple(k.key for k in path))
            g = g + wd * (cfg.bn_bias_wd_mult if bn_bias else 1.0) * w
            buf[...] = cfg.momentum * buf + g
            step = g + cfg.momentum * buf
            lr = lr_at(t, cfg, steps) * (cfg.bn_bias_lr_mult if bn_bias else 1.0)
            return w - lr * step

        ref = jax.tree_util.tree_map_with_path(ref_step, ref, grads, bufs)
    assert lr0 > 0
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(ref), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_cross_entropy_label_smoothing_and_reduction() -> None:
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(6, 10)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 4, 9])
    logp = np.asarray(jax.nn.log_softmax(logits))
    target = np.full((6, 10), 0.2 / 10)
    target[np.arange(6), np.asarray(labels)] += 0.8
    per = -(target * logp).sum(-1)
    mean = optim.cross_entropy(logits, labels, 0.2, "mean")
    total = optim.cross_entropy(logits, labels, 0.2, "sum")
    assert float(mean) == pytest.approx(per.mean(), rel=1e-6)
    assert float(total) == pytest.approx(per.sum(), rel=1e-6)
    plain = optim.cross_entropy(logits, labels)
    assert float(plain) == pytest.approx(-logp[np.arange(6), np.asarray(labels)].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        optim.cross_entropy(logits, labels, reduction="none")


def test_ema_update_arithmetic() -> None:
    ema = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
    new = {"a": jnp.asarray([3.0, -2.0]), "b": {"c": jnp.asarray(0.0)}}
    out = optim.ema_update(ema, new, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.0], rtol=1e-7)
    np.testing.assert_allclose(out["b"]["c"], 3.0, rtol=1e-7)


def test_ema_updates_only_after_every_kth_step() -> None:
    cfg = Config(ema_every=5, ema_momentum=0.5)
    ema, w = {"x": jnp.asarray(0.0)}, {"x": jnp.asarray(8.0)}
    for step, want in [(1, 0.0), (4, 0.0), (5, 4.0), (10, 4.0), (11, 0.0)]:
        got = optim.maybe_ema_update(ema, w, jnp.asarray(step), cfg)["x"]
        assert float(got) == want, f"step {step}"
    off = optim.maybe_ema_update(ema, w, jnp.asarray(5), Config(ema_every=0))
    assert float(off["x"]) == 0.0


def test_linear_schedule_is_airbench94_muon() -> None:
    """`lr_schedule="linear"`: update t at `peak * (1 - t / total)` (the source's formula),
    in optax and in the reference; the whitening bias's own LR falls to zero at its freeze."""
    cfg = get_config("speedrun_muon")
    steps = 25  # 50,000 images / batch 2000
    total = cfg.epochs * steps
    assert total == 200 and lr_knots(cfg, steps) == ([0, total], [0.67, 0.0])
    t = np.arange(total)
    want = 0.67 * (1 - t / total)
    np.testing.assert_allclose(lr_at(t, cfg, steps), want, rtol=1e-13, atol=0)
    got = np.asarray(jax.vmap(optim.lr_schedule(cfg, steps))(jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    xs, ys = whiten_bias_lr_knots(cfg, steps)
    assert xs == [0, 75] and ys[0] == pytest.approx(0.053, rel=1e-15) and ys[1] == 0.0
    # one-cycle presets keep their knots
    assert lr_knots(get_config("speedrun"), 48)[0] == [0, 110, 480]


def test_muon_field_validation() -> None:
    """Bad Muon fields are refused with the flag's name; Muon is the speedrun net's only."""
    cfg = get_config("speedrun_muon")
    for changes, flag in [
        ({"optimizer": "adam"}, "--optimizer"),
        ({"muon_lr": 0.0}, "--muon-lr"),
        ({"muon_momentum": 1.0}, "--muon-momentum"),
        ({"lr_schedule": "cosine"}, "--lr-schedule"),
    ]:
        with pytest.raises(ValueError, match=flag):
            cfg.replace(**changes)
    with pytest.raises(ValueError, match="--optimizer"):
        check_supported(Config(optimizer="muon"), "jaxbench")
