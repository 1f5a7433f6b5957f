"""Check 4: the LR schedule, K optimizer updates and the EMA; Muon against its float64 reference.

Muon runs the model's conv filters and one gradient sequence through both recipes (`jaxbench.muon`)
as the float64 reference, the optax transform and the torch optimizer. The bar is measured in the
same run: each framework within `MUON_HEADROOM` x the reference's own float32 noise (measured
0.2-2.7x; the Newton-Schulz and update-scale plants land 1e4x above it).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jaxbench import muon, optim, schedule
from jaxbench.configs import Config, optimizer_scales
from jaxbench.optim_muon import is_muon_param
from jaxbench.stream import steps_per_epoch
from parity import convert
from parity.checks.base import CheckResult, Context, Figure, PyTree, max_abs, path_keys
from parity.harness import Harness
from torch_ref import optim as toptim


def _lr_figure(h: Harness, cfg: Config, spe: int) -> tuple[float, dict[str, Any]]:
    """max over every step of |jax LR - torch LR| / peak LR, torch's as torch_ref sets it."""
    total = schedule.train_steps(cfg, spe)
    steps = np.arange(total)
    lr_fn = jax.jit(jax.vmap(h.jax_lr(cfg, spe)))
    jax_lr = np.asarray(lr_fn(jnp.asarray(steps, jnp.int32)), np.float64)
    opt = torch.optim.SGD([{"params": torch.nn.Linear(1, 1).parameters(), "lr_mult": 1.0}], lr=0.0)
    torch_lr = np.empty(total)
    for t, lr in enumerate(schedule.lr_at(steps, cfg, spe)):
        toptim.set_lr(opt, float(lr))
        torch_lr[t] = opt.param_groups[0]["lr"]
    peak = optimizer_scales(cfg)[0]
    diff = np.abs(jax_lr - torch_lr) / peak
    worst = int(np.argmax(diff))
    return float(diff[worst]), {
        "steps": total,
        "worst_step": worst,
        "jax_lr_at_worst": float(jax_lr[worst]),
        "torch_lr_at_worst": float(torch_lr[worst]),
        "peak_step": schedule.lr_knots(cfg, spe)[0][1],
    }


def _torch_start(h: Harness, cfg: Config, seed: int) -> torch.nn.Module:
    """torch_ref's model for `seed` with the BN scales and biases moved away from their init
    (1, 0), so that weight decay on them is as large as on any other weight from step 1 on."""
    tmodel = h.torch_model(cfg, seed)
    bn_rng = np.random.default_rng(seed + 100)
    with torch.no_grad():
        for p in tmodel.parameters():
            if p.ndim == 1:
                p.copy_(torch.from_numpy(bn_rng.uniform(0.5, 1.5, p.shape).astype(np.float32)))
    return tmodel


