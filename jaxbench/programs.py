"""A JAX run set up for speed: `setup` puts the data on the device and compiles
`jaxbench.train`'s `Recipe` before the clock starts (vmapped over seeds, K runs share every
launch); a `CompileCache` reuses an earlier run's programs. A `Run` is what `jaxbench.driver`
drives."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import augment, checkpoint, memory, models, parallel
from jaxbench.configs import Config
from jaxbench.stream import cross_entropy_sum, epoch_plan, selective_tta, steps_per_epoch


@dataclasses.dataclass
class Recipe:
    """The trainer's uncompiled functions for one config and data size (`train.make_recipe`)."""

    init_state: Callable[[jax.Array, Any], Any]  # (init key, init variables or None) -> state
    step_fn: Callable[..., Any]  # (state, images, labels, plan, i) -> (state, metrics)
    epoch_fn: Callable[..., Any]  # (state, images, labels, plan) -> (state, stacked metrics)
    plan_fn: Callable[..., Any]  # (data_key, epoch) -> the epoch's augmentation plan
    eval_both_fn: Callable[..., Any]  # one test batch of the net and its EMA (or the net)
    eval_one_fn: Callable[..., Any] | None  # one weight set; None without an EMA
    moments_fn: Callable[..., Any] | None  # training images -> whitening moments, or None
    set_whitening: Callable[..., Any]  # (state, moments, images, cfg, topo) -> state
    train_epoch: Callable[..., Any]  # (run, state, epoch, progress=, hooks=) -> (state, host)
    last_steps: int | None = None  # updates of a part last epoch (`epoch_fn(..., steps=)`)
    view_logits: tuple[int, int] | None = None  # selective TTA: (views, classes) kept per image


@dataclasses.dataclass
class EvalData:
    """The test images on the device, padded to whole batches (`valid` marks the real ones)."""

    images: jax.Array
    labels: jax.Array
    valid: jax.Array
    n: int  # real test images
    batch: int  # images per evaluation batch
    steps: int  # evaluation batches
    host_labels: np.ndarray  # the real images' labels (selective TTA scores on the host)


@dataclasses.dataclass
class Programs:
    """A run's compiled functions; they depend on the config and the shapes, never on the seed."""

    run: Any  # compiled epoch (scan) or step (step)
    plan: Any  # compiled `augment.draw_plan(data_key, epoch)`
    eval_both: Any  # compiled eval batch of the net and its EMA (or the net alone)
    eval_one: Any  # compiled eval batch of one weight set (the EMA equals the net)
    moments: Any  # compiled whitening moments (a whitening stem) or None
    run_last: Any  # scan: the compiled part last epoch (`Recipe.last_steps`), else None
    seconds: float  # what compiling them took
    zero_both: dict[str, jax.Array]  # the sums `eval_both` starts from
    zero_one: dict[str, jax.Array]  # the sums `eval_one` starts from


def pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """`x` with zero rows appended up to `n` rows."""
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)]) if n > len(x) else x


def eval_zeros(
    with_ema: bool, lanes: int | None = None, views: tuple[int, int, int] | None = None
) -> dict[str, jax.Array]:
    """Zero sums of the evaluation (loss, correct, and the EMA's); one per lane with `lanes`.
    Selective TTA: zero view logits (views, padded test images, classes) instead."""
    lane = () if lanes is None else (lanes,)
    if views is not None:
        keys = ["views"] + (["ema_views"] if with_ema else [])
        return {k: jnp.zeros((*lane, *views), jnp.float32) for k in keys}
    keys = ["loss", "correct"] + (["ema_loss", "ema_correct"] if with_ema else [])
    return {k: jnp.zeros(lane, jnp.float32) for k in keys}


def eval_data(
    test_x: np.ndarray, test_y: np.ndarray, eval_batch_size: int, topo: parallel.Topology
) -> EvalData:
    """The test images and labels on every device of `topo`, padded to whole batches."""
    n = len(test_x)
    batch = min(eval_batch_size, n)
    if topo.devices > 1 and batch % topo.devices:
        raise ValueError(
            f"the test set ({n} images) is smaller than --eval-batch-size and does not "
            f"split over {topo.devices} devices: use --test-subset a multiple of {topo.devices}"
        )
    steps = math.ceil(n / batch)
    padded = steps * batch
    images, labels, valid = parallel.replicate(
        (pad_to(test_x, padded), pad_to(test_y, padded), pad_to(np.ones(n, np.float32), padded)),
        topo,
    )
    return EvalData(images, labels, valid, n, batch, steps, np.asarray(test_y))


