"""Train the Flax ResNet-9 on CIFAR: `train_and_evaluate(cfg)` and `python -m jaxbench.train`.

The recipe reads top to bottom: the model and its state, the pure step, the
epoch, the evaluation, then `train_and_evaluate`, which hands the run to the
framework-neutral `jaxbench.driver` (run folder, checkpoints, clock, rows,
summary) and the command line. Images stay uint8 on the device; each epoch's
plan is drawn there (`stream="fast"`) or moved once (`stream="shared"`), and
augmentation plus normalisation happen inside the jitted step. `cfg.loop`: one
`lax.scan` per epoch on accelerators, a Python loop over one compiled step on
the CPU (XLA:CPU runs convolutions inside a while loop ~30x slower). Nothing
synchronises with the host inside an epoch. Compilation, ahead of time and
off the clock, and the vmapped seeds live in `jaxbench.programs`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxbench import augment, checkpoint, cli, configs, driver, layers, models, optim, parallel
from jaxbench import programs as aot
from jaxbench.configs import Config
from jaxbench.profiling import JaxProfile
from jaxbench.programs import CompileCache, seed_keys  # noqa: F401  (this module's API)
from jaxbench.progress import progress_bar
from jaxbench.whitening import (
    covariance_from_moments,
    kernel_OIHW_to_HWIO,
    moments_from_groups,
    whitening_for_config,
)

PyTree = Any
Metrics = dict[str, jax.Array]

# --- model and state ------------------------------------------------------------------------


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


def set_whitening(
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


# --- step ----------------------------------------------------------------------------------


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


# --- epoch ---------------------------------------------------------------------------------


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


def train_epoch(
    r: aot.Run, state: TrainState, epoch: int, *, progress: bool = False, hooks: Hooks | None = None
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
        host = {k: np.stack([m[k] for m in fetched], axis=-1) for k in fetched[0]}
    return state, host


# --- evaluate ------------------------------------------------------------------------------


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


# --- train_and_evaluate ---------------------------------------------------------------------


def make_recipe(
    cfg: Config, steps: int, n_train: int, eval_batch: int, split: NamedSharding | None = None
) -> aot.Recipe:
    """The run's pure functions, uncompiled, for `jaxbench.programs.setup` to compile."""
    model, tx = models.model_from_config(cfg), optim.make_optimizer(cfg, steps)
    with_ema = cfg.ema_every > 0
    step_fn, epoch_fn = make_loop_fns(cfg, model, tx, cfg.epochs * steps, split)
    patch = layers.whiten_patch(cfg)
    whiten_n = min(cfg.whiten_images, n_train) if patch else 0
    return aot.Recipe(
        init_state=lambda key, init: create_train_state(model, tx, key, init),
        step_fn=step_fn,
        epoch_fn=epoch_fn,
        plan_fn=lambda key, epoch: augment.draw_plan(key, epoch, n_train, cfg),
        eval_both_fn=make_eval_fn(cfg, model, eval_batch, with_ema, split),
        eval_one_fn=make_eval_fn(cfg, model, eval_batch, False, split) if with_ema else None,
        moments_fn=(lambda x: layers.patch_moment_groups(x[:whiten_n], patch))
        if whiten_n
        else None,
    )


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_variables: PyTree | None = None,
    stream: str = "fast",
    compile_cache: aot.CompileCache | None = None,
    seeds: Sequence[int] | None = None,
) -> aot.Run:
    """Data on the device, the initial state, every function compiled ahead of time
    (`jaxbench.programs.setup`); `seeds`: K states, the programs vmapped over them."""
    check_supported(cfg)
    lanes = None if seeds is None else list(seeds)
    return aot.setup(
        cfg, data, make_recipe, init_variables=init_variables, stream=stream,
        compile_cache=compile_cache, seeds=lanes,
    )  # fmt: skip