def _random_grads(cfg: Config, params: PyTree, rng: np.random.Generator) -> PyTree:
    """Gradients that move every tensor ~1e-2 per peak-LR step (divided by the LR multiplier
    of the BN biases, and of the whitening bias where it takes their LR), so the weights stay
    near 1 and float32 rounding far below the 1e-6 bar."""
    gscale = 1e-2 / optimizer_scales(cfg)[0]

    def grad(path: Any, p: Any) -> np.ndarray:
        keys = path_keys(path)
        own = cfg.whiten_bias_own_lr and keys[-2:] == ("whiten", "bias")
        mult = cfg.bn_bias_lr_mult if optim.is_bn_bias(keys) or own else 1.0
        return (gscale / mult * rng.standard_normal(np.shape(p))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(grad, params)


def _torch_diffs(tree: PyTree, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |diff| per float tensor of torch's `tensors` against the Flax `tree`, converted."""
    back = convert.flax_to_torch(jax.device_get(tree))
    return {
        k: max_abs(back[k].numpy(), v.detach().numpy()) if k in back else math.inf
        for k, v in tensors.items()
        if v.is_floating_point()
    }


def _optimizer_run(h: Harness, cfg: Config, spe: int, steps: int, seed: int) -> dict[str, Any]:
    """`steps` updates from the same params and gradients, live BN stats changed identically
    every step (for the EMA of BN statistics): per-tensor max |diff|."""
    tmodel = _torch_start(h, cfg, seed)
    variables = convert.torch_to_flax({k: v.clone() for k, v in tmodel.state_dict().items()})
    params, bstats = variables["params"], variables["batch_stats"]
    tx = h.jax_optimizer(cfg, spe)
    opt_state = tx.init(params)

    @jax.jit
    def update(grads: PyTree, opt_state: PyTree, params: PyTree) -> tuple[PyTree, PyTree]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    ema_state = h.jax_ema.init({"params": params, "batch_stats": bstats})
    # airbench's lookahead (speedrun): the decay ramp over these `steps`, so it is large
    # enough to matter, and after each EMA step the live net (params and BN stats) = EMA.
    lookahead_ema = jax.tree_util.tree_map(jnp.array, {"params": params, "batch_stats": bstats})
    decays = schedule.ema_decays(cfg, steps)
    topt, t_ema = toptim.make_optimizer(tmodel, cfg, None, spe), copy.deepcopy(tmodel)
    lrs = schedule.lr_at(np.arange(schedule.train_steps(cfg, spe)), cfg, spe)
    rng = np.random.default_rng(seed)
    named, buffers = dict(tmodel.named_parameters()), dict(tmodel.named_buffers())
    for t in range(steps):
        grads = _random_grads(cfg, params, rng)
        params, opt_state = update(grads, opt_state, params)
        g_torch = convert.flax_to_torch({"params": grads})
        toptim.set_lr(topt, float(lrs[t]))
        for name, p in named.items():
            if p.requires_grad:  # frozen (speedrun's whitening): no grad, SGD skips it
                p.grad = g_torch[name].clone()
        topt.step()
        topt.zero_grad(set_to_none=True)
        # New live BN statistics, the same numbers in both (raw: the EMA is linear).
        bstats = jax.tree_util.tree_map(
            lambda s: rng.uniform(0.5, 2.0, np.shape(s)).astype(np.float32), bstats
        )
        for key, val in convert.flax_to_torch({"batch_stats": bstats}).items():
            if key in buffers and buffers[key].is_floating_point():
                with torch.no_grad():
                    buffers[key].copy_(val)
        live = {"params": params, "batch_stats": bstats}
        if cfg.lookahead:
            step = jnp.asarray(t + 1, jnp.int32)
            lookahead_ema, live = optim.lookahead_update(lookahead_ema, live, step, cfg, steps)
            params, bstats = live["params"], live["batch_stats"]
        else:
            ema_state = h.jax_ema.update(ema_state, live, t + 1, cfg)
        if cfg.ema_every and (t + 1) % cfg.ema_every == 0:
            m = float(decays[t + 1]) if cfg.lookahead else cfg.ema_momentum
            toptim.ema_update(toptim.ema_tensors(t_ema), toptim.ema_tensors(tmodel), m)
            if cfg.lookahead:
                toptim.lookahead_reset(toptim.ema_tensors(tmodel), toptim.ema_tensors(t_ema))
    # The live BN statistics: rewritten every step, so they differ only if a lookahead
    # reset (or its absence) touched them.
    diffs = _torch_diffs({"params": params, "batch_stats": bstats}, {**named, **buffers})
    ema = lookahead_ema if cfg.lookahead else h.jax_ema.read(ema_state)
    return {"params": diffs, "ema": _torch_diffs(ema, t_ema.state_dict())}


# Each recipe's total updates, which set the record's magnitude ramp and normalisation
# interval: ceil(8 * 25) (airbench94_muon, batch 2000), ceil(7.59 * 32) (the record, 1536).
MUON_RECIPES = {"airbench94_muon": (muon.AIRBENCH94_MUON, 200), "record": (muon.RECORD, 243)}
MUON_HEADROOM = 10.0  # x the float32 noise of the reference itself (module doc)
Filters = dict[str, np.ndarray]  # OIHW conv filters by name
PerFilter = dict[str, list[np.ndarray]]  # per filter: its gradients, or its weights after each step


def _muon_lr(spec: muon.MuonSpec, count: Any, total: int) -> Any:
    """Both recipes' LR at update `count` (from 0): linear to zero over the run."""
    return spec.lr * (1 - count / total)


def _muon_reference(
    spec: muon.MuonSpec, total: int, w0: np.ndarray, grads: list[np.ndarray], dtype: type
) -> list[np.ndarray]:
    """The weights before and after each update, by `jaxbench.muon` in `dtype`."""
    w, buf = w0.astype(dtype), muon.zero_buffer(w0.shape, spec)
    out = [w]
    for t, g in enumerate(grads, start=1):
        lr = _muon_lr(spec, t - 1, total)
        w, buf = muon.muon_update(
            w, g, buf, step=t, lr=lr, total_steps=total, spec=spec, dtype=dtype
        )
        out.append(w)
    return out


def _muon_jax(
    h: Harness, spec: muon.MuonSpec, total: int, filters: Filters, grads: PerFilter
) -> PerFilter:
    """The same updates through the optax Muon, all filters at once (HWIO), back in OIHW."""
    tx = h.jax_muon(spec, lambda count: _muon_lr(spec, count, total), total)
    hwio = lambda x: jnp.asarray(x.transpose(2, 3, 1, 0), jnp.float32)  # noqa: E731
    params = {k: hwio(w) for k, w in filters.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    out = {k: [w.astype(np.float32)] for k, w in filters.items()}
    for t in range(len(next(iter(grads.values())))):
        updates, state = update({k: hwio(g[t]) for k, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k, w in params.items():
            out[k].append(np.asarray(w).transpose(3, 2, 0, 1))
    return out


def _muon_torch(
    h: Harness, spec: muon.MuonSpec, total: int, filters: Filters, grads: PerFilter
) -> PerFilter:
    """The same updates through the torch Muon, all filters at once (OIHW)."""
    params = {
        k: torch.nn.Parameter(torch.tensor(w, dtype=torch.float32)) for k, w in filters.items()
    }
    opt = h.torch_muon(list(params.values()), spec, total)
    out = {k: [w.astype(np.float32)] for k, w in filters.items()}
    for t in range(len(next(iter(grads.values())))):
        opt.param_groups[0]["lr"] = _muon_lr(spec, t, total)
        for k, p in params.items():
            p.grad = torch.tensor(grads[k][t], dtype=torch.float32)
        opt.step()
        for k, p in params.items():
            out[k].append(p.detach().numpy().copy())
    return out


def _update_error(run: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Worst relative error of an update (weights after minus before) over the run."""
    return max(
        float(np.linalg.norm((a1 - a0) - (b1 - b0)) / np.linalg.norm(b1 - b0))
        for a0, a1, b0, b1 in zip(run, run[1:], reference, reference[1:], strict=False)
    )


def muon_figures(h: Harness, cfg: Config, steps: int, seed: int) -> tuple[list[Figure], dict]:
    """Both recipes' Muon on the model's conv filters: each framework's updates within
    MUON_HEADROOM x the float32 noise of the reference, and jax against torch within twice
    that (each is within it of the reference), worst filter and step."""
    variables = h.to_flax(h.torch_model(cfg, seed).state_dict())
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    filters = {  # OIHW, float32 values
        ".".join(path_keys(path)): np.asarray(w).transpose(3, 2, 0, 1).astype(np.float64)
        for path, w in flat
        if is_muon_param(path_keys(path), w)
    }
    rng = np.random.default_rng(seed)
    grads = {  # float32 values, `steps` per filter
        k: list(rng.standard_normal((steps, *w.shape)).astype(np.float32).astype(np.float64))
        for k, w in filters.items()
    }
    figures, details = [], {}
    for recipe, (spec, total) in MUON_RECIPES.items():
        runs = {"jax": _muon_jax(h, spec, total, filters, grads)}
        runs["torch"] = _muon_torch(h, spec, total, filters, grads)
        rows = {}
        for k, w0 in filters.items():
            ref = _muon_reference(spec, total, w0, grads[k], np.float64)
            noise = _update_error(_muon_reference(spec, total, w0, grads[k], np.float32), ref)
            rows[k] = {
                "float32 noise": noise,
                "jax": _update_error(runs["jax"][k], ref),
                "torch": _update_error(runs["torch"][k], ref),
                "jax vs torch": _update_error(runs["jax"][k], runs["torch"][k]),
            }
        details[recipe] = rows
        for who, bar in (("jax", 1.0), ("torch", 1.0), ("jax vs torch", 2.0)):
            ratio = {
                k: r[who] / (bar * MUON_HEADROOM * r["float32 noise"]) for k, r in rows.items()
            }
            worst = max(ratio, key=lambda k: ratio[k])
            against = "torch" if who == "jax vs torch" else "float64"
            name = f"Muon ({recipe}) {who}: update error vs {against} / "
            name += f"({bar * MUON_HEADROOM:g} x float32 noise), worst ({worst})"
            figures.append(Figure(name, ratio[worst], 1.0))
    return figures, details


def check_optimizer(ctx: Context) -> CheckResult:
    """LR at every step; K updates (preset and BN-bias multipliers) within 1e-6; the EMA;
    both recipes' Muon against the float64 reference (module doc)."""
    res = CheckResult(4, "optimizer")
    h, cfg = ctx.harness, ctx.arith_cfg
    spe = steps_per_epoch(cfg, cfg.subset or 50_000)
    lr_diff, lr_info = _lr_figure(h, cfg, spe)
    res.figures.append(Figure("LR max |diff| / peak over all steps", lr_diff, 1e-6))
    k = 12 if ctx.quick else 25
    multipliers = cfg.replace(bn_bias_lr_mult=64.0, bn_bias_wd_mult=1 / 64)
    variants = {"preset": cfg, "bn-bias multipliers 64x lr, 1/64 wd": multipliers}
    runs: dict[str, Any] = {}
    for label, c in variants.items():
        runs[label] = run = _optimizer_run(h, c, spe, k, seed=2)
        for part, what in (("params", "params"), ("ema", "EMA")):
            value = max(run[part].values())
            res.figures.append(Figure(f"{what} after {k} steps ({label}): max |diff|", value, 1e-6))
    muon_steps = 3 if ctx.quick else 5
    figures, muon_rows = muon_figures(h, cfg, muon_steps, seed=4)
    res.figures += figures
    res.details = {
        "steps": k,
        "steps_per_epoch": spe,
        "lr": lr_info,
        "runs": runs,
        "muon": {"steps": muon_steps, "update_relative_error": muon_rows},
    }
    return res
