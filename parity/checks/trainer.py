"""Check 6: the trainers' own training loop and evaluation, compared step by step.

Both trainers run their real `train_and_evaluate` at float32 full precision from identical
weights on the shared batch plan, watched through their parity hooks (`jaxbench.train.Hooks`,
`torch_ref.train.Hooks`); nothing of either trainer is re-implemented here.

Why step by step ("teacher forcing"): SGD on a small ResNet is chaotic in float32 (a one-ulp
change grows ~10x per step), so free-running trajectories part within ~10 steps. torch_ref runs
free and records its state before every step; the JAX trainer starts *every* step from that
state (params, BN statistics, momentum, step counters, EMA), converted exactly, so a step
differs by its own rounding (~1e-6 of the update) while a recipe or glue bug moves the update by
1e-2 or more. What JAX's loop carries into step t+1 is compared with torch's state there, so
the code between steps is covered too.

Figures, each a ratio that must stay <= 1 (bars: the constants below): the weights entering
step 1 (after the whitening init); the per-step loss; the BN statistics (live and EMA) per
element after every step and at every evaluation; the LR, EMA decay and weight decay each
trainer applied, recovered from its own update, against the schedule and the config (with
lookahead: net = EMA after each EMA step, exactly); params, momentum and EMA params as a whole,
loosely: they carry the gradient, which XLA:CPU and PyTorch compute up to ~5e-3 of the step
apart where a ReLU or max-pool sits at a kink (2.5e-2 at batch 100, hence batch 16), so the
recovered LR, decays and check 4 carry the tight verdict; evaluation of identical weights:
every TTA view's logits, the loss, and the accuracies (up to near-tied top-2 logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxbench import augment as jaugment
from jaxbench import models, optim, schedule
from jaxbench import train as jtrain
from jaxbench.configs import Config, optimizer_scales
from jaxbench.stream import apply_plan_numpy, epoch_plan, selective_tta, steps_per_epoch
from parity import convert
from parity.checks.base import (
    CheckResult,
    Context,
    Figure,
    PyTree,
    leaves,
    max_abs,
    path_keys,
    subset_data,
    synthetic_dataset,
)
from torch_ref import model as tmodel_mod
from torch_ref import train as ttrain
from torch_ref.augment import device_stats

RTOL_UPDATE = 3e-4  # relative error allowed in one step's change of a BN statistic
ULPS = 8.0  # float32 ulps of the stored value allowed on top
EPS32 = float(np.finfo(np.float32).eps)
LOSS_RTOL = 1e-5
START_RTOL = 1e-6  # the same converted weights and the same host-computed whitening kernel
LOGITS_RTOL = 1e-5
GROSS_RTOL = 5e-2  # see _gross_ratios: measured up to 5e-3 at batch 16
MARGIN_FACTOR = 100.0  # top-2 margins within this x the logit difference may flip
T = TypeVar("T")
Parts = dict[str, PyTree]  # a state as the parts compared (`_jax_parts`, `_torch_parts`)


def trainer_config(ctx: Context) -> Config:
    """Two short epochs that cross an epoch boundary, EMA (or lookahead) steps, the LR
    warm-up and decay, a padded last evaluation batch and, for the speedrun net, the
    whitening bias freeze."""
    n_train, n_test, batch = (128, 200, 16) if ctx.quick else (512, 1000, 16)
    cfg = ctx.arith_cfg.replace(
        subset=n_train,
        test_subset=n_test,
        batch_size=batch,
        eval_batch_size=128,
        eval_every=1,
        epochs=2,
        lr_peak_epoch=1.0,
        lr_flat_epochs=min(ctx.arith_cfg.lr_flat_epochs, 0.5),  # Page's flat end, if on
        seed=3,
        loop="step",
    )
    if cfg.model == "speedrun":  # a freeze inside the run: after epoch 1, or mid-epoch
        cfg = cfg.replace(whiten_bias_epochs=min(cfg.whiten_bias_epochs, 1))
    return cfg


# --- state snapshots ----------------------------------------------------------------------------


def _np_tree(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _torch_snapshot(r: Any) -> dict[str, Any]:
    """torch_ref's run state in Flax layout: variables, momentum buffers, EMA, trainable."""
    cpu = lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # noqa: E731
    bufs: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    for name, p in r.model.named_parameters():
        if not p.requires_grad:
            frozen[name] = p.detach()
        b = r.optimizer.state.get(p, {}).get("momentum_buffer")
        if b is not None:
            bufs[name] = b.detach().cpu().clone()
    snap: dict[str, Any] = {
        "t": r.t,
        "variables": convert.torch_to_flax(cpu(r.model)),
        "buffers": _flax_params(bufs),
        "frozen": set(_flax_params(frozen)),
    }
    if r.ema_model is not None:
        snap["ema"] = convert.torch_to_flax(cpu(r.ema_model))
    return snap


