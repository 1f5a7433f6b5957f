"""Hold the GPU program to account on a machine without a GPU.

Two checks that need no accelerator:

* `check_programs(cfg, "cuda")` lowers the training epoch (the `lax.scan`), the training
  step and the evaluation batch for CUDA (StableHLO, via `jax.export`, which works from the
  CPU) and `hlo.inspect_program` reads the text for what would slow the GPU down or change
  what it computes: host callbacks, conditionals (XLA:GPU reads a conditional's predicate on
  the host, which splits the scanned epoch), convolutions or matmuls outside the compute
  dtype, and a training state that is not donated (a second copy of every weight).
* `flop_accounting(cfg)` compiles the step and an evaluation batch on the current backend
  and sets XLA's own FLOP count (`cost_analysis`) against the analytic count of
  `jaxbench.bench.flops`, which the benchmark's FLOP rate is built on.

`format_report` turns either into a few lines for the benchmark's self-check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import augment, models, optim
from jaxbench.bench import flops, frameworks
from jaxbench.bench.hlo import inspect_program, mlir_dtype
from jaxbench.configs import Config

PROGRAMS: tuple[str, ...] = ("epoch", "step", "eval")
PLATFORMS: tuple[str, ...] = ("cuda", "rocm", "tpu", "cpu")

# executed / counted FLOPs of a meaningful config (ResNet-9 or speedrun at their preset
# widths) measured on XLA:CPU: train 0.870-0.873, eval 0.869-0.882 (see `flop_accounting`).
# One extra forward in the step adds ~0.29 to the train ratio, and scoring a second weight
# set under one's name doubles the eval ratio; both leave these bounds.
RATIO_BOUNDS: dict[str, tuple[float, float]] = {"train": (0.80, 1.00), "eval": (0.80, 1.00)}


class ProgramError(RuntimeError):
    """A program could not be lowered for the requested platform."""


# --- building the programs ---------------------------------------------------------------


def for_platform(cfg: Config, platform: str) -> Config:
    """`cfg` with `precision="auto"` resolved as the trainer resolves it on `platform`.

    `models.compute_dtype` asks the *current* backend, which is the CPU here, so a CUDA
    program lowered from this machine would otherwise be built in float32.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    if cfg.precision != "auto":
        return cfg
    return cfg.replace(precision="float32" if platform == "cpu" else "bfloat16")


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


@functools.lru_cache(maxsize=16)
def _state_shapes(cfg: Config) -> Any:
    """The TrainState's shapes, from `train.create_train_state` itself (not re-derived), so
    the donation check counts exactly the trainer's leaves. Cached: it runs the init (~1 s);
    only shapes are kept, so a plant that changes code, not parameters, still takes effect."""
    model = models.model_from_config(cfg)
    state = frameworks.jax_train_state(model, optim.make_optimizer(cfg, 1))
    return jax.tree_util.tree_map(_spec, state)


@dataclasses.dataclass(frozen=True)
class Pieces:
    """What the trainer's `setup` builds, as shapes: enough to lower or compile its programs."""

    cfg: Config
    model: Any
    tx: Any
    state: Any  # TrainState of ShapeDtypeStructs
    steps: int  # batches per epoch
    images: jax.ShapeDtypeStruct
    labels: jax.ShapeDtypeStruct
    plan: Any
    eval_batch: int
    with_ema: bool


def build_pieces(
    cfg: Config, *, batches: int = 2, eval_batch: int | None = None, with_ema: bool | None = None
) -> Pieces:
    """The trainer's pieces for an epoch of `batches` batches (the shapes change the sizes in
    the program, not its structure, so a small epoch is as good as a real one).

    `eval_batch` defaults to `cfg.eval_batch_size`; `with_ema` to the trainer's choice (EMA on).
    """
    n_train = batches * cfg.batch_size
    plan = jax.eval_shape(lambda: augment.draw_plan(jax.random.PRNGKey(0), 0, n_train, cfg))
    return Pieces(
        cfg=cfg,
        model=models.model_from_config(cfg),
        tx=optim.make_optimizer(cfg, batches),
        state=_state_shapes(cfg),
        steps=batches,
        images=jax.ShapeDtypeStruct((n_train, 32, 32, 3), jnp.uint8),
        labels=jax.ShapeDtypeStruct((n_train,), jnp.int32),
        plan=plan,
        eval_batch=cfg.eval_batch_size if eval_batch is None else eval_batch,
        with_ema=cfg.ema_every > 0 if with_ema is None else with_ema,
    )


