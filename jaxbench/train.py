"""Train the Flax ResNet-9 on CIFAR: `train_and_evaluate(cfg)` and `python -m jaxbench.train`.

Top to bottom: model and state, the pure step, the epoch, the evaluation, then
`train_and_evaluate`, which compiles ahead of time (`jaxbench.programs`) and hands the run
to `jaxbench.driver`. uint8 images are augmented inside the jitted step; an epoch is one
`lax.scan` on accelerators, a Python loop of compiled steps on the CPU (XLA:CPU runs scanned
convolutions ~30x slower), with no host sync inside.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxbench import augment, cli, configs, driver, layers, models, optim, parallel, schedule
from jaxbench import programs as aot
from jaxbench import whitening as wh
from jaxbench.configs import Config
from jaxbench.profiling import JaxProfile
from jaxbench.programs import CompileCache, Hooks, load_checkpoint, seed_keys  # noqa: F401
from jaxbench.progress import progress_bar
from jaxbench.speedrun_model import NUM_CLASSES

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
    """Refuse config fields this trainer lacks, more devices than here, or a batch that does
    not split over them."""
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
    """The whitening kernel from the training images into the net and its EMA: exact moments
    on the device, finished in float64 by `jaxbench.whitening`, the same as torch_ref's."""
    stats = wh.moments_from_groups(parallel.fetch(moments(images)))
    cov = wh.covariance_from_moments(*stats, dataset=cfg.dataset, patch=layers.whiten_patch(cfg))
    kernel = wh.kernel_OIHW_to_HWIO(wh.whitening_for_config(cov, cfg.whiten, cfg.whiten_eps))
    path, topo = layers.whiten_path(cfg), topo or parallel.Topology.single()
    # two device copies: the state is donated, and one buffer must not be donated twice
    live = layers.with_whitening(state.variables(), parallel.replicate(kernel, topo), path)
    ema = layers.with_whitening(state.ema, parallel.replicate(kernel, topo), path)
    return state.replace(params=live["params"], ema=ema)


# --- step ----------------------------------------------------------------------------------