def _flax_params(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return leaves(convert.torch_to_flax(tensors)["params"])


class TorchRecorder:
    """torch_ref hooks: its state before every step and before every evaluation, its losses."""

    def __init__(self) -> None:
        self.pre: dict[int, dict[str, Any]] = {}
        self.loss: dict[int, float] = {}
        self.at_eval: dict[int, dict[str, Any]] = {}

    def before_step(self, t: int, run: Any) -> None:
        self.pre[t] = _torch_snapshot(run)

    def after_step(self, t: int, run: Any, loss: torch.Tensor) -> None:
        self.loss[t] = float(loss)

    def before_eval(self, epoch: int, run: Any) -> None:
        self.at_eval[epoch] = _torch_snapshot(run)


def _param_path(path: Any) -> str | None:
    """The parameter ("a.b.kernel") of an optax trace leaf's key path, or None for other leaves."""
    names = [getattr(k, "name", None) for k in path]
    if "trace" not in names:
        return None
    return ".".join(path_keys(path[names.index("trace") + 1 :]))


class TeacherForcing:
    """jaxbench hooks: record what the loop carries, then start each step from torch's state."""

    def __init__(self, torch_run: TorchRecorder) -> None:
        self.ref = torch_run
        self.carried: dict[int, Any] = {}  # JAX state entering step t (its own step t-1 output)
        self.injected: dict[int, Any] = {}
        self.post: dict[int, Any] = {}  # JAX state right after step t
        self.loss: dict[int, float] = {}
        self.at_eval: dict[int, Any] = {}

    def _inject(self, state: Any, snap: dict[str, Any]) -> Any:
        t = snap["t"]

        def leaf(path: Any, x: jax.Array) -> jax.Array:
            p = _param_path(path)
            if p is not None:
                b = snap["buffers"].get(p)
                return jnp.asarray(np.zeros(x.shape, np.float32) if b is None else b, x.dtype)
            if path and getattr(path[-1], "name", None) == "count":
                return jnp.asarray(t, x.dtype)
            return x

        v = snap["variables"]
        ema = snap.get("ema", v)
        return state.replace(
            step=jnp.asarray(t, jnp.int32),
            params=jax.device_put(v["params"]),
            batch_stats=jax.device_put(v["batch_stats"]),
            opt_state=jax.tree_util.tree_map_with_path(leaf, state.opt_state),
            ema=jax.device_put({"params": ema["params"], "batch_stats": ema["batch_stats"]}),
        )

    def before_step(self, t: int, state: Any) -> Any:
        self.carried[t] = _np_tree(state)
        new = self._inject(state, self.ref.pre[t])
        self.injected[t] = _np_tree(new)
        return new

    def after_step(self, t: int, state: Any, metrics: Any) -> None:
        self.post[t] = _np_tree(state)
        self.loss[t] = float(metrics["loss"])

    def before_eval(self, epoch: int, state: Any) -> Any:
        self.at_eval[epoch] = _np_tree(state)
        return self._inject(state, self.ref.at_eval[epoch])


# --- comparisons --------------------------------------------------------------------------------


def _jax_parts(state: Any) -> Parts:
    """A recorded JAX TrainState as the parts compared: params, stats, momentum traces, EMA."""
    flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    traces = [(_param_path(path), leaf) for path, leaf in flat]
    return {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "buffers": {p: np.asarray(x) for p, x in traces if p is not None},
        "ema": state.ema,
    }


def _torch_parts(snap: dict[str, Any], template: Parts) -> Parts:
    """torch's snapshot as the same parts, missing momentum buffers (before the first step) 0."""
    v = snap["variables"]
    bufs = {k: snap["buffers"].get(k, np.zeros_like(x)) for k, x in template["buffers"].items()}
    return {**v, "buffers": bufs, "ema": snap.get("ema", v)}


def _stats_ratios(got: Parts, want: Parts, before: Parts, with_ema: bool) -> dict[str, float]:
    """BN statistics (live and EMA), per tensor: |got - want| / (RTOL_UPDATE |change| + ULPS
    ulp(|want|)), worst element. Forward-only quantities: float32-accurate in both."""
    out: dict[str, float] = {}
    for part, sub in (("batch_stats", None), ("ema", "batch_stats"))[: 2 if with_ema else 1]:
        g, w, b = (leaves(x[part] if sub is None else x[part][sub]) for x in (got, want, before))
        for name in w.keys() | g.keys():
            key = f"{part if sub is None else 'ema batch_stats'} {name}"
            if name not in g or name not in w or g[name].shape != w[name].shape:
                out[key] = math.inf
                continue
            gv, wv = g[name].astype(np.float64), w[name].astype(np.float64)
            change = np.abs(wv - b[name].astype(np.float64)).max() if name in b else 0.0
            allow = RTOL_UPDATE * change + ULPS * EPS32 * np.abs(wv).max()
            diff = np.abs(gv - wv).max()
            out[key] = float(diff / allow) if allow > 0 else (0.0 if diff == 0 else math.inf)
    return out


def _gross_ratios(
    got: Parts, want: Parts, before: Parts, skip: set[str], with_ema: bool
) -> dict[str, float]:
    """Params, momentum buffers and EMA params (`with_ema`): ||got - want|| / ||want -
    before|| over all tensors of each part (they carry the float32-ambiguous gradient)."""
    out: dict[str, float] = {}
    parts = (("params", None), ("buffers", None), ("ema", "params"))
    for part, sub in parts[: 3 if with_ema else 2]:
        key = part if sub is None else "ema params"
        g, w, b = (leaves(x[part] if sub is None else x[part][sub]) for x in (got, want, before))
        if set(g) != set(w):  # the buffers' names are JAX's in both (`_torch_parts`)
            out[key] = math.inf
            continue
        num = den = 0.0
        for name in w:
            if part == "buffers" and name in skip:
                continue
            wv = w[name].astype(np.float64)
            num += float(np.sum((g[name].astype(np.float64) - wv) ** 2))
            den += float(np.sum((wv - b[name].astype(np.float64)) ** 2))
        out[key] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return out


def _applied_decay(pre: Parts, post: Parts) -> tuple[float, float]:
    """The EMA decay d a trainer applied in a step, and the float32 bound of that estimate:
    ema1 = d ema0 + (1 - d) w1, so d = <ema1 - w1, ema0 - w1> / |ema0 - w1|^2."""
    e0, e1 = leaves(pre["ema"]), leaves(post["ema"])
    num = den = err = 0.0
    for name, w1 in _live(post).items():
        w1 = w1.astype(np.float64)
        a, b = e1[name].astype(np.float64) - w1, e0[name].astype(np.float64) - w1
        num += float(np.sum(a * b))
        den += float(np.sum(b * b))
        err += float(np.sum(np.abs(b) * (np.abs(e1[name]) + 2 * np.abs(w1)))) * EPS32
    return (num / den if den > 0 else 1.0), (err / den if den > 0 else 0.0)


def _applied_lr(
    pre: Parts, post: Parts, cfg: Config, labels: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """The LR each parameter group was updated with, and the float32 bound of that estimate:
    SGD moves w by -lr d, d = g' + m b1 (Nesterov) or b1, with b1 = m b0 + g', so
    lr = -<dw, d> / <d, d>, off by at most sum |d| eps (|w0| + |w1|) / <d, d>."""
    m = cfg.momentum
    dots: dict[str, list[float]] = {}
    w0s, w1s = leaves(pre["params"]), leaves(post["params"])
    for name, group in labels.items():
        if group not in ("default", "bn_bias"):
            continue
        w0, w1 = w0s[name].astype(np.float64), w1s[name].astype(np.float64)
        b0, b1 = pre["buffers"][name].astype(np.float64), post["buffers"][name].astype(np.float64)
        d = (b1 - m * b0) + m * b1 if cfg.nesterov else b1
        acc = dots.setdefault(group, [0.0, 0.0, 0.0])
        acc[0] += float(np.sum((w1 - w0) * d))
        acc[1] += float(np.sum(d * d))
        acc[2] += float(np.sum(np.abs(d) * (np.abs(w0) + np.abs(w1)))) * EPS32
    return {
        g: (-a / b if b > 0 else 0.0, err / b if b > 0 else 0.0) for g, (a, b, err) in dots.items()
    }


def _step_gradients(r: Runs) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """Each trainer's own loss gradient (`make_loss_fn`, `train_forward`) at each step's
    starting state, on that step's batch from the shared plan; Flax layout, by dotted name."""
    cfg = r.cfg
    loss_fn = jtrain.make_loss_fn(cfg, models.model_from_config(cfg))
    grad_fn = jax.jit(jax.grad(lambda p, bs, x, y, jit: loss_fn(p, bs, x, y, jit)[0]))
    mean, std = device_stats(cfg.dataset, torch.device("cpu"))
    images = np.asarray(r.data.train_images[: cfg.subset])
    labels = np.asarray(r.data.train_labels[: cfg.subset])
    spe = steps_per_epoch(cfg, len(images))
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {"jax": {}, "torch": {}}
    for t in r.steps:
        bp = epoch_plan(cfg, t // spe, len(images)).batch(t % spe, cfg.batch_size)
        x = apply_plan_numpy(images, bp, cfg)
        y = labels[bp.indices].astype(np.int32)
        inj = r.tf.injected[t]
        jitter = jaugment.plan_jitter(bp, cfg)  # the record's colour jitter, or None
        g = grad_fn(inj.params, inj.batch_stats, jnp.asarray(x), jnp.asarray(y), jitter)
        out["jax"][t] = leaves(jax.device_get(g))
        net = tmodel_mod.model_from_config(cfg)
        net.load_state_dict(convert.flax_to_torch(r.rec.pre[t]["variables"]))
        net = net.to(memory_format=torch.channels_last).train()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
        tjitter = None if jitter is None else tuple(torch.tensor(np.asarray(v)) for v in jitter)
        kw = {**ttrain.loss_options(cfg, False), "jitter": tjitter}
        loss = ttrain.train_forward(net, xt, yt, mean, std, **kw)[0]
        loss.backward()
        grads = {n: q.grad for n, q in net.named_parameters() if q.grad is not None}
        out["torch"][t] = leaves(convert.torch_to_flax(grads)["params"])
    return out


def _applied_weight_decay(
    pre: Parts, post: Parts, grads: dict[str, np.ndarray], cfg: Config, labels: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """The coupled weight decay each parameter group got in a step, and its error scale:
    b1 = m b0 + g + wd w0, so wd = <b1 - m b0 - g, w0> / |w0|^2 (g recomputed at the step's
    start); error scale: g's float32 noise, taken as 1e-5 |g| per element, projected alike."""
    m = cfg.momentum
    w0s = leaves(pre["params"])
    acc: dict[str, list[float]] = {}
    for name, group in labels.items():
        if group not in ("default", "bn_bias") or name not in grads:
            continue
        w0 = w0s[name].astype(np.float64)
        b0, b1 = pre["buffers"][name].astype(np.float64), post["buffers"][name].astype(np.float64)
        g = grads[name].astype(np.float64)
        noise = 1e-5 * np.abs(g) + EPS32 * (np.abs(b1) + m * np.abs(b0))
        a = acc.setdefault(group, [0.0, 0.0, 0.0])
        a[0] += float(np.sum((b1 - m * b0 - g) * w0))
        a[1] += float(np.sum(w0 * w0))
        a[2] += float(np.sum(np.abs(w0) * noise))
    return {
        grp: (n / d if d > 0 else 0.0, e / d if d > 0 else math.inf)
        for grp, (n, d, e) in acc.items()
    }


def _live(parts: Parts) -> dict[str, np.ndarray]:
    """The live net of a state's parts (params, then BN statistics), by dotted name."""
    return {**leaves({"params": parts["params"]}), **leaves({"batch_stats": parts["batch_stats"]})}


@dataclass
class Runs:
    """Both trainers' recorded runs of one config: torch_ref free, JAX teacher-forced."""

    cfg: Config
    data: Any
    rec: TorchRecorder
    tf: TeacherForcing
    jax_summary: dict[str, Any]
    torch_summary: dict[str, Any]

    @property
    def steps(self) -> list[int]:
        return sorted(self.rec.pre)

    def stepped(self) -> Iterator[tuple[int, dict[str, tuple[Parts, Parts]]]]:
        """Every step both trainers completed, with each one's (state before, state after) it:
        torch's run, JAX's from the injection."""
        for t in self.steps:
            if t + 1 in self.rec.pre and t in self.tf.post:
                post = _jax_parts(self.tf.post[t])
                pre_t = _torch_parts(self.rec.pre[t], post)
                torch_run = (pre_t, _torch_parts(self.rec.pre[t + 1], pre_t))
                yield t, {"torch": torch_run, "jax": (_jax_parts(self.tf.injected[t]), post)}


def _worst(pairs: Iterable[tuple[float, T]], empty: T) -> tuple[float, T]:
    """The largest ratio and where it was (the last of equals); (0, empty) without any."""
    worst = (0.0, empty)
    for ratio, where in pairs:
        if ratio >= worst[0]:
            worst = (ratio, where)
    return worst


def _per_framework(title: str, pairs: dict[str, list[tuple[float, int]]]) -> list[Figure]:
    """One figure per framework: its worst ratio over the steps, naming that step."""
    out = []
    for fw, fw_pairs in pairs.items():
        ratio, t = _worst(fw_pairs, -1)
        out.append(Figure(f"{fw}: {title}, worst (step {t})", ratio, 1.0))
    return out


def run_trainers(ctx: Context, cfg: Config) -> Runs:
    """Both trainers' `train_and_evaluate` from torch_ref's init for `cfg.seed`, recorded."""
    h = ctx.harness
    n_train, n_test = cfg.subset or 0, cfg.test_subset or 0
    data = (
        subset_data(ctx.data, n_train, n_test)
        if ctx.data is not None
        else synthetic_dataset(n_train, n_test)
    )
    sd = {k: v.clone() for k, v in h.torch_model(cfg, cfg.seed).state_dict().items()}
    common: dict[str, Any] = dict(data=data, stream="shared", progress=False, quiet=True)
    rec = TorchRecorder()
    ts = ttrain.train_and_evaluate(cfg, init_state_dict=sd, compile=False, hooks=rec, **common)
    tf = TeacherForcing(rec)
    js = jtrain.train_and_evaluate(cfg, init_variables=h.to_flax(sd), hooks=tf, **common)
    return Runs(cfg, data, rec, tf, js, ts)


def _loss_figures(r: Runs) -> tuple[list[Figure], list[float]]:
    """Per-step losses from identical states: the worst relative difference."""
    loss_rel = [
        abs(r.tf.loss[t] - r.rec.loss[t]) / max(abs(r.rec.loss[t]), 1e-12)
        if t in r.tf.loss
        else math.inf
        for t in r.steps
    ]
    worst = int(np.argmax(loss_rel))
    title = f"step loss relative |diff| / {LOSS_RTOL:g}, worst of {len(loss_rel)} steps"
    return [Figure(f"{title} (step {worst})", loss_rel[worst] / LOSS_RTOL, 1.0)], loss_rel


def _start_figures(r: Runs) -> list[Figure]:
    """The state entering the first step: the same weights plus each trainer's own
    data-dependent init (the whitening kernels), so it must match to float32 rounding."""
    start = r.tf.carried.get(r.steps[0])
    if start is None:
        return []
    got = leaves({"params": start.params, "ema": start.ema["params"]})
    snap = r.rec.pre[r.steps[0]]
    params = snap["variables"]["params"]
    want = leaves({"params": params, "ema": snap.get("ema", {}).get("params", params)})
    missing = [name for name in want if name not in got]
    pairs = ((max_abs(got[n], w) / max(float(np.abs(w).max()), 1e-30), n) for n, w in want.items())
    ratio, where = (math.inf, f"{missing[0]} missing") if missing else _worst(pairs, "")
    title = "weights entering step 1 (after the whitening init): max |diff| / max |x|"
    return [Figure(f"{title} / {START_RTOL:g}, worst ({where})", ratio / START_RTOL, 1.0)]


def _state_figures(r: Runs) -> tuple[list[Figure], dict[str, dict[str, Any]]]:
    """The state after each step and at each evaluation (what JAX carries on) against torch's."""
    rec, tf, steps = r.rec, r.tf, r.steps
    ends = [
        (f"step {t}", tf.carried.get(t + 1), rec.pre[t + 1], rec.pre[t])
        for t in steps
        if t + 1 in rec.pre
    ]
    per_epoch = steps_per_epoch(r.cfg, r.cfg.subset or 0)
    for e, snap in rec.at_eval.items():
        last = max(s for s in steps if s < (e + 1) * per_epoch)
        ends.append((f"epoch {e + 1} end", tf.at_eval.get(e), snap, rec.pre[last]))
    figures: list[Figure] = []
    rows: dict[str, dict[str, Any]] = {}
    stats_pairs, gross_pairs = [], []
    for label, jstate, want_snap, before_snap in ends:
        if jstate is None:
            figures.append(Figure(f"{label}: JAX state recorded", 0.0, 1.0, ">="))
            continue
        got = _jax_parts(jstate)
        want, before = _torch_parts(want_snap, got), _torch_parts(before_snap, got)
        with_ema = r.cfg.ema_every > 0  # without, JAX's EMA slot is an unused copy
        tight = _stats_ratios(got, want, before, with_ema)
        # torch leaves frozen parameters' momentum buffers alone; JAX's may move, unused
        gross = _gross_ratios(got, want, before, before_snap["frozen"], with_ema)
        name = max(tight, key=lambda k: tight[k])
        part = max(gross, key=lambda k: gross[k])
        rows[label] = {"stats": tight[name], "stats_tensor": name, **gross}
        stats_pairs.append((tight[name], f"{label}, {name}"))
        gross_pairs.append((gross[part], f"{label}, {part}"))
    (stats, s_where), (gross, g_where) = _worst(stats_pairs, ""), _worst(gross_pairs, "")
    bn = "BN statistics (live, EMA) after a step: |diff| / (3e-4 |change| + 8 ulp)"
    whole = f"params, momentum, EMA params after a step: ||diff|| / ||change|| / {GROSS_RTOL:g}"
    figures.append(Figure(f"{bn}, worst ({s_where})", stats, 1.0))
    figures.append(Figure(f"{whole}, worst ({g_where})", gross / GROSS_RTOL, 1.0))
    return figures, rows


def _ema_figures(r: Runs) -> list[Figure]:
    """The EMA decay each trainer applied at each step (1: no EMA update), recovered; with
    lookahead, JAX's resets instead, exactly."""
    cfg = r.cfg
    if not cfg.ema_every:
        return []
    title = "applied EMA decay vs schedule / (4 x rounding bound + 1e-7)"
    pairs: dict[str, list[tuple[float, int]]] = {"jax": []}
    if cfg.lookahead:  # after each EMA step the live net equals its EMA, else the EMA is kept
        for t in (t for t in r.steps if t in r.tf.post):
            post, pre = _jax_parts(r.tf.post[t]), _jax_parts(r.tf.injected[t])
            live, ema1, ema0 = _live(post), leaves(post["ema"]), leaves(pre["ema"])
            a, b = (live, ema1) if (t + 1) % cfg.ema_every == 0 else (ema1, ema0)
            bad = max(float(np.abs(a[k] - b[k]).max()) for k in a)  # must be 0
            pairs["jax"].append((bad / 1e-30 if bad else 0.0, t))
        return _per_framework(title, pairs)
    decays, pairs["torch"] = schedule.ema_decays(cfg, len(r.steps)), []
    for t, runs in r.stepped():
        m = float(decays[t + 1]) if (t + 1) % cfg.ema_every == 0 else 1.0
        for fw, (pre, post) in runs.items():
            d, err = _applied_decay(pre, post)
            pairs[fw].append((abs(d - m) / (4 * err + 1e-7), t))
    return _per_framework(title, pairs)


def _lr_figures(r: Runs, labels: dict[str, str]) -> tuple[list[Figure], list[dict[str, Any]]]:
    """The LR each trainer applied, recovered from its own update, against `lr_at(t)`."""
    cfg, spe = r.cfg, steps_per_epoch(r.cfg, r.cfg.subset or 0)
    lr_peak = optimizer_scales(cfg)[0]
    mults = {"default": 1.0, "bn_bias": cfg.bn_bias_lr_mult}
    rows: list[dict[str, Any]] = []
    pairs: dict[str, list[tuple[float, int]]] = {"jax": [], "torch": []}
    for t, runs in r.stepped():
        if cfg.lookahead and (t + 1) % cfg.ema_every == 0:
            continue  # the lookahead reset overwrites the update
        want = float(schedule.lr_at(t, cfg, spe))
        row: dict[str, Any] = {"step": t, "reference": want}
        for fw, (pre, post) in runs.items():
            for group, (lr, err) in _applied_lr(pre, post, cfg, labels).items():
                scale = lr_peak * mults[group]
                pairs[fw].append((abs(lr - want * mults[group]) / (4 * err + 1e-6 * scale), t))
                row[f"{fw} {group}"] = lr / mults[group]
        rows.append(row)
    figures = _per_framework("applied LR vs lr_at(t) / (4 x rounding bound + 1e-6 peak)", pairs)
    figures.append(Figure("LR steps recovered", len(rows), max(1, len(r.steps) // 2), ">=", False))
    return figures, rows


def _wd_figures(r: Runs, labels: dict[str, str]) -> tuple[list[Figure], list[dict[str, Any]]]:
    """The coupled weight decay each trainer applied, recovered from its momentum buffers."""
    wd = optimizer_scales(r.cfg)[1]
    wd_want = {"default": wd, "bn_bias": wd * r.cfg.bn_bias_wd_mult}
    grads = _step_gradients(r)
    rows: list[dict[str, Any]] = []
    pairs: dict[str, list[tuple[float, int]]] = {"jax": [], "torch": []}
    for t, runs in r.stepped():
        row: dict[str, Any] = {"step": t}
        for fw, (pre, post) in runs.items():
            applied = _applied_weight_decay(pre, post, grads[fw][t], r.cfg, labels)
            for group, (got, err) in applied.items():
                want = wd_want[group]
                pairs[fw].append((abs(got - want) / (4 * err + 1e-3 * want + 1e-12), t))
                row[f"{fw} {group}"] = got
        rows.append(row)
    title = "applied weight decay vs config / (4 x error scale + 1e-3 wd)"
    return _per_framework(title, pairs), rows


def _metric_figures(r: Runs) -> tuple[list[Figure], list[dict[str, Any]]]:
    """Each evaluation of identical weights: the trainers' own loss and accuracies."""
    figures, rows = [], []
    keys = ("val_loss", "val_acc", "ema_val_acc")
    for e in sorted(r.rec.at_eval):
        jr, tr = r.jax_summary["epochs"][e], r.torch_summary["epochs"][e]
        both = (("jax", jr), ("torch", tr))
        rows.append({"epoch": e + 1, **{f"{fw} {k}": s[k] for fw, s in both for k in keys}})
        rel = abs(jr["val_loss"] - tr["val_loss"]) / max(abs(tr["val_loss"]), 1e-12)
        title = f"epoch {e + 1} val_loss relative |diff| / {LOSS_RTOL:g}"
        figures.append(Figure(title, rel / LOSS_RTOL, 1.0))
    return figures, rows


def _logit_figures(r: Runs) -> tuple[list[Figure], dict[str, float]]:
    """The final weights' logits, each trainer's own evaluation (every TTA view and combined),
    and the final accuracies."""
    cfg, n_test = r.cfg, r.cfg.test_subset or 0
    final = r.rec.at_eval[max(r.rec.at_eval)]
    images = np.asarray(r.data.test_images[:n_test])
    logits_fn = jax.jit(jtrain.make_logits_fn(cfg, models.model_from_config(cfg)))
    mean, std = device_stats(cfg.dataset, torch.device("cpu"))
    figures: list[Figure] = []
    rows: dict[str, float] = {}
    for label, v in (("live", final["variables"]), ("ema", final.get("ema"))):
        if v is None:
            continue
        jv, jc = (np.asarray(a) for a in logits_fn(jax.device_put(v), jnp.asarray(images)))
        net = tmodel_mod.model_from_config(cfg)
        net.load_state_dict(convert.flax_to_torch(v))
        net.eval()
        with torch.no_grad():
            tv, tc = ttrain.eval_logits(net, torch.from_numpy(images), mean, std, cfg, bf16=False)
        tv, tc = tv.numpy(), tc.numpy()
        scale = max(float(np.abs(tv).max()), 1e-12)
        per_view = [float(np.abs(jv[i] - tv[i]).max()) / scale for i in range(len(tv))]
        rows[f"{label} views"] = max(per_view) if jv.shape == tv.shape else math.inf
        rows[f"{label} TTA"] = float(np.abs(jc - tc).max()) / scale
        titles = {"views": f"eval logits, {len(tv)} TTA views:", "TTA": "TTA-combined logits"}
        for key, what in titles.items():
            name = f"{label} {what} max |diff| / max |x| / {LOGITS_RTOL:g}"
            figures.append(Figure(name, rows[f"{label} {key}"] / LOGITS_RTOL, 1.0))
        if cfg.tta_select:  # the trainers score these, not the weighted views
            selective, sel_rows, jc, tc = _selective_figures(label, jv, tv, cfg.tta_select, scale)
            figures += selective
            rows.update(sel_rows)
        metric = "val_acc" if label == "live" else "ema_val_acc"
        flips = abs(r.jax_summary["final"][metric] - r.torch_summary["final"][metric]) * n_test
        # images whose top-2 TTA logits are this close may be scored either way
        slack, top2 = MARGIN_FACTOR * float(np.abs(jc - tc).max()), np.sort(tc, axis=1)[:, -2:]
        allowed = int(np.sum(top2[:, 1] - top2[:, 0] <= slack))
        name = f"final {metric}: images scored differently (allowed: {allowed} ambiguous)"
        figures.append(Figure(name, round(flips), allowed, headline=False))
    return figures, rows


def _selective_figures(
    label: str, jv: np.ndarray, tv: np.ndarray, fraction: float, scale: float
) -> tuple[list[Figure], dict[str, float], np.ndarray, np.ndarray]:
    """Selective TTA of each trainer's 6 view logits (`stream.selective_tta`): the images
    each picks (a swap allowed only across a boundary closer than the plain views' noise
    allows), and the logits they score; also returns those logits (jax, torch)."""
    if len(jv) != 6 or jv.shape != tv.shape:
        raise AssertionError(f"selective TTA needs 6 views in both trainers, got {jv.shape}")
    (jc, j_sel), (tc, t_sel) = (selective_tta(v[0], v, fraction) for v in (jv, tv))
    confidence = [np.exp(v[0] - v[0].max(1, keepdims=True)) for v in (jv, tv)]
    jconf, tconf = (1.0 / c.sum(1) for c in confidence)
    k = len(t_sel)
    order = np.sort(tconf)
    edge = (order[k - 1] + order[min(k, len(order) - 1)]) / 2 if k else -np.inf
    slack = MARGIN_FACTOR * float(np.abs(jconf - tconf).max())
    allowed = 2 * int(np.sum(np.abs(tconf - edge) <= slack))
    swapped = len(np.setxor1d(j_sel, t_sel))
    diff = float(np.abs(jc - tc).max()) / scale
    picked = f"{label} selective TTA: images picked differently (allowed: {allowed} near the edge)"
    logits = f"{label} selective-TTA logits max |diff| / max |x| / {LOGITS_RTOL:g}"
    figures = [Figure(picked, swapped, allowed), Figure(logits, diff / LOGITS_RTOL, 1.0)]
    return figures, {f"{label} selected": float(k), f"{label} selective": diff}, jc, tc


def check_trainer(ctx: Context) -> CheckResult:
    """Both trainers' own loop and evaluation, each step from the same state (module doc)."""
    r = run_trainers(ctx, trainer_config(ctx))
    params0 = r.rec.pre[0]["variables"]["params"]
    # Muon's filters apart: the SGD recoveries below do not model their update, which the
    # state after every step holds to the same bound as the rest
    with_muon = r.cfg.optimizer == "muon"
    labels = {k: str(v) for k, v in leaves(optim.param_labels(params0, with_muon)).items()}
    loss_figs, loss_rel = _loss_figures(r)
    state_figs, state_rows = _state_figures(r)
    lr_figs, lr_rows = _lr_figures(r, labels)
    wd_figs, wd_rows = _wd_figures(r, labels)
    eval_figs, eval_rows = _metric_figures(r)
    logit_figs, view_rows = _logit_figures(r)
    figures = [*loss_figs, *_start_figures(r), *state_figs, *_ema_figures(r), *lr_figs, *wd_figs]
    res = CheckResult(6, "trainer", figures=[*figures, *eval_figs, *logit_figs])
    cfg = r.cfg.to_dict()
    shown = ("model", "widths", "subset", "test_subset", "batch_size", "epochs")
    res.details = {
        "config": {k: cfg[k] for k in shown},
        "steps": len(r.steps),
        "jax_losses": [r.tf.loss.get(t) for t in r.steps],
        "torch_losses": [r.rec.loss[t] for t in r.steps],
        "loss_relative_diff": loss_rel,
        "state_after_step": state_rows,
        "applied_lr": lr_rows,
        "applied_weight_decay": wd_rows,
        "evaluation": eval_rows,
        "logits_relative_diff": view_rows,
        "synthetic_data": ctx.data is None,
    }
    return res
