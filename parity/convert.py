"""Exact weight conversion between a `torch_ref` state dict and `jaxbench` Flax variables.

By name (docs/design.md): torch key `a.b.conv.weight` is Flax leaf `params[a][b][conv][kernel]`.
Conv kernels OIHW <-> HWIO, linear (out, in) <-> (in, out), BN `weight` <-> `scale`,
`running_mean|var` <-> `batch_stats` `mean|var` (both store the unbiased variance): all exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flax.traverse_util import flatten_dict

Variables = dict[str, Any]

_BN_BUFFERS = {"running_mean": "mean", "running_var": "var"}


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ValueError(f"two torch keys map to the Flax leaf {'/'.join(path)}")
    tree[path[-1]] = value


def torch_to_flax(state_dict: Mapping[str, torch.Tensor]) -> Variables:
    """`{"params": ..., "batch_stats": ...}` as float32 numpy arrays from a torch state dict."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        *mod, leaf = key.split(".")
        x = tensor.detach().cpu().numpy()
        if leaf == "num_batches_tracked":
            continue
        if leaf in _BN_BUFFERS:
            _set(stats, [*mod, _BN_BUFFERS[leaf]], np.array(x, dtype=np.float32))
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
    variables: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> OrderedDict[str, torch.Tensor]:
    """A torch state dict from Flax variables; the inverse of `torch_to_flax`.
    Flax keeps no BN batch counter: `num_batches_tracked` fills torch's (unused in training)."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for path, value in flatten_dict(variables.get("params", {})).items():
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
    for path, value in flatten_dict(variables.get("batch_stats", {})).items():
        *mod, leaf = path
        if leaf not in ("mean", "var"):
            raise ValueError(f"don't know how to convert Flax batch stat {'/'.join(path)}")
        bn = ".".join(mod)
        sd[f"{bn}.running_{leaf}"] = torch.from_numpy(np.array(value, dtype=np.float32))
        if leaf == "var":
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return sd