def compile_programs(
    recipe: Recipe,
    loop: str,
    state: Any,
    images: jax.Array,
    labels: jax.Array,
    data_key: jax.Array,
    test: EvalData,
    topo: parallel.Topology,
    lanes: int | None = None,
) -> Programs:
    """Every function of one run compiled ahead of time for these shapes and devices; with
    `lanes`, vmapped over the leading axis of `state` and `data_key` (one per seed)."""
    t0 = time.perf_counter()
    everywhere = {} if topo.mesh is None else {"out_shardings": topo.replicated}

    def each(fn: Callable[..., Any], *axes: int | None) -> Callable[..., Any]:
        return fn if lanes is None else jax.vmap(fn, in_axes=axes)

    draw = each(recipe.plan_fn, 0, None)
    plan = jax.jit(draw, **everywhere).lower(data_key, np.int32(0)).compile()
    plan_spec = jax.eval_shape(draw, data_key, np.int32(0))
    fn, i = (recipe.epoch_fn, ()) if loop == "scan" else (recipe.step_fn, (np.int32(0),))
    run = jax.jit(each(fn, 0, None, None, 0, *[None] * len(i)), donate_argnums=0, **everywhere)
    run = run.lower(state, images, labels, plan_spec, *i).compile()
    run_last = None
    if loop == "scan" and recipe.last_steps is not None:
        last = functools.partial(recipe.epoch_fn, steps=recipe.last_steps)
        run_last = jax.jit(each(last, 0, None, None, 0), donate_argnums=0, **everywhere)
        run_last = run_last.lower(state, images, labels, plan_spec).compile()
    args = (state.variables(), state.ema, test.images, test.labels, test.valid, np.int32(0))
    eval_axes = (0, 0, 0, None, None, None, None)
    views = None
    if recipe.view_logits is not None:
        views = (recipe.view_logits[0], test.images.shape[0], recipe.view_logits[1])
    zero_both = eval_zeros(recipe.eval_one_fn is not None, lanes, views)
    zero_one = eval_zeros(False, None, views)
    eval_both = jax.jit(each(recipe.eval_both_fn, *eval_axes), **everywhere)
    eval_both = eval_one = eval_both.lower(zero_both, *args).compile()
    if recipe.eval_one_fn is not None and lanes is None:  # vmapped seeds have no lookahead
        eval_one = jax.jit(recipe.eval_one_fn, **everywhere).lower(zero_one, *args).compile()
    moments = None
    if recipe.moments_fn is not None:
        moments = jax.jit(recipe.moments_fn, **everywhere).lower(images).compile()
    seconds = time.perf_counter() - t0
    return Programs(run, plan, eval_both, eval_one, moments, run_last, seconds, zero_both, zero_one)


def cache_key(cfg: Config, n_train: int, n_test: int, loop: str, state: Any) -> Any:
    """What a run's programs depend on: the recipe, devices, data shapes, loop, backend and
    the state's tree (not the seed or the folders)."""
    return (
        cfg.recipe(),
        cfg.devices,
        n_train,
        n_test,
        loop,
        jax.default_backend(),
        jax.tree_util.tree_structure(state),
        tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)),
    )


class CompileCache:
    """Compiled programs reused across runs of one process, keyed by `cache_key`. Opt-in:
    the parity suite patches trainer functions between runs. `compiles` counts misses."""

    def __init__(self) -> None:
        self._programs: dict[Any, Programs] = {}
        self.compiles = 0
        self.hits = 0

    def get(self, key: Any, build: Callable[[], Programs]) -> tuple[Programs, bool]:
        """(programs, built): `build()` on a miss, the stored programs on a hit."""
        if key in self._programs:
            self.hits += 1
            return self._programs[key], False
        self._programs[key] = build()
        self.compiles += 1
        return self._programs[key], True


def eval_scores(
    acc: dict[str, Any], test: EvalData, with_ema: bool, one: bool, tta_select: float = 0.0
) -> dict[str, Any]:
    """val_loss, val_acc, ema_val_acc from the evaluation's sums; `one`: the EMA equals the
    net (lookahead's end), scored once and its accuracy copied. Selective TTA: from the view
    logits, by `stream.selective_tta` and `stream.cross_entropy_sum`."""
    n_test = test.n
    if "views" in acc:
        for prefix in ("", "ema_") if with_ema and not one else ("",):
            views = np.asarray(acc[prefix + "views"])[:, :n_test]
            logits, _ = selective_tta(views[0], views, tta_select)
            loss, correct = cross_entropy_sum(logits, test.host_labels)
            acc = {**acc, prefix + "loss": loss, prefix + "correct": correct}
    out = {"val_loss": float(acc["loss"]) / n_test, "val_acc": float(acc["correct"]) / n_test}
    if not with_ema:
        out["ema_val_acc"] = None
    elif one:
        out["ema_val_acc"] = out["val_acc"]
    else:
        out["ema_val_acc"] = float(acc["ema_correct"]) / n_test
    return out