class Trainer:
    """A set-up run as `jaxbench.driver` trains it (its `Trainer` interface)."""

    framework = "jax"

    def __init__(self, r: aot.Run, hooks: Hooks | None = None) -> None:
        self.r, self.hooks, self.state = r, hooks, r.state
        self.cfg, self.stream, self.seeds, self.steps = r.cfg, r.stream, r.seeds, r.steps
        self.n_train, self.n_test = r.n_train, r.n_test

    def start(self, clock: driver.Clock) -> None:
        """The data-dependent whitening kernel, on the clock as airbench times it (one
        kernel, the data's, into every seed's state)."""
        r = self.r
        if r.programs.moments is None:
            return
        with clock():
            if not r.vmapped:
                self.state = set_whitening(
                    self.state, r.programs.moments, r.images, r.cfg, r.topology
                )
            else:
                each = [jax.tree_util.tree_map(lambda x, k=k: x[k], self.state)
                        for k in range(len(r.seeds))]  # fmt: skip
                each = [set_whitening(s, r.programs.moments, r.images, r.cfg) for s in each]
                self.state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *each)

    def restore(self, folder: Path, epochs_done: int) -> None:
        """`write_state`'s state, with the set-up state's structure, dtypes and placement."""
        import orbax.checkpoint as ocp

        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, self.state)
        with ocp.StandardCheckpointer() as ckptr:
            self.state = ckptr.restore((folder / "state").resolve(), abstract)

    def train_epoch(self, epoch: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        self.state, host = train_epoch(
            self.r, self.state, epoch, progress=progress, hooks=self.hooks
        )
        return host["loss"], np.sum(host["correct"], axis=-1)

    def score(self, epoch: int, same_weights: bool) -> tuple[Any, int]:
        st = self.state if self.hooks is None else self.hooks.before_eval(epoch, self.state)
        same = same_weights and self.hooks is None  # hooks may have replaced the weights
        return self.r.evaluate(st, same), 1 if same or self.cfg.ema_every <= 0 else 2

    def sync(self) -> None:
        jax.block_until_ready(self.state)

    def compile_count(self) -> int:
        return 0  # everything was compiled before the clock started

    def write_state(self, folder: Path) -> None:
        """The whole TrainState (step, params with the whitening kernel, batch stats,
        optimizer state, EMA) with orbax into `folder/state`."""
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(folder / "state", self.state)
            ckptr.wait_until_finished()

    def summary_extras(self, ledger: checkpoint.Ledger) -> dict[str, Any]:
        r = self.r
        extras = {"compile_seconds": r.compile_seconds, "loop": r.loop}
        if r.vmapped:
            return extras
        dtype = jnp.dtype(models.compute_dtype(r.cfg)).name
        return {
            **extras, "compiled": r.compiled, "compute_dtype": dtype,
            "data_source": r.data_source, "devices": r.topology.devices,
            "processes": r.topology.processes,
        }  # fmt: skip


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
    compile_cache: aot.CompileCache | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train per `cfg`, evaluate every epoch, and return the summary of docs/design.md.

    `data`: a `jaxbench.data.Dataset` (loaded from the config when None; subset
    prefixes are applied either way). `init_variables`: start from these
    {'params', 'batch_stats'} instead of the seeded init. `stream`: 'fast'
    (plan drawn with jax.random on the device) or 'shared' (`stream.epoch_plan`).
    `workdir` (default `cfg.out`) receives config.json, metrics.jsonl, status.json and
    summary.json. `return_variables` adds the final `variables` and `ema_variables`
    (numpy pytrees) to the returned dict, not to summary.json. `hooks`: see `Hooks`.
    `compile_cache`: reuse compiled programs across runs. `profile_dir`: trace the
    timed region with `jax.profiler` there and add `profile` (trace, top operations)
    to the summary. `resume`: a run folder (default `workdir`) whose latest checkpoint
    (`cfg.checkpoint_every`) the run continues from, bit for bit; `cfg` must be that
    run's. Raises FloatingPointError, naming the epoch, when the loss is not finite.
    """
    if jax.process_count() > 1 and (resume is not None or cfg.checkpoint_every):
        raise ValueError(
            "--checkpoint-every and --resume run in a single process; drop them "
            "from a multi-process run"
        )
    run = driver.Driver(cfg, "jax", stream, workdir=workdir, resume=resume, quiet=quiet,
                        progress=progress, primary=jax.process_index() == 0)  # fmt: skip
    r = setup(cfg, data, init_variables=init_variables, stream=stream, compile_cache=compile_cache)
    trainer = Trainer(r, hooks)
    summary = run.run(trainer, JaxProfile(profile_dir) if profile_dir is not None else None)
    if return_variables:
        summary = dict(summary)
        summary["variables"] = parallel.fetch(trainer.state.variables())
        summary["ema_variables"] = parallel.fetch(trainer.state.ema)
    return summary


def train_seeds(cfg: Config, seeds: Sequence[int], data: Any = None) -> dict[str, Any]:
    """Train `cfg` once per seed, all in one vmapped program; seeds.json's dict: `seeds`
    (seed, final, epochs, step_losses of each), `total_time_seconds` (all of them), ...

    Each seed's numbers equal its single run's within float32 tolerance: the order of
    sums inside batched kernels differs, not the mathematics.
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
    run = driver.Driver(cfg, "jax", "fast", lanes=len(seeds))
    return run.run(Trainer(setup(cfg, data, seeds=seeds)))


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], PyTree]:
    """(progress, saved state as nested dicts of numpy arrays: `params`, `batch_stats`,
    `opt_state`, `ema`, `step`) of a run folder's latest checkpoint, to inspect it."""
    import orbax.checkpoint as ocp

    folder, progress = checkpoint.read_latest(run_dir)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore((folder / "state").resolve())
    return progress, jax.device_get(state)


# --- command line --------------------------------------------------------------------------


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
    parallel.add_process_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 if training diverged, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        parallel.join_processes(args)
    except (ValueError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.vmap_seeds != 1:
        return cli.run_seeds(args, check_supported=check_supported, train_seeds=train_seeds)
    return cli.run_trainer(
        args, check_supported=check_supported, train=train_and_evaluate, compile_label="compiling"
    )


if __name__ == "__main__":
    sys.exit(main())