def program_fn(p: Pieces, which: str, *, donate: bool = True) -> tuple[Any, tuple[Any, ...]]:
    """(jitted function, argument shapes) of one program, jitted as `train.setup` jits it:
    the state donated for the epoch and the step, nothing donated for evaluation."""
    cfg = p.cfg
    donation = 0 if donate else ()
    if which in ("epoch", "step"):
        step_fn, epoch_fn = frameworks.jax_loop_fns(cfg, p.model, p.tx, cfg.epochs * p.steps)
        if which == "epoch":
            return jax.jit(epoch_fn, donate_argnums=donation), (p.state, p.images, p.labels, p.plan)
        i = jax.ShapeDtypeStruct((), jnp.int32)
        return jax.jit(step_fn, donate_argnums=donation), (p.state, p.images, p.labels, p.plan, i)
    if which == "eval":
        n = p.eval_batch
        acc = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in _eval_keys(p.with_ema)}
        args = (
            acc,
            p.state.variables(),
            p.state.ema,
            jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.uint8),
            jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n,), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        return jax.jit(frameworks.jax_eval_fn(cfg, p.model, n, p.with_ema)), args
    raise ValueError(f"which must be one of {', '.join(PROGRAMS)}, got {which!r}")


def _eval_keys(with_ema: bool) -> list[str]:
    return ["loss", "correct"] + (["ema_loss", "ema_correct"] if with_ema else [])


def lower_text(jitted: Any, args: Sequence[Any], platform: str) -> str:
    """StableHLO text of `jitted(*args)` for `platform`, from any machine.

    `jax.export` is the documented cross-platform path (custom calls allowed, so that the
    inspection, not the exporter, judges them). It refuses host callbacks outright; those
    are lowered with `jit(...).trace(...).lower(lowering_platforms=...)`, which works for
    the local platform only: a Python callback cannot be lowered for a GPU from a CPU
    machine, and that failure is raised as `ProgramError`.
    """
    try:
        exported = jax.export.export(
            jitted,
            platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ALL")],
        )(*args)
        return exported.mlir_module()
    except NotImplementedError:  # export: "serialization of host_callbacks ..."
        pass
    except ValueError as e:
        raise ProgramError(_lowering_hint(platform, e)) from e
    try:
        return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except ValueError as e:
        raise ProgramError(_lowering_hint(platform, e)) from e


def _lowering_hint(platform: str, e: Exception) -> str:
    return (
        f"could not lower for {platform} on {jax.default_backend()}: {e} "
        "(a host callback, e.g. jax.debug.callback, cannot be lowered for another platform)"
    )


def lower_program(
    cfg: Config,
    platform: str = "cuda",
    which: str = "epoch",
    *,
    batches: int = 2,
    eval_batch: int | None = None,
    donate: bool = True,
) -> str:
    """StableHLO text of one of the trainer's programs ('epoch', 'step' or 'eval') for
    `platform`, with `precision="auto"` resolved for that platform (`for_platform`).
    `donate=False` lowers without donation (a plant for the donation check)."""
    cfg = for_platform(cfg, platform)
    p = build_pieces(cfg, batches=batches, eval_batch=eval_batch)
    jitted, args = program_fn(p, which, donate=donate)
    return lower_text(jitted, args, platform)


def state_leaf_count(cfg: Config) -> int:
    """Leaves of the trainer's TrainState: the arguments the epoch and the step must donate."""
    return len(jax.tree_util.tree_leaves(_state_shapes(cfg)))


def check_program(
    cfg: Config, platform: str = "cuda", which: str = "epoch", *, batches: int = 2
) -> dict[str, Any]:
    """Lower one program for `platform` and inspect it with the trainer's expectations: the
    epoch is one loop, the epoch and the step donate every state leaf, evaluation donates
    nothing. A lowering failure is a finding (`ok` False), not an exception."""
    cfg = for_platform(cfg, platform)
    dtype = models.compute_dtype(cfg)  # precision is explicit now: backend-independent
    trained = which in ("epoch", "step")
    try:
        text = lower_program(cfg, platform, which, batches=batches)
    except ProgramError as e:
        return {"ok": False, "problems": [str(e)], "compute_dtype": mlir_dtype(dtype)}
    return inspect_program(
        text,
        dtype,
        state_leaves=state_leaf_count(cfg) if trained else None,
        expect_loop=which == "epoch",
    )


def check_programs(
    cfg: Config, platform: str = "cuda", which: Iterable[str] = PROGRAMS, *, batches: int = 2
) -> dict[str, Any]:
    """`check_program` for each of `which`: {'ok', 'platform', 'config', 'compute_dtype',
    'programs': {name: findings}}. Lowering takes well under a second per program."""
    cfg = for_platform(cfg, platform)
    programs = {w: check_program(cfg, platform, w, batches=batches) for w in which}
    return {
        "ok": all(f["ok"] for f in programs.values()),
        "platform": platform,
        "config": cfg.name,
        "compute_dtype": mlir_dtype(models.compute_dtype(cfg)),
        "programs": programs,
    }


