"""Exact weight conversion between a `torch_ref` state dict and `jaxbench` Flax variables.

The mapping is by name (docs/design.md): a torch key `a.b.conv.weight` is the
Flax leaf `params[a][b][conv][kernel]`, so any module tree whose names agree
converts, not only ResNet-9. Layouts: conv kernels OIHW <-> HWIO, linear
(out, in) <-> (in, out), BN `weight` <-> `scale`, `running_mean|var` <->
`batch_stats` `mean|var`. Transposes and copies are exact.

BN running variance is the one value that is not a copy. PyTorch averages the
*unbiased* batch variance, Flax the *biased* one, so after k batches of n
values per channel, starting from var = 1 with momentum m (PyTorch convention):

    torch_var = p + sum_i w_i * s_i^2 * n / (n - 1),  flax_var = p + sum_i w_i * s_i^2,
    p = (1 - m)^k,

hence `flax_var = p + (torch_var - p) * (n - 1) / n`, exactly in real arithmetic.
k is the state dict's `num_batches_tracked`; n (batch x height x width at that
BN) must be given as `bn_counts`. A fresh model (k = 0, var = 1) needs neither
and converts bit-exactly both ways; a trained one converts to within an ulp.
`raw_var=True` copies the variance unchanged (only right for k = 0).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Variables = dict[str, Any]

_BN_BUFFERS = {"running_mean": "mean", "running_var": "var"}


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ValueError(f"two torch keys map to the Flax leaf {'/'.join(path)}")
    tree[path[-1]] = value


def _leaves(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.extend(_leaves(v, (*prefix, str(k))))
        else:
            out.append(((*prefix, str(k)), v))
    return out


def _var_factor(count: int) -> float:
    if count < 2:
        raise ValueError(f"a BN count of {count} values per channel has no unbiased variance")
    return (count - 1) / count


def _check_counts(
    bn: str, k: int, raw_var: bool, bn_counts: Mapping[str, int] | None
) -> int | None:
    """The per-channel count for `bn`, or None when the variance is copied unchanged."""
    if raw_var or k == 0:
        return None
    if bn_counts is None or bn not in bn_counts:
        raise ValueError(
            f"BN {bn!r} has seen {k} batches, so its running variance needs the per-channel "
            "count to convert between PyTorch's unbiased and Flax's biased convention; "
            "pass bn_counts={name: batch*height*width} (see resnet9_bn_counts) or raw_var=True"
        )
    return int(bn_counts[bn])


def resnet9_bn_counts(batch_size: int, image_size: int = 32) -> dict[str, int]:
    """Values per channel each ResNet-9 BN sees per batch (the layer* pools follow their BN)."""
    side = {
        "prep": image_size,
        "layer1": image_size,
        "res1a": image_size // 2,
        "res1b": image_size // 2,
        "layer2": image_size // 2,
        "layer3": image_size // 4,
        "res3a": image_size // 8,
        "res3b": image_size // 8,
    }
    return {f"{block}.bn": batch_size * s * s for block, s in side.items()}


def torch_to_flax(
    state_dict: Mapping[str, torch.Tensor],
    *,
    bn_counts: Mapping[str, int] | None = None,
    momentum: float = 0.1,
    raw_var: bool = False,
) -> Variables:
    """`{"params": ..., "batch_stats": ...}` as float32 numpy arrays from a torch state dict.

    `momentum` is the BN momentum in PyTorch's convention (`Config.bn_momentum`).
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        *mod, leaf = key.split(".")
        x = tensor.detach().cpu().numpy()
        if leaf == "num_batches_tracked":
            continue
        if leaf in _BN_BUFFERS:
            value = np.array(x, dtype=np.float32)
            if leaf == "running_var":
                k = int(state_dict[".".join([*mod, "num_batches_tracked"])])
                count = _check_counts(".".join(mod), k, raw_var, bn_counts)
                if count is not None:
                    prior = (1.0 - momentum) ** k
                    v64 = prior + (x.astype(np.float64) - prior) * _var_factor(count)
                    value = v64.astype(np.float32)
            _set(stats, [*mod, _BN_BUFFERS[leaf]], value)
        elif leaf == "weight" and x.ndim == 4:
            _set(params, [*mod, "kernel"], np.ascontiguousarray(x.transpose(2, 3, 1, 0)))
        elif leaf == "weight" and x.ndim == 2:
            _set(params, [*mod, "kernel"], np.ascontiguousarray(x.T))
        elif leaf == "weight" and x.ndim == 1:
            _set(params, [*mod, "scale"], np.array(x))
        elif leaf == "bias":
            _set(params, [*mod, "bias"], np.array(x))
        else:
            raise ValueError(f"don't know how to convert torch key {key!r} of shape {x.shape}")
    out: Variables = {"params": params}
    if stats:
        out["batch_stats"] = stats
    return out


def flax_to_torch(
    variables: Mapping[str, Any],
    *,
    num_batches_tracked: int = 0,
    bn_counts: Mapping[str, int] | None = None,
    momentum: float = 0.1,
    raw_var: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """A torch state dict from Flax variables; the inverse of `torch_to_flax`.

    Flax keeps no batch counter, so `num_batches_tracked` (the number of
    train-mode batches the statistics have seen) is an argument; it is also
    what the variance conversion needs, with `bn_counts`.
    """
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for path, value in _leaves(variables.get("params", {})):
        *mod, leaf = path
        x = np.asarray(value)
        if leaf == "kernel" and x.ndim == 4:
            w = x.transpose(3, 2, 0, 1)
        elif leaf == "kernel" and x.ndim == 2:
            w = x.T
        elif leaf in ("scale", "bias"):
            w = x
        else:
            raise ValueError(f"don't know how to convert Flax param {'/'.join(path)} of {x.shape}")
        name = "weight" if leaf in ("kernel", "scale") else "bias"
        sd[".".join([*mod, name])] = torch.from_numpy(np.ascontiguousarray(w).copy())
    for path, value in _leaves(variables.get("batch_stats", {})):
        *mod, leaf = path
        x = np.asarray(value)
        bn = ".".join(mod)
        if leaf == "mean":
            sd[f"{bn}.running_mean"] = torch.from_numpy(np.array(x, dtype=np.float32))
        elif leaf == "var":
            count = _check_counts(bn, num_batches_tracked, raw_var, bn_counts)
            if count is not None:
                prior = (1.0 - momentum) ** num_batches_tracked
                x = (prior + (x.astype(np.float64) - prior) / _var_factor(count)).astype(np.float32)
            sd[f"{bn}.running_var"] = torch.from_numpy(np.array(x, dtype=np.float32))
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        else:
            raise ValueError(f"don't know how to convert Flax batch stat {'/'.join(path)}")
    return sd


def max_abs_diff_trees(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float]:
    """Per-leaf max |a - b| for two trees of the same structure; inf where shapes differ."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    if la.keys() != lb.keys():
        missing = sorted("/".join(k) for k in la.keys() ^ lb.keys())
        raise ValueError(f"trees differ in leaves: {missing[:5]}")
    out: dict[str, float] = {}
    for k in la:
        x, y = np.asarray(la[k]), np.asarray(lb[k])
        out["/".join(k)] = (
            float(np.max(np.abs(x.astype(np.float64) - y))) if x.shape == y.shape else np.inf
        )
    return out


def state_dicts_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Same keys, shapes, dtypes and bits."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )
