"""Train the Flax ResNet-9 on CIFAR: `train_and_evaluate(cfg)` and `python -m jaxbench.train`.

Everything between the data load and the summary runs on the device: images stay
uint8 there, each epoch's plan is drawn on the device (`stream="fast"`) or moved
once per epoch (`stream="shared"`), and augmentation plus normalisation happen
inside the jitted step. The loop is chosen per backend (`cfg.loop`): one
`lax.scan` per epoch on accelerators, a Python loop over one compiled step on
the CPU (XLA:CPU runs convolutions inside a while loop ~30x slower). Neither
loop synchronises with the host inside an epoch; metrics are fetched once per
epoch. All functions are compiled ahead of time and `compile_seconds` is
reported apart from `total_time_seconds` (training steps + final evaluation);
with a `CompileCache` (the benchmark's) runs of other seeds reuse them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxbench import augment, checkpoint, cli, configs, layers, models, optim, parallel
from jaxbench.configs import Config
from jaxbench.profiling import JaxProfile, format_top_ops
from jaxbench.progress import progress_bar
from jaxbench.report import FINAL_KEYS, RunRecorder, environment
from jaxbench.stream import epoch_plan, steps_per_epoch

PyTree = Any
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes; a pytree, so it can be donated and scanned."""

    step: jax.Array  # int32: optimizer updates done so far
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema: PyTree  # {'params', 'batch_stats'}: the EMA copy evaluated as ema_val_acc

    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def check_supported(cfg: Config) -> None:
    """Refuse config fields this trainer does not implement (see `configs.check_supported`),
    and a device count this machine lacks or a batch that does not split over it."""
    configs.check_supported(cfg, "jaxbench.train")
    parallel.check_batch(cfg, parallel.global_devices(cfg))


def resolve_loop(cfg: Config) -> str:
    """`auto`: whole-epoch scan on accelerators, per-step jit on the CPU."""
    if cfg.loop != "auto":
        return cfg.loop
    return "step" if jax.default_backend() == "cpu" else "scan"


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, data key): the seed is split once; epochs are folded into the data key."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def host_arrays(
    cfg: Config, data: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(train images, labels, test images, labels, steps per epoch) of `cfg`'s subsets,
    as uint8 / int32 host arrays; a one-line ValueError when nothing could train."""
    train_x = np.asarray(data.train_images[: cfg.subset], np.uint8)
    train_y = np.asarray(data.train_labels[: cfg.subset], np.int32)
    test_x = np.asarray(data.test_images[: cfg.test_subset], np.uint8)
    test_y = np.asarray(data.test_labels[: cfg.test_subset], np.int32)
    steps = steps_per_epoch(cfg, len(train_x))
    if steps == 0:
        raise ValueError(
            f"{len(train_x)} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size or raise --subset"
        )
    if len(test_x) == 0:
        raise ValueError("the test set is empty; check the data or --test-subset")
    return train_x, train_y, test_x, test_y, steps


def _fresh_copy(tree: PyTree) -> PyTree:
    """Float32 device copies, so donating the train state never invalidates a caller's arrays."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), tree)


def create_train_state(
    model: models.ResNet9,
    tx: optax.GradientTransformation,
    key: jax.Array,
    init_variables: PyTree | None = None,
) -> TrainState:
    """Initial state from `key`, or from given {'params', 'batch_stats'} (parity plants)."""
    fresh = models.init_variables(model, key)
    if init_variables is not None:
        given = {"params": init_variables["params"], "batch_stats": init_variables["batch_stats"]}
        want = jax.tree_util.tree_map(jnp.shape, fresh)
        got = jax.tree_util.tree_map(jnp.shape, given)
        if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
            raise ValueError(
                "init_variables do not match the model built from the config "
                "(names or shapes differ); check --widths and the conversion"
            )
        fresh = given
    variables = _fresh_copy(fresh)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        ema=_fresh_copy(variables),
    )


def make_loss_fn(
    cfg: Config, model: models.ResNet9
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, PyTree]]]:
    """`loss_fn(params, batch_stats, images_u8, labels) -> (loss, (logits, new_batch_stats))`.

    The training loss exactly as the step computes it: normalisation of the uint8
    batch, the train-mode forward and the configured (label-smoothed, summed or
    mean) cross-entropy. The parity suite differentiates this very function.
    """
    dtype = models.compute_dtype(cfg)

    def loss_fn(
        params: PyTree, batch_stats: PyTree, images_u8: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        x = augment.normalize(images_u8, cfg.dataset, dtype)
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optim.cross_entropy(logits, labels, cfg.label_smoothing, cfg.loss_reduction)
        return loss, (logits, mutated["batch_stats"])

    return loss_fn


def make_train_step(
    cfg: Config,
    model: models.ResNet9,
    tx: optax.GradientTransformation,
    total_steps: int | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]]:
    """The pure step `(state, {'images': uint8 NHWC augmented, 'labels'}) -> (state, metrics)`.

    Metrics: `loss` is the mean per-example (label-smoothed) loss whatever
    `loss_reduction`, `correct` the number of right predictions in the batch.
    With `cfg.lookahead` the EMA step also resets the net to the EMA; its decay
    ramp needs `total_steps` (the run's number of updates).
    """
    if cfg.lookahead and total_steps is None:
        raise ValueError("cfg.lookahead needs total_steps for the decay ramp")
    loss_fn = make_loss_fn(cfg, model)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        labels = batch["labels"]
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch["images"], labels
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        live = {"params": params, "batch_stats": batch_stats}
        if cfg.lookahead:
            assert total_steps is not None
            ema, live = optim.lookahead_update(state.ema, live, step, cfg, total_steps)
            params, batch_stats = live["params"], live["batch_stats"]
        else:
            ema = optim.maybe_ema_update(state.ema, live, step, cfg)
        new_state = TrainState(step, params, batch_stats, opt_state, ema)
        mean_loss = loss / labels.shape[0] if cfg.loss_reduction == "sum" else loss
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
        return new_state, {"loss": mean_loss.astype(jnp.float32), "correct": correct}

    return train_step


def make_loop_fns(
    cfg: Config,
    model: models.ResNet9,
    tx: optax.GradientTransformation,
    total_steps: int | None = None,
    batch_split: NamedSharding | None = None,
) -> tuple[Callable[..., tuple[TrainState, Metrics]], Callable[..., tuple[TrainState, Metrics]]]:
    """(step_fn, epoch_fn), both uncompiled.

    `step_fn(state, images, labels, plan, i)` runs batch i of an epoch plan;
    `epoch_fn(state, images, labels, plan)` scans it over every batch of the plan
    and returns per-step metrics stacked along axis 0. `batch_split`: lay each
    batch over a device mesh (`parallel.Topology.batch_split`); the mathematics
    is unchanged.
    """
    train_step = make_train_step(cfg, model, tx, total_steps)

    def step_fn(
        state: TrainState, images: jax.Array, labels: jax.Array, plan: augment.Plan, i: jax.Array
    ) -> tuple[TrainState, Metrics]:
        bp = augment.plan_batch(plan, i, cfg.batch_size)
        batch = {"images": augment.apply_plan(images, bp, cfg), "labels": labels[bp["indices"]]}
        return train_step(state, parallel.split_batch(batch, batch_split))

    def epoch_fn(
        state: TrainState, images: jax.Array, labels: jax.Array, plan: augment.Plan
    ) -> tuple[TrainState, Metrics]:
        steps = plan["indices"].shape[0] // cfg.batch_size

        def body(s: TrainState, i: jax.Array) -> tuple[TrainState, Metrics]:
            return step_fn(s, images, labels, plan, i)

        return jax.lax.scan(body, state, jnp.arange(steps, dtype=jnp.int32))

    return step_fn, epoch_fn


def make_logits_fn(
    cfg: Config, model: models.ResNet9
) -> Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]:
    """`logits_fn(variables, images_u8) -> (per-view logits [V, N, C], TTA logits [N, C])`.

    What evaluation scores: normalisation, the eval-mode forward, and the
    test-time views of `cfg` (`augment.tta_logits`). The parity suite calls it.
    """
    dtype = models.compute_dtype(cfg)

    def logits_fn(variables: PyTree, images_u8: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = augment.normalize(images_u8, cfg.dataset, dtype)
        return augment.tta_logits(lambda v: model.apply(variables, v, train=False), x, cfg)

    return logits_fn


def make_eval_fn(
    cfg: Config,
    model: models.ResNet9,
    eval_batch: int,
    with_ema: bool,
    batch_split: NamedSharding | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """`eval_fn(acc, variables, ema_variables, images, labels, valid, i) -> acc` for batch i.

    Sums of the cross-entropy (no label smoothing) and of correct predictions of
    the TTA logits (`make_logits_fn`), over valid (unpadded) test images;
    `batch_split` lays the batch over a device mesh.
    """
    logits_fn = make_logits_fn(cfg, model)

    def eval_fn(
        acc: dict[str, jax.Array],
        variables: PyTree,
        ema_variables: PyTree,
        images: jax.Array,
        labels: jax.Array,
        valid: jax.Array,
        i: jax.Array,
    ) -> dict[str, jax.Array]:
        start = i * eval_batch
        x = jax.lax.dynamic_slice_in_dim(images, start, eval_batch)
        y = jax.lax.dynamic_slice_in_dim(labels, start, eval_batch)
        w = jax.lax.dynamic_slice_in_dim(valid, start, eval_batch)
        x, y, w = parallel.split_batch((x, y, w), batch_split)

        def score(prefix: str, v: PyTree) -> dict[str, jax.Array]:
            _, logits = logits_fn(v, x)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
            right = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
            return {
                prefix + "loss": acc[prefix + "loss"] + jnp.sum(ce * w),
                prefix + "correct": acc[prefix + "correct"] + jnp.sum(right * w),
            }

        out = score("", variables)
        if with_ema:
            out.update(score("ema_", ema_variables))
        return out

    return eval_fn


def _set_whitening(
    state: TrainState,
    moments: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    cfg: Config,
    topo: parallel.Topology | None = None,
) -> TrainState:
    """The whitening stem's kernel from the training images, in the net and its EMA.

    The exact integer patch moments are summed on the device (`moments`, compiled
    `layers.patch_moment_groups` of the first `cfg.whiten_images`); the small int64
    result is finished on the host in float64 by `jaxbench.whitening`, so
    torch_ref loads the very same kernel.
    """
    from jaxbench.whitening import (
        covariance_from_moments,
        kernel_OIHW_to_HWIO,
        moments_from_groups,
        whitening_for_config,
    )

    groups = parallel.fetch(moments(images))
    patch = layers.whiten_patch(cfg)
    cov = covariance_from_moments(*moments_from_groups(groups), dataset=cfg.dataset, patch=patch)
    kernel = kernel_OIHW_to_HWIO(whitening_for_config(cov, cfg.whiten, cfg.whiten_eps))
    path = layers.whiten_path(cfg)
    # two device copies: the state is donated, and one buffer must not be donated twice
    topo = topo or parallel.Topology.single()
    live = layers.with_whitening(state.variables(), parallel.replicate(kernel, topo), path)
    ema = layers.with_whitening(state.ema, parallel.replicate(kernel, topo), path)
    return state.replace(params=live["params"], ema=ema)


def _eval_zeros(with_ema: bool) -> dict[str, jax.Array]:
    keys = ["loss", "correct"] + (["ema_loss", "ema_correct"] if with_ema else [])
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)]) if n > len(x) else x


@dataclasses.dataclass
class Programs:
    """A run's compiled functions; they depend on the config and the shapes, never on the seed."""

    run: Any  # compiled epoch (scan) or step (step)
    plan: Any  # compiled `augment.draw_plan(data_key, epoch)`
    eval_both: Any  # compiled eval batch of the net and its EMA (or the net alone)
    eval_one: Any  # compiled eval batch of one weight set (the EMA equals the net)
    moments: Any  # compiled whitening moments (a whitening stem) or None
    seconds: float  # what compiling them took


class CompileCache:
    """Compiled programs reused across runs of one process (the benchmark's seeds).

    Keyed by the config without its seed and output folder, the data shapes, the
    loop, the backend and the parameter tree, so a run of a new seed reuses the
    executables (and their warmed-up kernels) instead of compiling again.
    Opt-in: the parity suite patches trainer functions between runs and must
    not reuse a program traced before the patch. `compiles` counts misses.
    """

    def __init__(self) -> None:
        self._programs: dict[Any, Programs] = {}
        self.compiles = 0
        self.hits = 0

    def get(self, key: Any, build: Callable[[], Programs]) -> tuple[Programs, bool]:
        """(programs, built): `build()` on a miss, the stored programs on a hit."""
        if key in self._programs:
            self.hits += 1
            return self._programs[key], False
        programs = build()
        self._programs[key] = programs
        self.compiles += 1
        return programs, True


@dataclasses.dataclass
class Run:
    """What `setup` builds for one run: the compiled functions and the data on the device."""

    cfg: Config
    loop: str  # "scan" or "step"
    stream: str  # "fast" or "shared"
    steps: int  # optimizer steps per epoch
    n_train: int
    n_test: int
    state: TrainState  # the initial state
    images: jax.Array  # uint8 NHWC training images on the device
    labels: jax.Array
    programs: Programs
    compiled: bool  # whether this run compiled its programs (False: reused from the cache)
    make_plan: Callable[[int], augment.Plan]
    evaluate: Callable[..., dict[str, float]]  # (state, same_weights=False) -> metrics
    compile_seconds: float
    data_source: str = "arrays in memory"  # where the images came from (`Dataset.source`)
    topology: parallel.Topology = dataclasses.field(default_factory=parallel.Topology.single)

    @property
    def run(self) -> Any:
        return self.programs.run


class Hooks:
    """Observation points in the training loop, for the parity suite (no-ops by default).

    They need the per-step loop (`cfg.loop="step"`). `before_step` and
    `before_eval` may return a replacement state: the parity suite uses that
    to start each step from the reference trainer's state, so float32 chaos
    cannot build up between the two frameworks.
    """

    def before_step(self, t: int, state: TrainState) -> TrainState:
        return state

    def after_step(self, t: int, state: TrainState, metrics: Metrics) -> None:
        pass

    def before_eval(self, epoch: int, state: TrainState) -> TrainState:
        return state


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_variables: PyTree | None = None,
    stream: str = "fast",
    compile_cache: CompileCache | None = None,
) -> Run:
    """Data on the device, the initial state, every function compiled ahead of time.

    With a `compile_cache`, a run whose config and shapes were compiled before
    in this process reuses those executables (`Run.compiled` is False).
    """
    if stream not in ("fast", "shared"):
        raise ValueError(f"stream must be 'fast' or 'shared', got {stream!r}")
    check_supported(cfg)
    cfg = parallel.resolve(cfg)
    topo = parallel.topology(cfg)
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
    train_x, train_y, test_x, test_y, steps = host_arrays(cfg, data)
    n_train, n_test = len(train_x), len(test_x)

    loop = resolve_loop(cfg)
    with_ema = cfg.ema_every > 0
    model = models.model_from_config(cfg)
    tx = optim.make_optimizer(cfg, steps)
    init_key, data_key = seed_keys(cfg.seed)
    state = parallel.replicate(create_train_state(model, tx, init_key, init_variables), topo)

    # --- data on the device, once (on every device of a mesh) ------------------------
    images, labels = parallel.replicate((train_x, train_y), topo)
    eval_batch = min(cfg.eval_batch_size, n_test)
    if topo.devices > 1 and eval_batch % topo.devices:
        raise ValueError(
            f"the test set ({n_test} images) is smaller than --eval-batch-size and does not "
            f"split over {topo.devices} devices: use --test-subset a multiple of {topo.devices}"
        )
    eval_steps = math.ceil(n_test / eval_batch)
    padded = eval_steps * eval_batch
    t_images, t_labels, t_valid = parallel.replicate(
        (
            _pad_to(test_x, padded),
            _pad_to(test_y, padded),
            _pad_to(np.ones(n_test, np.float32), padded),
        ),
        topo,
    )
    jax.block_until_ready((images, labels, t_images, t_labels, t_valid))  # untimed transfer
    everywhere = {} if topo.mesh is None else {"out_shardings": topo.replicated}

    # --- ahead-of-time compilation (or reuse) ------------------------------------------
    plan_spec = jax.eval_shape(lambda: augment.draw_plan(data_key, 0, n_train, cfg))
    eval_zero = _eval_zeros(with_ema)
    eval_zero_one = _eval_zeros(False)
    whiten_n = min(cfg.whiten_images, n_train) if layers.whiten_patch(cfg) else 0

    def build() -> Programs:
        t0 = time.perf_counter()
        split = topo.batch_split
        step_fn, epoch_fn = make_loop_fns(cfg, model, tx, cfg.epochs * steps, split)
        plan_c = (
            jax.jit(lambda key, epoch: augment.draw_plan(key, epoch, n_train, cfg), **everywhere)
            .lower(data_key, np.int32(0))
            .compile()
        )
        if loop == "scan":
            run_c = (
                jax.jit(epoch_fn, donate_argnums=0, **everywhere)
                .lower(state, images, labels, plan_spec)
                .compile()
            )
        else:
            run_c = (
                jax.jit(step_fn, donate_argnums=0, **everywhere)
                .lower(state, images, labels, plan_spec, np.int32(0))
                .compile()
            )
        args = (state.variables(), state.ema, t_images, t_labels, t_valid, np.int32(0))
        eval_both = (
            jax.jit(make_eval_fn(cfg, model, eval_batch, with_ema, split), **everywhere)
            .lower(eval_zero, *args)
            .compile()
        )
        eval_one = (
            jax.jit(make_eval_fn(cfg, model, eval_batch, False, split), **everywhere)
            .lower(eval_zero_one, *args)
            .compile()
            if with_ema
            else eval_both
        )
        moments = None
        if whiten_n:
            patch = layers.whiten_patch(cfg)
            moments = (
                jax.jit(lambda x: layers.patch_moment_groups(x[:whiten_n], patch), **everywhere)
                .lower(images)
                .compile()
            )
        return Programs(run_c, plan_c, eval_both, eval_one, moments, time.perf_counter() - t0)

    if compile_cache is None:
        programs, compiled = build(), True
    else:
        key = (
            cfg.replace(seed=0, out=None),
            n_train,
            n_test,
            loop,
            jax.default_backend(),
            jax.tree_util.tree_structure(state),
            tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)),
        )
        programs, compiled = compile_cache.get(key, build)
    compile_seconds = programs.seconds if compiled else 0.0

    def make_plan(epoch: int) -> augment.Plan:
        if stream == "fast":
            return programs.plan(data_key, np.int32(epoch))
        host_plan = augment.plan_to_device(epoch_plan(cfg, epoch, n_train))
        return host_plan if topo.mesh is None else parallel.replicate(host_plan, topo)

    def evaluate(st: TrainState, same_weights: bool = False) -> dict[str, float]:
        """Sums over the test set; `same_weights`: the EMA equals the net (lookahead's end),
        so it is scored once and its accuracy copied."""
        one = same_weights and with_ema
        fn, acc = (programs.eval_one, eval_zero_one) if one else (programs.eval_both, eval_zero)
        for i in range(eval_steps):
            acc = fn(acc, st.variables(), st.ema, t_images, t_labels, t_valid, np.int32(i))
        acc = parallel.fetch(acc)  # fetching the sums synchronises
        out = {"val_loss": float(acc["loss"]) / n_test, "val_acc": float(acc["correct"]) / n_test}
        if not with_ema:
            out["ema_val_acc"] = None
        elif one:
            out["ema_val_acc"] = out["val_acc"]
        else:
            out["ema_val_acc"] = float(acc["ema_correct"]) / n_test
        return out

    return Run(
        cfg=cfg,
        loop=loop,
        stream=stream,
        steps=steps,
        n_train=n_train,
        n_test=n_test,
        state=state,
        images=images,
        labels=labels,
        programs=programs,
        compiled=compiled,
        make_plan=make_plan,
        evaluate=evaluate,
        compile_seconds=compile_seconds,
        data_source=getattr(data, "source", None) or "arrays in memory",
        topology=topo,
    )


def train_epoch(
    r: Run, state: TrainState, epoch: int, *, progress: bool = False, hooks: Hooks | None = None
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """One epoch of training; returns the state and the per-step metrics, fetched once.

    Nothing synchronises with the host inside the epoch (unless `hooks` observe it).
    The caller times it: the state is ready when this returns.
    """
    cfg = r.cfg
    plan = r.make_plan(epoch)
    if r.loop == "scan":
        if hooks is not None:
            raise ValueError("training hooks need the per-step loop: set --loop step")
        state, metrics = r.run(state, r.images, r.labels, plan)
    else:
        per_step = []
        bar = progress_bar(
            range(r.steps),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if progress else True,  # None: off unless a terminal
            file=sys.stderr,
        )
        for i in bar:
            t = epoch * r.steps + i
            if hooks is not None:
                state = hooks.before_step(t, state)
            state, m = r.run(state, r.images, r.labels, plan, np.int32(i))
            if hooks is not None:
                hooks.after_step(t, state, m)
            per_step.append(m)  # stays on the device until the epoch ends
        bar.close()
    if cfg.lookahead and epoch == cfg.epochs - 1:  # airbench ends with net = EMA
        state = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])
    jax.block_until_ready(state)
    if r.loop == "scan":
        host = parallel.fetch(metrics)  # the one fetch of the epoch
    else:
        fetched = parallel.fetch(per_step)
        host = {k: np.stack([m[k] for m in fetched]) for k in fetched[0]}
    return state, host


def train_and_evaluate(
    cfg: Config,
    workdir: str | os.PathLike[str] | None = None,
    *,
    data: Any = None,
    init_variables: PyTree | None = None,
    stream: str = "fast",
    progress: bool = True,
    quiet: bool = False,
    return_variables: bool = False,
    hooks: Hooks | None = None,
    compile_cache: CompileCache | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train per `cfg`, evaluate every epoch, and return the summary of docs/design.md.

    `setup` -> `train_epoch` per epoch (+ evaluation) -> summary.
    `data`: a `jaxbench.data.Dataset` (loaded from the config when None; subset
    prefixes are applied either way). `init_variables`: start from these
    {'params', 'batch_stats'} instead of the seeded init. `stream`: 'fast'
    (plan drawn with jax.random on the device) or 'shared' (`stream.epoch_plan`).
    `workdir` (default `cfg.out`) receives config.json, metrics.jsonl and
    summary.json. `return_variables` adds the final `variables` and
    `ema_variables` (numpy pytrees) to the returned dict, not to summary.json.
    `hooks`: see `Hooks` (parity suite). `compile_cache`: reuse compiled programs
    across runs (see `CompileCache`). `profile_dir`: trace the timed region with
    `jax.profiler` into that folder and add `profile` (trace path, top
    operations) to the summary. `resume`: a run folder (default `workdir`) whose
    latest checkpoint (`cfg.checkpoint_every`) the run continues from, bit for bit;
    `cfg` must be that run's. Raises FloatingPointError, naming the epoch,
    when the training loss is not finite.
    """
    if workdir is None:
        workdir = resume if resume is not None else cfg.out
    if jax.process_count() > 1:
        if resume is not None or cfg.checkpoint_every:
            raise ValueError(
                "--checkpoint-every and --resume run in a single process; drop them "
                "from a multi-process run"
            )
        if jax.process_index() != 0:  # one process writes and prints for the run
            workdir, quiet, progress = None, True, False
    if cfg.checkpoint_every and workdir is None:
        raise ValueError("--checkpoint-every needs a run folder: pass --out DIR")
    ckpt, saved = None, None
    if resume is not None:
        ckpt, saved = checkpoint.load_progress(resume, cfg, "jax", stream)
    r = setup(cfg, data, init_variables=init_variables, stream=stream, compile_cache=compile_cache)
    cfg = r.cfg  # `devices` resolved to the count the run uses
    recorder = RunRecorder(cfg.to_dict(), workdir, quiet, rows=(saved or {}).get("rows", []))
    with recorder.watch():  # Ctrl-C: status.json says "interrupted"
        profiler = JaxProfile(profile_dir) if profile_dir is not None else None
        ledger = checkpoint.Ledger.from_progress(saved)
        state = _start(r, ledger, ckpt, profiler)
        for epoch in range(ledger.epoch, cfg.epochs):
            state, row = _epoch(
                r, state, epoch, ledger, profiler, hooks=hooks, progress=progress and not quiet
            )
            recorder.epoch(row)  # raises FloatingPointError, naming the epoch, on a NaN loss
            if checkpoint.should_save(cfg, epoch):  # off the clock
                assert workdir is not None
                progress_now = ledger.progress("jax", stream, cfg, recorder.rows)
                checkpoint.save(workdir, epoch + 1, progress_now, _state_writer(state))
        summary = _summary(r, recorder.rows, ledger, stream)
        if profiler:
            summary["profile"] = profiler.finish()
            if not quiet:
                print(
                    format_top_ops(summary["profile"]["top_ops"], "jax: top operations (self time)")
                )
        recorder.finish(summary)
    if return_variables:
        summary = dict(summary)
        summary["variables"] = parallel.fetch(state.variables())
        summary["ema_variables"] = parallel.fetch(state.ema)
    return summary


@contextlib.contextmanager
def _clock(ledger: checkpoint.Ledger, profiler: JaxProfile | None) -> Iterator[None]:
    """A timed region (the caller makes its results ready inside): wall seconds into
    `ledger.timed_seconds`, and the profiler's trace when one records."""
    if profiler:
        profiler.start()
    t0 = time.perf_counter()
    yield
    ledger.timed_seconds += time.perf_counter() - t0
    if profiler:
        profiler.pause()


def _start(
    r: Run, ledger: checkpoint.Ledger, ckpt: Path | None, profiler: JaxProfile | None
) -> TrainState:
    """The state the first epoch starts from: a checkpoint's (`ckpt`), or the set-up
    state with its data-dependent whitening kernel (on the clock, as airbench times it)."""
    if ckpt is not None:  # the whitening kernel is part of the restored params
        return _restore_state(ckpt, r.state)
    state = r.state
    if r.programs.moments is not None:
        with _clock(ledger, profiler):
            state = _set_whitening(state, r.programs.moments, r.images, r.cfg, r.topology)
            jax.block_until_ready(state)
    return state


def _epoch(
    r: Run,
    state: TrainState,
    epoch: int,
    ledger: checkpoint.Ledger,
    profiler: JaxProfile | None,
    *,
    hooks: Hooks | None,
    progress: bool,
) -> tuple[TrainState, dict[str, Any]]:
    """Train epoch `epoch` on the clock, evaluate when due, and return the metrics row.

    Monitoring evaluations are off the clock; the final one is part of the timed run.
    A non-finite training loss returns the row at once, unevaluated.
    """
    cfg = r.cfg
    with _clock(ledger, profiler):
        state, host = train_epoch(r, state, epoch, progress=progress, hooks=hooks)
    losses = np.asarray(host["loss"], np.float64)
    ledger.step_losses.extend(float(v) for v in losses)
    ledger.epoch = epoch + 1
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": float(losses.mean()),
        "train_acc": float(np.sum(host["correct"])) / (r.steps * cfg.batch_size),
    }
    if not np.isfinite(row["train_loss"]):
        return state, row
    last = epoch == cfg.epochs - 1
    if last or (epoch + 1) % cfg.eval_every == 0:
        eval_state = state if hooks is None else hooks.before_eval(epoch, state)
        # lookahead ends with net = EMA: the final evaluation scores that one net once
        same = last and cfg.lookahead and hooks is None
        ledger.weight_sets = 1 if same or cfg.ema_every <= 0 else 2
        with _clock(ledger, profiler) if last else contextlib.nullcontext():
            row.update(r.evaluate(eval_state, same_weights=same))
    else:
        row.update(val_loss=None, val_acc=None, ema_val_acc=None)
    row["total_time_seconds"] = ledger.timed_seconds
    return state, row


def _summary(
    r: Run, rows: list[dict[str, Any]], ledger: checkpoint.Ledger, stream: str
) -> dict[str, Any]:
    """summary.json (docs/design.md, "Trainer API") of a finished run."""
    cfg = r.cfg
    timed = ledger.timed_seconds
    return {
        "final": {k: rows[-1][k] for k in FINAL_KEYS},
        "epochs": rows,
        "step_losses": ledger.step_losses,
        "total_time_seconds": timed,
        "compile_seconds": r.compile_seconds,
        "compiled": r.compiled,
        "final_eval_weight_sets": ledger.weight_sets,
        "images_per_second": cfg.epochs * r.steps * cfg.batch_size / timed if timed > 0 else None,
        "environment": environment(("jax",)),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "loop": r.loop,
        "stream": stream,
        "compute_dtype": jnp.dtype(models.compute_dtype(cfg)).name,
        "data_source": r.data_source,
        "n_train": r.n_train,
        "n_test": r.n_test,
        "steps_per_epoch": r.steps,
        "devices": r.topology.devices,
        "processes": r.topology.processes,
        "framework": "jax",
    }


def _state_writer(state: TrainState) -> Callable[[Path], None]:
    """Writes the whole TrainState (step, params with the whitening kernel, batch stats,
    optimizer state, EMA) with orbax into `folder/state`; returns once it is on disk."""

    def write(folder: Path) -> None:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(folder / "state", state)
            ckptr.wait_until_finished()

    return write


