"""Check 2: forward outputs, activations, BN running statistics and conv padding."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import torch
import torch.nn.functional as F

from parity.checks.base import (
    CheckResult,
    Context,
    Figure,
    PyTree,
    leaves,
    max_abs,
    nchw,
    sample_batch,
    to_nhwc,
)


def _flax_conv_configs(model: Any, variables: PyTree, x: np.ndarray) -> dict[str, Any]:
    """Kernel size, strides and padding of every nn.Conv the Flax model calls, by torch name."""
    seen: dict[str, Any] = {}

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        m = context.module
        if isinstance(m, nn.Conv) and context.method_name == "__call__":
            seen[".".join(m.path)] = (m.kernel_size, m.strides, m.padding)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):  # tracing is enough: nothing is computed
        jax.eval_shape(lambda v, xb: model.apply(v, xb, train=False), variables, x)
    return seen


def _padding_probe(
    fconfigs: dict[str, Any], tmodel: torch.nn.Module, seed: int
) -> dict[str, float]:
    """Each conv layer re-run at stride 2 on an even-sized input, in both frameworks: at stride
    1 XLA's 'SAME' equals PyTorch's symmetric padding, at stride 2 it pads (0, 1), not (1, 1)."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    modules = dict(tmodel.named_modules())
    probes: dict[str, tuple[nn.Conv, np.ndarray, np.ndarray]] = {}
    refs: dict[str, np.ndarray] = {}
    for name, (ksize, _, padding) in fconfigs.items():
        tconv = modules.get(name)
        if not isinstance(tconv, torch.nn.Conv2d) or isinstance(tconv.padding, str):
            out[name] = math.inf  # missing, or torch 'same' (no stride-2 form): not comparable
            continue
        w = tconv.weight.detach().numpy()
        x = rng.standard_normal((2, 8, 8, w.shape[1])).astype(np.float32)
        with torch.no_grad():
            t = F.conv2d(nchw(x), tconv.weight, None, stride=2, padding=tconv.padding)
        refs[name] = to_nhwc(t)
        conv = nn.Conv(w.shape[0], tuple(ksize), strides=(2, 2), padding=padding, use_bias=False)
        probes[name] = (conv, np.ascontiguousarray(w.transpose(2, 3, 1, 0)), x)

    @jax.jit
    def run_all(args: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, jax.Array]:
        return {n: probes[n][0].apply({"params": {"kernel": k}}, xb) for n, (k, xb) in args.items()}

    got = jax.device_get(run_all({n: (k, xb) for n, (_, k, xb) in probes.items()}))
    for name, ta in refs.items():
        fa = np.asarray(got[name])
        out[name] = max_abs(fa, ta) if fa.shape == ta.shape else math.inf
    return out


def _torch_train_forward(tmodel: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """torch's train-mode logits of `x`, with every named module's output captured."""
    acts: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, to_nhwc(o)))
        for n, m in tmodel.named_modules()
        if n
    ]
    tmodel.train()
    try:
        with torch.no_grad():
            return tmodel(nchw(x)).numpy(), acts
    finally:
        for hk in hooks:
            hk.remove()


def _activation_figures(
    acts: dict[str, np.ndarray], inter: dict[str, np.ndarray]
) -> tuple[list[Figure], dict[str, dict[str, float]]]:
    """Each torch module's output against the Flax module of the same name, relative."""
    figures, rows = [], {}
    for name, ta in acts.items():
        fa = inter.get(f"{name}.__call__.0")
        if fa is None or fa.shape != ta.shape:
            rows[name] = {"max_abs_diff": math.inf, "max_abs": float(np.max(np.abs(ta)))}
            continue
        scale = max(float(np.max(np.abs(ta))), 1e-12)
        rel = max_abs(fa, ta) / scale
        rows[name] = {"max_abs_diff": max_abs(fa, ta), "max_abs": scale, "relative": rel}
        title = f"activation {name}: max |diff| / max |x|"
        figures.append(Figure(title, rel, 1e-5, headline=False))
    return figures, rows


def _stats_rows(back: dict[str, Any], tsd: dict[str, torch.Tensor]) -> dict[str, float]:
    """BN running statistics, PyTorch's convention: max |diff| / max(1, |x|) per buffer."""
    rows: dict[str, float] = {}
    for key, t in tsd.items():
        if key.endswith(("running_mean", "running_var")):
            got, ref = back.get(key), t.numpy()
            scale = max(1.0, float(np.max(np.abs(ref))))
            rows[key] = math.inf if got is None else max_abs(got.numpy(), ref) / scale
    return rows


def check_forward(ctx: Context) -> CheckResult:
    """Same weights and batch: logits (train and eval mode), every module's output, BN running
    statistics after a train-mode forward, and a stride-2 padding probe of every conv."""
    res = CheckResult(2, "forward")
    h, cfg = ctx.harness, ctx.arith_cfg
    b = 16 if ctx.quick else 32
    warm = [sample_batch(ctx, b, offset=b * (i + 1))[0] for i in range(2)]
    x, _ = sample_batch(ctx, b)
    tmodel = h.torch_model(cfg, 0)
    # Warm the running statistics with two train-mode batches, so that eval mode and the
    # stored variance convention are exercised (a fresh model has var = 1 either way).
    tmodel.train()
    with torch.no_grad():
        for xb in warm:
            tmodel(nchw(xb))
    variables = h.to_flax({k: v.clone() for k, v in tmodel.state_dict().items()})
    fmodel = h.flax_model(cfg)

    tmodel.eval()
    with torch.no_grad():
        t_eval = tmodel(nchw(x)).numpy()
    # Eval mode uses the stored variance: Flax's biased one would differ by ~1% on 3x3 maps.
    f_eval = np.asarray(jax.jit(lambda v, xb: fmodel.apply(v, xb, train=False))(variables, x))
    res.figures.append(Figure("logits max |diff|, eval mode", max_abs(f_eval, t_eval), 1e-5))

    t_train, acts = _torch_train_forward(tmodel, x)
    mutable = ["batch_stats", "intermediates"]

    def train(v: PyTree, xb: np.ndarray) -> Any:
        return fmodel.apply(v, xb, train=True, mutable=mutable, capture_intermediates=True)

    f_train, state = jax.jit(train)(variables, x)
    f_train = np.asarray(f_train)
    res.figures.append(Figure("logits max |diff|, train mode", max_abs(f_train, t_train), 1e-5))
    act_figures, act_rows = _activation_figures(acts, leaves(state["intermediates"]))
    res.figures += act_figures
    trained = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    back = h.to_torch(trained, num_batches_tracked=len(warm) + 1)
    stat_rows = _stats_rows(back, tmodel.state_dict())
    stats = max(stat_rows.values())
    res.figures.append(Figure("BN running stats max |diff| / max(1, |x|)", stats, 1e-5))
    probe = _padding_probe(_flax_conv_configs(fmodel, variables, x), tmodel, seed=0)
    worst = max(probe.values(), default=math.inf)
    res.figures.append(Figure("stride-2 padding probe max |diff|", worst, 1e-5))
    res.details = {
        "batch": b,
        "widths": list(cfg.widths),
        "warm_batches": len(warm),
        "activations": act_rows,
        "running_stats": stat_rows,
        "padding_probe": probe,
    }
    return res