def make_loss_fn(
    cfg: Config, model: models.ResNet9
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, PyTree]]]:
    """`loss_fn(params, batch_stats, images_u8, labels) -> (loss, (logits, new_batch_stats))`:
    normalisation, the train-mode forward and the configured (label-smoothed, summed or
    mean) cross-entropy. The parity suite differentiates this very function."""
    dtype = models.compute_dtype(cfg)

    def loss_fn(
        params: PyTree,
        batch_stats: PyTree,
        images_u8: jax.Array,
        labels: jax.Array,
        jitter: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        x = augment.normalize(images_u8, cfg.dataset, dtype, jitter)
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
    """The pure step `(state, {'images': augmented uint8, 'labels'}) -> (state, metrics)`
    (with colour jitter the batch also holds the plan's 'brightness' and 'contrast'): the
    mean per-example `loss` and the `correct` predictions. `cfg.lookahead` resets the net
    to the EMA on EMA steps, its decay ramp over `total_steps` updates."""
    if cfg.lookahead and total_steps is None:
        raise ValueError("cfg.lookahead needs total_steps for the decay ramp")
    loss_fn = make_loss_fn(cfg, model)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        labels = batch["labels"]
        jitter = (batch["brightness"], batch["contrast"]) if "brightness" in batch else None
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch["images"], labels, jitter
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        live = {"params": params, "batch_stats": batch_stats}
        if cfg.lookahead:
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
    """(step_fn, epoch_fn), uncompiled: `step_fn(state, images, labels, plan, i)` runs batch
    i of an epoch plan, `epoch_fn(state, images, labels, plan, steps=None)` scans it over
    the plan's first `steps` batches (all: None; metrics stacked along axis 0).
    `batch_split` lays each batch over a device mesh."""
    train_step = make_train_step(cfg, model, tx, total_steps)

    def step_fn(
        state: TrainState, images: jax.Array, labels: jax.Array, plan: augment.Plan, i: jax.Array
    ) -> tuple[TrainState, Metrics]:
        bp = augment.plan_batch(plan, i, cfg.batch_size)
        batch = {"images": augment.apply_plan(images, bp, cfg), "labels": labels[bp["indices"]]}
        if (jitter := augment.plan_jitter(bp, cfg)) is not None:
            batch["brightness"], batch["contrast"] = jitter
        return train_step(state, parallel.split_batch(batch, batch_split))

    def epoch_fn(
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        plan: augment.Plan,
        steps: int | None = None,
    ) -> tuple[TrainState, Metrics]:
        steps = plan["indices"].shape[0] // cfg.batch_size if steps is None else steps

        def body(s: TrainState, i: jax.Array) -> tuple[TrainState, Metrics]:
            return step_fn(s, images, labels, plan, i)

        return jax.lax.scan(body, state, jnp.arange(steps, dtype=jnp.int32))

    return step_fn, epoch_fn


# --- epoch ---------------------------------------------------------------------------------


def train_epoch(
    r: aot.Run, state: TrainState, epoch: int, *, progress: bool = False, hooks: Hooks | None = None
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """One epoch; the state (ready) and the per-step metrics, fetched once (a leading seed
    axis when vmapped). Nothing synchronises with the host inside, unless `hooks` observe."""
    cfg = r.cfg
    plan = r.make_plan(epoch)
    steps = schedule.epoch_steps(cfg, r.steps, epoch)
    if r.loop == "scan":
        if hooks is not None:
            raise ValueError("training hooks need the per-step loop: set --loop step")
        # the record's last part-epoch has a program of its own, over the plan's head
        run = r.programs.run_last if steps < r.steps else r.programs.run
        state, metrics = run(state, r.images, r.labels, plan)
    else:
        per_step = []
        desc, off = f"epoch {epoch + 1}/{cfg.epochs}", None if progress else True  # None: on a tty
        bar = progress_bar(range(steps), desc=desc, leave=False, disable=off, file=sys.stderr)
        for i in bar:
            t = epoch * r.steps + i
            if hooks is not None:
                state = hooks.before_step(t, state)
            state, m = r.programs.run(state, r.images, r.labels, plan, np.int32(i))
            if hooks is not None:
                hooks.after_step(t, state, m)
            per_step.append(m)  # stays on the device until the epoch ends
        bar.close()
    if cfg.lookahead and epoch == cfg.epochs - 1:  # airbench ends with net = EMA
        state = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])
    jax.block_until_ready(state)
    if r.loop == "scan":
        return state, parallel.fetch(metrics)  # the one fetch of the epoch
    fetched = parallel.fetch(per_step)
    return state, {k: np.stack([m[k] for m in fetched], axis=-1) for k in fetched[0]}


# --- evaluate ------------------------------------------------------------------------------