class Hooks:
    """The parity suite's observation points in the per-step loop (`train.train_epoch`);
    `before_step` and `before_eval` may return a replacement state (the reference's, so no
    chaos builds up). torch_ref's twin: `torch_ref.run.Hooks`."""

    def before_step(self, t: int, state: Any) -> Any:
        return state

    def after_step(self, t: int, state: Any, metrics: dict[str, jax.Array]) -> None:
        pass

    def before_eval(self, epoch: int, state: Any) -> Any:
        return state


@dataclasses.dataclass
class Run:
    """One run's compiled functions, data on the device and state: the driver's `Trainer`.
    Over 80 lines: the driver's whole `Trainer` interface, one short method each."""

    framework: ClassVar[str] = "jax"
    cfg: Config  # `devices` resolved to the count the run uses
    loop: str  # "scan" or "step"
    stream: str  # "fast" or "shared"
    seeds: list[int]  # [cfg.seed], or the seeds vmapped in one program
    vmapped: bool  # the state has a leading seed axis
    steps: int  # optimizer steps per epoch
    n_train: int
    n_test: int
    state: Any  # the initial state, then the current one
    images: jax.Array  # uint8 NHWC training images on the device
    labels: jax.Array
    test: EvalData
    recipe: Recipe
    programs: Programs
    compiled: bool  # whether this run compiled its programs (False: reused from the cache)
    make_plan: Callable[[int], augment.Plan]
    data_source: str = "arrays in memory"  # where the images came from (`Dataset.source`)
    topology: parallel.Topology = dataclasses.field(default_factory=parallel.Topology.single)
    hooks: Hooks | None = None  # the parity suite's, or None

    def evaluate(self, st: Any, same_weights: bool = False) -> Any:
        """`st`'s val_loss, val_acc, ema_val_acc (a list, one per seed, when vmapped);
        `same_weights`: the EMA equals the net (lookahead's end), so it is scored once."""
        with_ema = self.cfg.ema_every > 0
        one = same_weights and with_ema
        p, test, variables = self.programs, self.test, st.variables()
        fn, acc = (p.eval_one, p.zero_one) if one else (p.eval_both, p.zero_both)
        for i in range(test.steps):  # the sums over the test set, fetched once
            acc = fn(acc, variables, st.ema, test.images, test.labels, test.valid, np.int32(i))
        acc = parallel.fetch(acc)
        score = functools.partial(
            eval_scores, test=test, with_ema=with_ema, one=one, tta_select=self.cfg.tta_select
        )
        if not self.vmapped:
            return score(acc)
        return [score({k: v[i] for k, v in acc.items()}) for i in range(len(self.seeds))]

    # --- the driver's interface (`jaxbench.driver.Trainer`)

    def start(self, clock: Callable[[], Any]) -> None:
        """The data's whitening kernel into every seed's state, on the clock as airbench."""
        if self.programs.moments is None:
            return
        whiten = functools.partial(
            self.recipe.set_whitening, moments=self.programs.moments, images=self.images,
            cfg=self.cfg, topo=self.topology,
        )  # fmt: skip
        with clock():
            if not self.vmapped:
                self.state = whiten(self.state)
            else:
                each = [whiten(jax.tree_util.tree_map(lambda x, k=k: x[k], self.state))
                        for k in range(len(self.seeds))]  # fmt: skip
                self.state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *each)

    def restore(self, folder: Path, epochs_done: int) -> None:
        self.state = restore_state(folder, self.state)

    def train_epoch(self, epoch: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        self.state, host = self.recipe.train_epoch(
            self, self.state, epoch, progress=progress, hooks=self.hooks
        )
        return host["loss"], np.sum(host["correct"], axis=-1)

    def score(self, epoch: int, same_weights: bool) -> tuple[Any, int]:
        st = self.state if self.hooks is None else self.hooks.before_eval(epoch, self.state)
        same = same_weights and self.hooks is None  # hooks may have replaced the weights
        return self.evaluate(st, same), 1 if same or self.cfg.ema_every <= 0 else 2

    def sync(self) -> None:
        jax.block_until_ready(self.state)

    def compile_count(self) -> int:
        return 0  # everything was compiled before the clock started

    def write_state(self, folder: Path) -> None:
        """The whole train state with orbax into `folder/state`; returns once it is on disk."""
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(folder / "state", self.state)
            ckptr.wait_until_finished()

    def summary_extras(self, ledger: Any) -> dict[str, Any]:
        seconds = self.programs.seconds if self.compiled else 0.0
        extras = {"compile_seconds": seconds, "loop": self.loop}
        if self.vmapped:
            return extras
        return {
            **extras,
            "compiled": self.compiled,
            "compute_dtype": jnp.dtype(models.compute_dtype(self.cfg)).name,
            "data_source": self.data_source,
            "devices": self.topology.devices,
            "processes": self.topology.processes,
        }


def setup(
    cfg: Config,
    data: Any,
    make_recipe: Callable[[Config, int, int, int, Any], Recipe],
    *,
    init_variables: Any = None,
    stream: str = "fast",
    compile_cache: CompileCache | None = None,
    seeds: Sequence[int] | None = None,
) -> Run:
    """Data on the device, the initial state, `make_recipe(cfg, steps, n_train, eval_batch,
    batch_split)` compiled ahead of time (or from `compile_cache`); `seeds`: one state per
    distinct seed, stacked, and the programs vmapped over them on one device."""
    if stream not in ("fast", "shared"):
        raise ValueError(f"stream must be 'fast' or 'shared', got {stream!r}")
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--vmap-seeds needs distinct seeds, got {seeds}")
        if cfg.lookahead:
            raise ValueError("--vmap-seeds does not implement --lookahead (its final net = EMA)")
        if cfg.devices > 1:
            raise ValueError("--vmap-seeds trains on one device; drop --devices or set it to 1")
        cfg = cfg.replace(devices=1)  # the seeds share one device
    cfg = parallel.resolve(cfg)
    topo = parallel.topology(cfg)
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
    train_x = np.asarray(data.train_images[: cfg.subset], np.uint8)
    train_y = np.asarray(data.train_labels[: cfg.subset], np.int32)
    test_x = np.asarray(data.test_images[: cfg.test_subset], np.uint8)
    test_y = np.asarray(data.test_labels[: cfg.test_subset], np.int32)
    n_train, steps = len(train_x), steps_per_epoch(cfg, len(train_x))
    if steps == 0:
        raise ValueError(
            f"{n_train} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size or raise --subset"
        )
    if len(test_x) == 0:
        raise ValueError("the test set is empty; check the data or --test-subset")
    loop = cfg.loop  # `auto`: whole-epoch scan on accelerators, per-step jit on the CPU
    if loop == "auto":
        loop = "step" if jax.default_backend() == "cpu" else "scan"
    images, labels = parallel.replicate((train_x, train_y), topo)  # once, on every device
    test = eval_data(test_x, test_y, cfg.eval_batch_size, topo)
    jax.block_until_ready((images, labels, test.images, test.labels, test.valid))  # untimed
    recipe = make_recipe(cfg, steps, n_train, test.batch, topo.batch_split)
    lanes = [cfg.seed] if seeds is None else list(seeds)
    keys = [seed_keys(s) for s in lanes]
    states = [recipe.init_state(keys[0][0], init_variables)]
    memory.check(cfg, states[0], len(lanes), topo.devices)  # before the other states exist
    states += [recipe.init_state(init_key, init_variables) for init_key, _ in keys[1:]]
    if seeds is None:
        state, data_key = parallel.replicate(states[0], topo), keys[0][1]
    else:
        state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
        data_key = jnp.stack([k for _, k in keys])

    def build() -> Programs:
        vmapped = None if seeds is None else len(lanes)
        return compile_programs(recipe, loop, state, images, labels, data_key, test, topo, vmapped)

    if seeds is None and compile_cache is not None:
        programs, compiled = compile_cache.get(cache_key(cfg, n_train, test.n, loop, state), build)
    else:
        programs, compiled = build(), True

    def make_plan(epoch: int) -> augment.Plan:
        if stream == "fast":
            return programs.plan(data_key, np.int32(epoch))
        host_plan = augment.plan_to_device(epoch_plan(cfg, epoch, n_train))
        return host_plan if topo.mesh is None else parallel.replicate(host_plan, topo)

    source = getattr(data, "source", None) or "arrays in memory"
    return Run(cfg, loop, stream, lanes, seeds is not None, steps, n_train, test.n, state, images,
               labels, test, recipe, programs, compiled, make_plan, source, topo)  # fmt: skip


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, data key): the seed is split once; epochs are folded into the data key."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def restore_state(folder: Path, like: Any = None) -> Any:
    """`Run.write_state`'s state with the structure, dtypes and placement of `like` (the
    freshly set-up state, so the compiled programs take it unchanged); None: as saved."""
    import orbax.checkpoint as ocp

    path = (folder / "state").resolve()
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """(progress, saved state as nested dicts of numpy arrays: `params`, `batch_stats`,
    `opt_state`, `ema`, `step`) of a run folder's latest checkpoint, to inspect it."""
    folder, progress = checkpoint.read_latest(run_dir)
    return progress, jax.device_get(restore_state(folder))