# --- FLOPs as XLA executes them -------------------------------------------------------------


def executed_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled executable (`compiled.cost_analysis()["flops"]`).

    jax returns a dict (0.10, 0.11) or, in older versions, a list with one dict per HLO
    module; the modules' counts are added. XLA counts 2 FLOPs per multiply-add of a
    convolution or dot (skipping multiply-adds on zero padding) and 1 per element of
    elementwise work; transcendentals are counted apart and left out. A while loop's body
    is counted once whatever its trip count (measured on XLA:CPU, jax 0.10.2 and 0.11.2:
    a scan of 1, 2 or 4 training steps reports the same number), so the cost of a scanned
    epoch is neither per epoch nor dependably per step: compile the step.
    """
    analysis = compiled.cost_analysis()
    entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    values = [e.get("flops") for e in entries if isinstance(e, Mapping)]
    values = [float(v) for v in values if v is not None]
    if not values or any(v < 0 for v in values):
        raise ValueError(f"cost_analysis() has no FLOP count: {analysis!r:.200}")
    return sum(values)


def flop_accounting_from_compiled(
    cfg: Config,
    step_compiled: Any,
    batch_images: int,
    eval_compiled: Any = None,
    eval_images: int = 0,
    eval_weight_sets: int = 1,
    *,
    method: str = "XLA cost_analysis of the compiled train step and eval batch",
) -> dict[str, Any]:
    """`flop_accounting` for executables the caller already compiled (the trainer's own).

    `step_compiled` trains on `batch_images` images (a compiled scan would report one step,
    see `executed_flops`); `eval_compiled` scores `eval_images` test images with
    `eval_weight_sets` weight sets (2: the net and its EMA, `train.make_eval_fn(...,
    with_ema=True)`). Evaluation per image means *one weight set* (all TTA views), as
    `flops.eval_flops_per_image` counts it and the benchmark multiplies by the sets.
    """
    train_exec = executed_flops(step_compiled) / batch_images
    train_counted = flops.train_flops_per_image(cfg)
    train_unpadded = flops.unpadded_train_flops_per_image(cfg)
    train_read_only = flops.unpadded_train_flops_per_image(cfg, read_only=True)
    out: dict[str, Any] = {
        "train_executed_per_image": train_exec,
        "train_counted_per_image": float(train_counted),
        "train_ratio": train_exec / train_counted,
        "train_unpadded_per_image": float(train_unpadded),
        "train_unpadded_ratio": train_exec / train_unpadded,
        "train_read_only_ratio": train_exec / train_read_only,
        "eval_executed_per_image": None,
        "eval_counted_per_image": float(flops.eval_flops_per_image(cfg)),
        "eval_ratio": None,
        "eval_unpadded_per_image": float(flops.unpadded_eval_flops_per_image(cfg)),
        "eval_unpadded_ratio": None,
        "eval_weight_sets": eval_weight_sets,
        "batch_images": batch_images,
        "eval_images": eval_images,
        "backend": jax.default_backend(),
        "method": method,
    }
    if eval_compiled is not None:
        if eval_images <= 0 or eval_weight_sets <= 0:
            raise ValueError("eval_images and eval_weight_sets must be positive")
        ev = executed_flops(eval_compiled) / (eval_images * eval_weight_sets)
        out["eval_executed_per_image"] = ev
        out["eval_ratio"] = ev / out["eval_counted_per_image"]
        out["eval_unpadded_ratio"] = ev / out["eval_unpadded_per_image"]
    return out


def flop_accounting(
    cfg: Config, *, batch_size: int | None = None, eval_batch: int | None = None
) -> dict[str, Any]:
    """XLA's executed FLOPs per image of the training step and of an evaluation batch,
    against the analytic count of `jaxbench.bench.flops` (train: 3x forward; eval: one forward
    per TTA view, per weight set), compiled on the current backend as the trainer compiles
    them (evaluation with the EMA when `cfg.ema_every > 0`, per image and weight set).

    Keys: train_/eval_ executed_per_image, counted_per_image, ratio (executed / counted),
    unpadded_per_image and unpadded_ratio (against `flops.unpadded_*`, XLA's convention),
    train_read_only_ratio (against the same without outputs nothing reads, the least XLA
    may execute),
    eval_weight_sets, batch_images, eval_images, backend, method.

    Why the ratio is not 1 (XLA:CPU, float32, jax 0.10.2; preset batch sizes, eval batch
    1000; batch 16 moves the train ratios by < 0.004):

        config    train ratio  eval ratio  train / unpadded  eval / unpadded
        tiny      0.888        0.877       1.030             1.010
        resnet9   0.871        0.869       1.009             1.003
        speedrun  0.848        0.882       0.990             1.027

    * XLA skips the multiply-adds that read zero padding; the count includes them. That is
      most of the gap: -4% for a 3x3 conv at 32x32, -8% at 16, -16% at 8, -31% at 4, so
      the unpadded forward is 0.866 of the counted one for ResNet-9 (0.858 for speedrun).
    * Autodiff builds no input gradient for the first convolution (its input is data) and
      speedrun's frozen whitening kernel gets no weight gradient, so "3x forward" is a
      slight over-count (`flops.unpadded_train_flops_per_image` models both).
    * What the count leaves out adds the rest, 1-3%: BatchNorm, activations, pooling and
      their gradients, the loss, augmentation and normalisation, the optimizer and the
      EMA (per step, so ~1/batch per image), the TTA sums. It weighs more at small widths
      (elementwise work grows with width, convolutions with its square), so the bounds
      (`RATIO_BOUNDS`) are meant for the preset widths.
    * XLA computes only part of the conv outputs that nothing reads (speedrun's conv1 rows
      and columns dropped by a flooring pool), so speedrun's train step is below the
      unpadded count; against the count without them (`train_read_only_ratio`) it is
      1.075.
    * XLA counts 2 FLOPs per multiply-add, as the count does, so there is no factor 2.

    Measured on XLA:CPU only. On a GPU the count comes from XLA:GPU's cost model after its
    cuDNN rewrites, not checked here (no GPU): look at the ratio there before trusting
    `RATIO_BOUNDS`.
    """
    if batch_size is not None:
        cfg = cfg.replace(batch_size=batch_size)
    p = build_pieces(cfg, eval_batch=eval_batch)
    step, step_args = program_fn(p, "step")
    ev, ev_args = program_fn(p, "eval")
    return flop_accounting_from_compiled(
        cfg,
        step.lower(*step_args).compile(),
        cfg.batch_size,
        ev.lower(*ev_args).compile(),
        p.eval_batch,
        2 if p.with_ema else 1,
    )


def flop_problems(
    acc: Mapping[str, Any], bounds: Mapping[str, tuple[float, float]] = RATIO_BOUNDS
) -> list[str]:
    """The ratios of `flop_accounting` that leave `bounds` (empty: within them)."""
    out = []
    for part, (lo, hi) in bounds.items():
        r = acc.get(f"{part}_ratio")
        if r is not None and not lo <= r <= hi:
            out.append(f"{part} executed/counted FLOPs {r:.3f} outside [{lo}, {hi}]")
    return out


# --- report ---------------------------------------------------------------------------------


def format_report(
    check: Mapping[str, Any] | None = None, acc: Mapping[str, Any] | None = None
) -> str:
    """A few lines on `check_programs` findings and/or `flop_accounting` numbers."""
    lines: list[str] = []
    if check is not None:
        verdict = "ok" if check["ok"] else "PROBLEMS"
        lines.append(
            f"program check {check['config']} for {check['platform']} "
            f"({check['compute_dtype']}): {verdict}"
        )
        for name, f in check["programs"].items():
            if "convolutions" in f:
                donated = (
                    f", {f['donated']}/{f['state_leaves']} state leaves donated"
                    if f.get("state_leaves") is not None
                    else ""
                )
                lines.append(
                    f"  {name}: {f['loops']} loop(s), {f['convolutions']} conv, "
                    f"{f['dot_generals']} dot, {len(f['conditionals'])} conditional(s), "
                    f"{len(f['host_callbacks'])} host callback(s){donated}"
                )
            else:
                lines.append(f"  {name}: not lowered")
            lines += [f"    - {p}" for p in f["problems"]]
    if acc is not None:
        lines.append(f"FLOPs per image, XLA executed / counted ({acc['backend']}):")
        for part in ("train", "eval"):
            ex = acc.get(f"{part}_executed_per_image")
            if ex is None:
                continue
            lines.append(
                f"  {part}: {ex / 1e9:.4f} / {acc[f'{part}_counted_per_image'] / 1e9:.4f} GFLOP"
                f" = {acc[f'{part}_ratio']:.3f} (vs unpadded {acc[f'{part}_unpadded_ratio']:.3f})"
            )
        lines += [f"    - {p}" for p in flop_problems(acc)]
    return "\n".join(lines)


__all__ = [
    "PROGRAMS",
    "RATIO_BOUNDS",
    "Pieces",
    "ProgramError",
    "build_pieces",
    "check_program",
    "check_programs",
    "executed_flops",
    "flop_accounting",
    "flop_accounting_from_compiled",
    "flop_problems",
    "for_platform",
    "format_report",
    "lower_program",
    "lower_text",
    "program_fn",
    "state_leaf_count",
]