def make_logits_fn(
    cfg: Config, model: models.ResNet9
) -> Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]:
    """`logits_fn(variables, images_u8) -> (per-view logits [V, N, C], TTA logits [N, C])`:
    normalisation, the eval-mode forward and `cfg`'s test-time views. Parity calls it."""
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
    """`eval_fn(acc, variables, ema_variables, images, labels, valid, i) -> acc` for batch i:
    sums of the cross-entropy (no smoothing) and of right predictions of the TTA logits
    over the valid (unpadded) test images; `batch_split` lays the batch over a mesh. Selective
    TTA: the 6 view logits into `acc["views"]` [6, N, C] (`programs.eval_scores` selects)."""
    logits_fn = make_logits_fn(cfg, model)
    views_fn = make_logits_fn(cfg.replace(tta=True, tta_shift=True), model)  # all 6 views

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
            if cfg.tta_select:  # every view's logits kept; the host selects and scores
                views, _ = views_fn(v, x)
                rows = jax.lax.dynamic_update_slice_in_dim(acc[prefix + "views"], views, start, 1)
                return {prefix + "views": rows}
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
    step_fn, epoch_fn = make_loop_fns(cfg, model, tx, schedule.train_steps(cfg, steps), split)
    last = schedule.epoch_steps(cfg, steps, cfg.epochs - 1)
    patch = layers.whiten_patch(cfg)
    whiten_n = min(cfg.whiten_images, n_train) if patch else 0
    moments = (lambda x: layers.patch_moment_groups(x[:whiten_n], patch)) if whiten_n else None
    return aot.Recipe(
        init_state=lambda key, init: create_train_state(model, tx, key, init),
        set_whitening=set_whitening,
        train_epoch=train_epoch,
        step_fn=step_fn,
        epoch_fn=epoch_fn,
        plan_fn=lambda key, epoch: augment.draw_plan(key, epoch, n_train, cfg),
        eval_both_fn=make_eval_fn(cfg, model, eval_batch, with_ema, split),
        eval_one_fn=make_eval_fn(cfg, model, eval_batch, False, split) if with_ema else None,
        moments_fn=moments,
        last_steps=last if last < steps else None,
        view_logits=(6, NUM_CLASSES[cfg.dataset]) if cfg.tta_select else None,
    )


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_variables: PyTree | None = None,
    stream: str = "fast",
    compile_cache: CompileCache | None = None,
    seeds: Sequence[int] | None = None,
) -> aot.Run:
    """Data on the device, the initial state, every function compiled ahead of time
    (`jaxbench.programs.setup`); `seeds`: K states, the programs vmapped over them."""
    check_supported(cfg)
    return aot.setup(
        cfg, data, make_recipe, init_variables=init_variables, stream=stream,
        compile_cache=compile_cache, seeds=seeds,
    )  # fmt: skip


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

    `data`: a `Dataset` (else loaded); `init_variables` replace the seeded init; `stream`:
    'fast' (plans drawn on the device) or 'shared'; `workdir` (default `cfg.out`): the run
    folder; `return_variables` adds the final weights as numpy; `profile_dir`: a trace of the
    timed region; `resume`: a run folder to continue bit for bit. A NaN loss raises
    FloatingPointError naming the epoch."""
    if jax.process_count() > 1 and (resume is not None or cfg.checkpoint_every):
        raise ValueError("--checkpoint-every and --resume need a single process; drop them")
    run = driver.Driver(cfg, "jax", stream, workdir=workdir, resume=resume, quiet=quiet,
                        progress=progress, primary=jax.process_index() == 0)  # fmt: skip
    r = setup(cfg, data, init_variables=init_variables, stream=stream, compile_cache=compile_cache)
    r.hooks = hooks
    summary = run.run(r, JaxProfile(profile_dir) if profile_dir is not None else None)
    if return_variables:
        variables, ema = parallel.fetch((r.state.variables(), r.state.ema))
        summary = {**summary, "variables": variables, "ema_variables": ema}
    return summary


def train_seeds(
    cfg: Config,
    seeds: Iterable[int],
    data: Any = None,
    workdir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """`cfg` once per (distinct) seed in one vmapped program; seeds.json's dict (`seeds`:
    seed, final, epochs, step_losses each), written to `workdir` with config.json and
    status.json. Each seed equals its single run within float32 tolerance."""
    seeds = list(seeds)  # any iterable: the bench passes a range
    run = driver.Driver(cfg, "jax", "fast", workdir=workdir, lanes=len(seeds))
    return run.run(setup(cfg, data, seeds=seeds))


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.trainer_parser(
        "python -m jaxbench.train",
        "Train the Flax ResNet-9 (or the speedrun net) on CIFAR and print a per-epoch "
        "table. Start from a --config preset; every other flag overrides one field of it. "
        "With --out DIR the run writes config.json, metrics.jsonl, status.json and "
        "summary.json there.",
        vmap_seeds=True,
    )
    parallel.add_process_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 if training diverged, 2 on bad input."""
    return cli.run_trainer(
        build_parser().parse_args(argv), check_supported=check_supported,
        train=train_and_evaluate, train_seeds=train_seeds, compile_label="compiling",
        join=parallel.join_processes,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
