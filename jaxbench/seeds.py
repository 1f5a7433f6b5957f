"""Many seeds in one compiled program: `jax.vmap` over the train state and the stream.

K independent runs of one config (each its own init, data order and augmentation,
from its own seed, exactly as `jaxbench.train` draws them) share every launch:
the step (or the scanned epoch), the plan draw and the evaluation are the single
run's functions vmapped over a leading seed axis, so a small net fills a large
device. The training images and the whitening kernel (which depends on the data
only) are shared. Each seed's numbers equal its single run's within float32
tolerance (`tests/test_seeds.py`); what changes is the order of float sums
inside batched kernels, not the mathematics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import augment, layers, models, optim
from jaxbench.configs import Config
from jaxbench.report import environment
from jaxbench.train import (
    _eval_zeros,
    _pad_to,
    _set_whitening,
    check_supported,
    create_train_state,
    host_arrays,
    make_eval_fn,
    make_loop_fns,
    resolve_loop,
    seed_keys,
)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def train_seeds(cfg: Config, seeds: Sequence[int], data: Any = None) -> dict[str, Any]:
    """Train `cfg` once per seed in `seeds`, all in one program; evaluate each.

    Returns {"seeds": [one dict per seed: seed, final (the single run's keys),
    epochs (rows), step_losses], "total_time_seconds" (the whole program: steps
    and the final evaluation, compilation excluded), "compile_seconds", "loop",
    "environment"}. Monitoring evaluations follow `cfg.eval_every`, off the clock.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--vmap-seeds needs distinct seeds, got {seeds}")
    if cfg.devices > 1:
        raise ValueError("--vmap-seeds trains on one device; drop --devices or set it to 1")
    cfg = cfg.replace(devices=1)  # the seeds share one device
    check_supported(cfg)
    if cfg.lookahead:
        raise ValueError("--vmap-seeds does not implement --lookahead (its final net = EMA)")
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
    train_x, train_y, test_x, test_y, steps = host_arrays(cfg, data)
    n_train, n_test = len(train_x), len(test_x)
    loop = resolve_loop(cfg)
    with_ema = cfg.ema_every > 0
    model = models.model_from_config(cfg)
    tx = optim.make_optimizer(cfg, steps)
    keys = [seed_keys(s) for s in seeds]
    images, labels = jax.device_put(train_x), jax.device_put(train_y)
    eval_batch = min(cfg.eval_batch_size, n_test)
    eval_steps = math.ceil(n_test / eval_batch)
    padded = eval_steps * eval_batch
    t_images = jax.device_put(_pad_to(test_x, padded))
    t_labels = jax.device_put(_pad_to(test_y, padded))
    t_valid = jax.device_put(_pad_to(np.ones(n_test, np.float32), padded))

    t0 = time.perf_counter()
    step_fn, epoch_fn = make_loop_fns(cfg, model, tx, cfg.epochs * steps)
    draw = jax.jit(jax.vmap(lambda k, e: augment.draw_plan(k, e, n_train, cfg), in_axes=(0, None)))
    if loop == "scan":
        run = jax.jit(jax.vmap(epoch_fn, in_axes=(0, None, None, 0)), donate_argnums=0)
    else:
        run = jax.jit(jax.vmap(step_fn, in_axes=(0, None, None, 0, None)), donate_argnums=0)
    evaluate_batch = jax.jit(
        jax.vmap(
            make_eval_fn(cfg, model, eval_batch, with_ema),
            in_axes=(0, 0, 0, None, None, None, None),
        )
    )
    states = [create_train_state(model, tx, init_key) for init_key, _ in keys]
    timed = 0.0
    patch = layers.whiten_patch(cfg)
    if patch:  # data-dependent, seed-independent: one kernel for every seed, on the clock
        whiten_n = min(cfg.whiten_images, n_train)
        moments = jax.jit(lambda x: layers.patch_moment_groups(x[:whiten_n], patch))
        t_w = time.perf_counter()
        states = [_set_whitening(s, moments, images, cfg) for s in states]
        jax.block_until_ready(states)
        timed += time.perf_counter() - t_w
    state = _stack(states)
    data_keys = jnp.stack([dk for _, dk in keys])
    # compile ahead of time, on copies (the state is donated)
    plan0 = draw(data_keys, np.int32(0))
    if loop == "scan":
        run = run.lower(state, images, labels, plan0).compile()
    else:
        run = run.lower(state, images, labels, plan0, np.int32(0)).compile()
    zero = jax.tree_util.tree_map(
        lambda z: jnp.zeros((len(seeds),), z.dtype), _eval_zeros(with_ema)
    )
    evaluate_batch = evaluate_batch.lower(
        zero, state.variables(), state.ema, t_images, t_labels, t_valid, np.int32(0)
    ).compile()
    compile_seconds = time.perf_counter() - t0 - timed

    def evaluate(st: Any) -> list[dict[str, float | None]]:
        acc = zero
        for i in range(eval_steps):
            acc = evaluate_batch(acc, st.variables(), st.ema, t_images, t_labels, t_valid,
                                 np.int32(i))  # fmt: skip
        acc = jax.device_get(acc)
        return [
            {
                "val_loss": float(acc["loss"][k]) / n_test,
                "val_acc": float(acc["correct"][k]) / n_test,
                "ema_val_acc": float(acc["ema_correct"][k]) / n_test if with_ema else None,
            }
            for k in range(len(seeds))
        ]

    rows: list[list[dict[str, Any]]] = [[] for _ in seeds]
    losses: list[list[float]] = [[] for _ in seeds]
    for epoch in range(cfg.epochs):
        t_e = time.perf_counter()
        plan = draw(data_keys, np.int32(epoch))
        if loop == "scan":
            state, metrics = run(state, images, labels, plan)
            jax.block_until_ready(state)
            host = jax.device_get(metrics)  # (K, steps)
        else:
            per_step = []
            for i in range(steps):
                state, m = run(state, images, labels, plan, np.int32(i))
                per_step.append(m)
            jax.block_until_ready(state)
            fetched = jax.device_get(per_step)
            host = {k: np.stack([m[k] for m in fetched], axis=1) for k in fetched[0]}
        timed += time.perf_counter() - t_e
        last = epoch == cfg.epochs - 1
        scores: list[dict[str, Any]] | None = None
        if last or (epoch + 1) % cfg.eval_every == 0:
            t_v = time.perf_counter()
            scores = evaluate(state)
            if last:
                timed += time.perf_counter() - t_v
        for k in range(len(seeds)):
            seed_losses = np.asarray(host["loss"][k], np.float64)
            losses[k].extend(float(v) for v in seed_losses)
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": float(seed_losses.mean()),
                "train_acc": float(np.sum(host["correct"][k])) / (steps * cfg.batch_size),
            }
            row.update(scores[k] if scores else {"val_loss": None, "val_acc": None,
                                                 "ema_val_acc": None})  # fmt: skip
            rows[k].append(row)
    return {
        "seeds": [
            {
                "seed": s,
                "final": {
                    key: rows[k][-1][key]
                    for key in ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc")
                },
                "epochs": rows[k],
                "step_losses": losses[k],
            }
            for k, s in enumerate(seeds)
        ],  # fmt: skip
        "total_time_seconds": timed,
        "compile_seconds": compile_seconds,
        "loop": loop,
        "n_train": n_train,
        "n_test": n_test,
        "steps_per_epoch": steps,
        "environment": environment(("jax",)),
        "config": cfg.to_dict(),
        "framework": "jax",
    }