def _restore_state(folder: Path, like: TrainState) -> TrainState:
    """The TrainState saved by `_state_writer`, with the structure, dtypes and placement of
    `like` (the freshly set-up state), so the compiled programs take it unchanged."""
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore((folder / "state").resolve(), abstract)


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], PyTree]:
    """(progress, saved state as nested dicts of numpy arrays: `params`, `batch_stats`,
    `opt_state`, `ema`, `step`) of a run folder's latest checkpoint, to inspect it."""
    import orbax.checkpoint as ocp

    folder, progress = checkpoint.read_latest(run_dir)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore((folder / "state").resolve())
    return progress, jax.device_get(state)


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.trainer_parser(
        "python -m jaxbench.train",
        "Train the Flax ResNet-9 (or the speedrun net) on CIFAR and print a per-epoch "
        "table. Start from a --config preset; every other flag overrides one field of it. "
        "With --out DIR the run writes config.json, metrics.jsonl and summary.json there.",
    )
    parser.add_argument(
        "--vmap-seeds",
        type=int,
        default=1,
        metavar="K",
        help="train K seeds (--seed, --seed + 1, ...) in one vmapped program and print each "
        "seed's final accuracy and their mean; --out then gets config.json and seeds.json",
    )
    dist = parser.add_argument_group(
        "several processes (docs/scaling.md)",
        "One process per host (or per GPU), all started with the same flags but "
        "--process-id; the batch is split over every process's devices and process 0 "
        "writes the outputs.",
    )
    dist.add_argument(
        "--coordinator", metavar="HOST:PORT", default=None, help="address of process 0"
    )
    dist.add_argument("--num-processes", type=int, default=None, metavar="P")
    dist.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. P - 1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="read the topology from the cluster (SLURM, Open MPI, or the JAX_COORDINATOR_"
        "ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) via jax.distributed",
    )
    dist.add_argument(
        "--dist-timeout",
        type=int,
        default=parallel.DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for every process to arrive before giving up with an error",
    )
    return parser


def join_processes(args: argparse.Namespace) -> None:
    """Start JAX's multi-process runtime when the flags ask for it; afterwards every
    process but 0 trains without writing or printing. Raises ValueError/TimeoutError."""
    pa = parallel.ProcessArgs(
        args.coordinator, args.num_processes, args.process_id, args.distributed, args.dist_timeout
    )
    parallel.check_process_args(pa)
    several = (pa.explicit and (pa.num_processes or 1) > 1) or pa.auto
    single_only = args.resume is not None or getattr(args, "checkpoint_every", 0)
    if several and (single_only or args.vmap_seeds != 1):
        raise ValueError(
            "--resume, --checkpoint-every and --vmap-seeds run in a single process; "
            "drop them from a multi-process run"
        )
    parallel.initialize(pa)
    if jax.process_index() != 0:
        args.out, args.quiet, args.no_progress, args.profile = None, True, True, None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 if training diverged, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        join_processes(args)
    except (ValueError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.vmap_seeds != 1:
        return _main_vmapped(args)
    return cli.run_trainer(
        args, check_supported=check_supported, train=train_and_evaluate, compile_label="compiling"
    )


def _main_vmapped(args: argparse.Namespace) -> int:
    """`--vmap-seeds K`: K seeds in one program (`jaxbench.seeds`), a line per seed."""
    from jaxbench.data import load_dataset
    from jaxbench.report import exit_interrupted, prepare_output, remove_if_empty, write_json
    from jaxbench.seeds import train_seeds

    out = None
    try:
        if args.vmap_seeds < 1:
            raise ValueError(f"--vmap-seeds {args.vmap_seeds}: give K >= 1")
        if args.resume is not None or args.profile is not None:
            raise ValueError("--vmap-seeds runs without --resume and --profile")
        cfg = configs.config_from_args(args)
        check_supported(cfg)
        if cfg.checkpoint_every:
            raise ValueError("--vmap-seeds writes no checkpoints; drop --checkpoint-every")
        out = cfg.out
        created = out is not None and not Path(out).exists()
        if out is not None:
            prepare_output(out, ("config.json", "seeds.json"), overwrite=args.overwrite)
        data = load_dataset(cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train_seeds(cfg, range(cfg.seed, cfg.seed + args.vmap_seeds), data)
    except KeyboardInterrupt:
        if out is not None and created:
            remove_if_empty(out)
        exit_interrupted(f"interrupted; nothing written to {out}" if out else "interrupted")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    accs = []
    for s in result["seeds"]:
        f = s["final"]
        acc = f["ema_val_acc"] if f["ema_val_acc"] is not None else f["val_acc"]
        accs.append(acc)
        if not args.quiet:
            ema = f["ema_val_acc"]
            shown = f", ema_val_acc {100 * ema:.2f}%" if ema is not None else ""
            print(f"seed {s['seed']}: val_acc {100 * f['val_acc']:.2f}%{shown}")
    if not args.quiet:
        spread = f" ± {100 * np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
        print(
            f"{len(accs)} seeds in one program: mean {100 * np.mean(accs):.2f}%{spread}; "
            f"{result['total_time_seconds']:.1f} s timed, {result['compile_seconds']:.1f} s "
            "compiling"
        )
    if out is not None:
        write_json(Path(out) / "config.json", cfg.to_dict())
        write_json(Path(out) / "seeds.json", result)
        if not args.quiet:
            print(f"wrote config.json, seeds.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
