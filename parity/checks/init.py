"""Check 1: both frameworks' own initialisation, and the bit-exact weight conversion."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxbench import stats
from parity.checks.base import (
    CheckResult,
    Context,
    Figure,
    dirac_filters,
    leaves,
    max_abs,
    quick_widths,
)


def check_init(ctx: Context) -> CheckResult:
    """Both frameworks' own inits against uniform(+-1/sqrt(fan_in)), pooled over seeds,
    BN at (bn_scale, 0, 0, 1), zero biases, seeds that matter, and a bit-exact conversion
    round trip."""
    res = CheckResult(1, "initialisation")
    h = ctx.harness
    cfg = ctx.cfg.replace(widths=quick_widths(ctx.cfg)) if ctx.quick else ctx.cfg
    seeds = list(range(4 if ctx.quick else 8))
    dirac_dev = {"jax": 0.0, "torch": 0.0}
    fmodel = h.flax_model(cfg)
    samples: dict[str, dict[str, list[np.ndarray]]] = {"jax": {}, "torch": {}}
    fans: dict[str, dict[str, int]] = {"jax": {}, "torch": {}}
    bn_dev = {"jax": 0.0, "torch": 0.0}
    uniform_bias = cfg.whiten_bias_init == "uniform"  # speedrun's whitening bias; else zero
    first: dict[str, Any] = {}
    for s in seeds:
        v = h.flax_init(fmodel, s)
        sd = h.torch_model(cfg, s).state_dict()
        if s == seeds[0]:
            first["jax"], first["torch"] = v, sd
        for name, w in leaves(v["params"]).items():
            parts = name.split(".")
            if parts[-1] == "kernel":
                layer = ".".join(parts[:-1])
                n_id = dirac_filters(cfg, layer, w.shape, "jax")
                if n_id:  # identity filters exactly, the rest joins the uniform fit
                    delta = np.zeros((*w.shape[:3], n_id), w.dtype)
                    delta[w.shape[0] // 2, w.shape[1] // 2, np.arange(n_id), np.arange(n_id)] = 1
                    dirac_dev["jax"] = max(dirac_dev["jax"], max_abs(w[..., :n_id], delta))
                    w = w[..., n_id:]
                if w.size:
                    samples["jax"].setdefault(layer, []).append(w)
                fans["jax"][layer] = math.prod(w.shape[:-1])
            elif parts[-1] == "bias" and parts[0] == "whiten" and uniform_bias:  # conv bias
                samples["jax"].setdefault(name, []).append(w)
                fans["jax"][name] = math.prod(v["params"]["whiten"]["kernel"].shape[:-1])
            elif parts[-1] == "scale":
                bn_dev["jax"] = max(bn_dev["jax"], max_abs(w, cfg.bn_scale))
            elif parts[-1] == "bias":
                bn_dev["jax"] = max(bn_dev["jax"], max_abs(w, 0.0))
        for name, w in leaves(v.get("batch_stats", {})).items():
            target = 1.0 if name.endswith("var") else 0.0
            bn_dev["jax"] = max(bn_dev["jax"], max_abs(w, target))
        for key, t in sd.items():
            w = t.numpy()
            layer, leaf = key.rsplit(".", 1)
            if leaf == "weight" and w.ndim in (2, 4):
                fans["torch"][layer] = math.prod(w.shape[1:])
                n_id = dirac_filters(cfg, layer, w.shape, "torch")
                if n_id:
                    delta = np.zeros((n_id, *w.shape[1:]), w.dtype)
                    delta[np.arange(n_id), np.arange(n_id), w.shape[2] // 2, w.shape[3] // 2] = 1
                    dirac_dev["torch"] = max(dirac_dev["torch"], max_abs(w[:n_id], delta))
                    w = w[n_id:]
                if w.size:
                    samples["torch"].setdefault(layer, []).append(w)
            elif leaf == "bias" and layer == "whiten" and uniform_bias:  # a conv bias
                samples["torch"].setdefault(key, []).append(w)
                fans["torch"][key] = math.prod(sd["whiten.weight"].shape[1:])
            elif leaf == "weight":
                bn_dev["torch"] = max(bn_dev["torch"], max_abs(w, cfg.bn_scale))
            elif leaf == "running_var":
                bn_dev["torch"] = max(bn_dev["torch"], max_abs(w, 1.0))
            elif leaf in ("bias", "running_mean"):
                bn_dev["torch"] = max(bn_dev["torch"], max_abs(w, 0.0))
    layers: dict[str, Any] = {}
    for fw in ("jax", "torch"):
        for layer, ws in samples[fw].items():
            fit = stats.uniform_fit(np.stack(ws), 1.0 / math.sqrt(fans[fw][layer]))
            layers[f"{fw} {layer}"] = fit.as_dict()
            p = f"{fw} {layer}"
            res.figures += [
                Figure(f"{p}: |z| of mean", abs(fit.mean_z), stats.Z_TOL),
                Figure(f"{p}: |z| of variance", abs(fit.std_z), stats.Z_TOL),
                Figure(f"{p}: KS distance to uniform", fit.ks, fit.ks_crit, headline=False),
                Figure(f"{p}: max|w| / bound", fit.max_ratio, 1.0 + 1e-6, headline=False),
                Figure(
                    f"{p}: max|w| / bound (lower)", fit.max_ratio, fit.min_max_ratio, ">=", False
                ),
            ]
            if len(ws) > 1:
                same = float(np.mean(ws[0] == ws[1]))
                res.figures.append(
                    Figure(f"{p}: share equal across seeds", same, 1e-3, headline=False)
                )
        res.figures.append(
            Figure(f"{fw} BN init max |x - (1,0,0,1)|", bn_dev[fw], 0.0, headline=False)
        )
        if cfg.model == "speedrun":
            res.figures.append(
                Figure(
                    f"{fw} identity (dirac) filters max |diff|", dirac_dev[fw], 0.0, headline=False
                )
            )
    missing = set(samples["jax"]) ^ set(samples["torch"])
    res.figures.append(
        Figure("layers present in only one framework", len(missing), 0, headline=False)
    )
    # Conversion: names and shapes line up with Flax's own init, and both round trips are exact.
    conv = h.to_flax(first["torch"])
    shapes_f = {k: v.shape for k, v in leaves(first["jax"]).items()}
    shapes_c = {k: v.shape for k, v in leaves(conv).items()}
    res.figures.append(
        Figure(
            "converted leaves not matching Flax init (name/shape)",
            len(set(shapes_f.items()) ^ set(shapes_c.items())),
            0,
            headline=False,
        )
    )
    back = h.to_torch(conv)
    res.figures.append(
        Figure(
            "torch->flax->torch elements not bit-identical",
            _bit_mismatches(first["torch"], back),
            0,
            headline=False,
        )
    )
    again = h.to_flax(h.to_torch(first["jax"]))
    res.figures.append(
        Figure(
            "flax->torch->flax elements not bit-identical",
            _bit_mismatches(leaves(first["jax"]), leaves(again)),
            0,
            headline=False,
        )
    )
    res.details = {"seeds": seeds, "widths": list(cfg.widths), "layers": layers}
    return res


def _bit_mismatches(a: Any, b: Any) -> float:
    """Elements whose bytes differ, plus whole leaves missing, reshaped or retyped (by size)."""
    a = {k: np.asarray(v) for k, v in a.items()}
    b = {k: np.asarray(v) for k, v in b.items()}
    bad = sum(a[k].size for k in a.keys() - b.keys()) + sum(b[k].size for k in b.keys() - a.keys())
    for k in a.keys() & b.keys():
        x, y = np.ascontiguousarray(a[k]), np.ascontiguousarray(b[k])
        if x.shape != y.shape or x.dtype != y.dtype:
            bad += max(x.size, y.size, 1)
            continue
        void = np.dtype((np.void, x.itemsize))
        bad += int(np.sum(x.reshape(-1).view(void) != y.reshape(-1).view(void)))
    return float(bad)
