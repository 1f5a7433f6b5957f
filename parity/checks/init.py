"""Check 1: both frameworks' own initialisation, and the bit-exact weight conversion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxbench import stats
from jaxbench.configs import Config
from parity.checks.base import (
    CheckResult,
    Context,
    Figure,
    PyTree,
    dirac_filters,
    leaves,
    max_abs,
    quick_widths,
)
from parity.harness import Harness


@dataclass
class InitSample:
    """One framework's init over several seeds, in Flax layout: the weights each uniform fit
    pools (identity filters aside), fans, and the worst deviations from exact values."""

    weights: dict[str, list[np.ndarray]] = field(default_factory=dict)
    fans: dict[str, int] = field(default_factory=dict)
    bn_dev: float = 0.0  # BN (scale, bias, mean, var) against (bn_scale, 0, 0, 1)
    dirac_dev: float = 0.0  # identity filters against the exact identity
    # `head_unit_std` layers: max |sample std - 1| over seeds, and the weights per seed
    unit_std: dict[str, float] = field(default_factory=dict)

    def add(self, cfg: Config, v: PyTree) -> None:
        """Pool one seed's variables; speedrun's whitening bias is uniform, other biases zero."""
        params = v["params"]
        for name, w in leaves(params).items():
            layer, leaf = name.rsplit(".", 1)
            if leaf == "kernel":
                n_id = dirac_filters(cfg, layer, w.shape)
                if n_id:  # identity filters exactly, the rest joins the uniform fit
                    delta = np.zeros((*w.shape[:3], n_id), w.dtype)
                    delta[w.shape[0] // 2, w.shape[1] // 2, np.arange(n_id), np.arange(n_id)] = 1
                    self.dirac_dev = max(self.dirac_dev, max_abs(w[..., :n_id], delta))
                    w = w[..., n_id:]
                fan = math.prod(w.shape[:-1])
                if cfg.head_unit_std and layer == "head":  # uniform / its sample std
                    s = float(np.std(w, ddof=1, dtype=np.float64))
                    self.unit_std[layer] = max(self.unit_std.get(layer, 0.0), abs(s - 1.0))
                    w = w / math.sqrt(3.0 * fan)  # back on the uniform's scale, up to s(u)
                if w.size:
                    self.weights.setdefault(layer, []).append(w)
                self.fans[layer] = fan
            elif leaf == "bias" and layer == "whiten" and cfg.whiten_bias_init == "uniform":
                self.weights.setdefault(name, []).append(w)
                self.fans[name] = math.prod(params["whiten"]["kernel"].shape[:-1])
            else:
                self.bn_dev = max(self.bn_dev, max_abs(w, cfg.bn_scale if leaf == "scale" else 0))
        for name, w in leaves(v.get("batch_stats", {})).items():
            self.bn_dev = max(self.bn_dev, max_abs(w, 1.0 if name.endswith("var") else 0.0))


def _uniform_figures(fw: str, sample: InitSample) -> tuple[list[Figure], dict[str, Any]]:
    """Each layer's pooled weights against uniform(+-1/sqrt(fan_in)), and seeds that matter."""
    figures, layers = [], {}
    for layer, ws in sample.weights.items():
        fit = stats.uniform_fit(np.stack(ws), 1.0 / math.sqrt(sample.fans[layer]))
        p = f"{fw} {layer}"
        layers[p] = fit.as_dict()
        figures += [
            Figure(f"{p}: |z| of mean", abs(fit.mean_z), stats.Z_TOL),
            Figure(f"{p}: KS distance to uniform", fit.ks, fit.ks_crit, headline=False),
        ]
        if layer in sample.unit_std:
            # rescaled per seed by 1 / s(u): the std is exactly 1, the bound off by s(u)'s
            # noise, sd 1 / sqrt(2 n) of one seed's weights: five of those either way
            slack = 5.0 / math.sqrt(2.0 * ws[0].size)
            spread = Figure(f"{p}: max |sample std - 1|", sample.unit_std[layer], 1e-5)
            upper, lower = 1.0 + slack, 1 - slack
        else:
            spread = Figure(f"{p}: |z| of variance", abs(fit.std_z), stats.Z_TOL)
            upper, lower = 1.0 + 1e-6, fit.min_max_ratio
        figures += [
            spread,
            Figure(f"{p}: max|w| / bound", fit.max_ratio, upper, headline=False),
            Figure(f"{p}: max|w| / bound (lower)", fit.max_ratio, lower, ">=", False),
        ]
        if len(ws) > 1:
            same = float(np.mean(ws[0] == ws[1]))
            figures.append(Figure(f"{p}: share equal across seeds", same, 1e-3, headline=False))
    return figures, layers


def _conversion_figures(h: Harness, jax_init: PyTree, torch_init: Any) -> list[Figure]:
    """Names and shapes line up with Flax's own init, and both round trips are exact."""
    shapes = [
        {(k, v.shape) for k, v in leaves(t).items()} for t in (jax_init, h.to_flax(torch_init))
    ]
    counts = {
        "converted leaves not matching Flax init (name/shape)": len(shapes[0] ^ shapes[1]),
        "torch->flax->torch elements not bit-identical": _bit_mismatches(
            torch_init, h.to_torch(h.to_flax(torch_init))
        ),
        "flax->torch->flax elements not bit-identical": _bit_mismatches(
            leaves(jax_init), leaves(h.to_flax(h.to_torch(jax_init)))
        ),
    }
    return [Figure(name, n, 0, headline=False) for name, n in counts.items()]


def check_init(ctx: Context) -> CheckResult:
    """Both frameworks' own inits against uniform(+-1/sqrt(fan_in)) pooled over seeds, BN at
    (bn_scale, 0, 0, 1), zero biases, seeds that matter, and exact conversion round trips."""
    res = CheckResult(1, "initialisation")
    h = ctx.harness
    cfg = ctx.cfg.replace(widths=quick_widths(ctx.cfg)) if ctx.quick else ctx.cfg
    seeds = list(range(4 if ctx.quick else 8))
    fmodel = h.flax_model(cfg)
    samples = {"jax": InitSample(), "torch": InitSample()}
    for s in seeds:
        v, sd = h.flax_init(fmodel, s), h.torch_model(cfg, s).state_dict()
        if s == seeds[0]:
            first = (v, sd)
        samples["jax"].add(cfg, v)
        samples["torch"].add(cfg, h.to_flax(sd))
    layers: dict[str, Any] = {}
    for fw, sample in samples.items():
        figures, fw_layers = _uniform_figures(fw, sample)
        layers.update(fw_layers)
        res.figures += figures
        name = f"{fw} BN init max |x - (1,0,0,1)|"
        res.figures.append(Figure(name, sample.bn_dev, 0.0, headline=False))
        if cfg.model == "speedrun":
            name = f"{fw} identity (dirac) filters max |diff|"
            res.figures.append(Figure(name, sample.dirac_dev, 0.0, headline=False))
    missing = set(samples["jax"].weights) ^ set(samples["torch"].weights)
    only_one = Figure("layers present in only one framework", len(missing), 0, headline=False)
    res.figures += [only_one, *_conversion_figures(h, *first)]
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
