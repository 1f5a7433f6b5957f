"""What the hot loop's choices cost, measured A/B: `python -m jaxbench.microbench`.

Each item times two compiled variants of a piece of the JAX trainer alternately (A B B A,
`reps` pairs after a warm-up each) and reports their median seconds per call and ratio:
`ema` (select vs `lax.cond`), `bn_variance` (two-pass vs one-pass), `max_pool`
(`layers.max_pool` vs Flax's), `final_eval` (net and EMA vs one weight set), `whitening`
(device vs numpy moments), and `init`'s seconds. Timings hold for this machine only.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import configs, layers, models, optim, report, schedule, train
from jaxbench.command import Command, run_command

MAX_REPS = 1000  # A/B pairs per item: a thousand settle any difference worth timing

Timer = Callable[[], Any]


def ab(a: Timer, b: Timer, reps: int) -> dict[str, float]:
    """Median seconds per call of `a` and `b`, alternating A B B A; each warmed up once."""
    jax.block_until_ready(a())
    jax.block_until_ready(b())
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(reps):
        for name, fn in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
    return {"a_seconds": ma, "b_seconds": mb, "b_over_a": mb / ma, "reps": reps}


def _cond_ema(ema: Any, new: Any, step: jax.Array, cfg: configs.Config) -> Any:
    if cfg.ema_every <= 0:
        return ema
    return jax.lax.cond(
        step % cfg.ema_every == 0, lambda: optim.ema_update(ema, new, cfg.ema_momentum), lambda: ema
    )


def _cond_lookahead(ema: Any, live: Any, step: jax.Array, cfg: configs.Config, total: int) -> Any:
    if cfg.ema_every <= 0:
        return ema, live
    decays = jnp.asarray(optim.ema_decays(cfg, total))

    def update() -> tuple[Any, Any]:
        new = optim.ema_update(ema, live, decays[jnp.minimum(step, total)])
        return new, new

    return jax.lax.cond(step % cfg.ema_every == 0, update, lambda: (ema, live))


def _step_timer(cfg: configs.Config, data: Any) -> Timer:
    """A timer of one compiled train step on a fixed batch (the state is not donated)."""
    r = train.setup(cfg, data)
    tx = optim.make_optimizer(cfg, r.steps)
    total = schedule.train_steps(cfg, r.steps)
    step_fn, _ = train.make_loop_fns(cfg, models.model_from_config(cfg), tx, total)
    plan = r.make_plan(0)
    compiled = jax.jit(step_fn).lower(r.state, r.images, r.labels, plan, np.int32(0)).compile()
    return lambda: compiled(r.state, r.images, r.labels, plan, np.int32(4))


def measure(cfg: configs.Config, data: Any, reps: int) -> dict[str, Any]:
    """Every item of the module docstring for `cfg`."""
    cfg = cfg.replace(loop="step")
    out: dict[str, Any] = {"config": cfg.name}
    select = _step_timer(cfg, data)
    with (
        mock.patch.object(optim, "maybe_ema_update", _cond_ema),
        mock.patch.object(optim, "lookahead_update", _cond_lookahead),
    ):
        cond = _step_timer(cfg, data)
    out["ema"] = {"a": "select (trainer)", "b": "lax.cond", **ab(select, cond, reps)}
    one_pass_bn = functools.partial(layers.BatchNorm, fast_variance=True)
    with mock.patch.object(layers, "BatchNorm", one_pass_bn):
        one_pass = _step_timer(cfg, data)
    out["bn_variance"] = {"a": "two-pass (trainer)", "b": "one-pass", **ab(select, one_pass, reps)}
    with mock.patch.object(layers, "max_pool", lambda x, k: nn.max_pool(x, (k, k), (k, k))):
        reduce_window = _step_timer(cfg, data)
    out["max_pool"] = {
        "a": "reshape + selects (trainer)",
        "b": "reduce_window (Flax)",
        **ab(select, reduce_window, reps),
    }
    r = train.setup(cfg, data)
    st = r.state
    out["final_eval"] = {
        "a": "net and EMA scored once each",
        "b": "one weight set (lookahead's end)",
        **ab(lambda: r.evaluate(st), lambda: r.evaluate(st, same_weights=True), max(2, reps // 4)),
    }
    if r.programs.moments is not None:
        from jaxbench import whitening

        host = np.asarray(data.train_images[: cfg.subset], np.uint8)
        moments = r.programs.moments
        patch = layers.whiten_patch(cfg)
        out["whitening"] = {
            "a": "device moments (trainer)",
            "b": "numpy moments",
            **ab(
                lambda: moments(r.images),
                lambda: whitening.patch_moments(host[: cfg.whiten_images], patch),
                max(2, reps // 4),
            ),
        }
    model = models.model_from_config(cfg)
    t0 = time.perf_counter()
    jax.block_until_ready(models.init_variables(model, jax.random.PRNGKey(0)))
    out["init_seconds_off_clock"] = time.perf_counter() - t0
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxbench.microbench`: exit 0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda cmd: _main(cmd, args))


def _main(cmd: Command, argv: list[str]) -> int:
    p = configs.OneLineErrorParser(prog="python -m jaxbench.microbench", description=__doc__)
    p.add_argument("--reps", type=int, default=10, help=f"A/B pairs per item, 2 to {MAX_REPS}")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    configs.add_config_args(p, skip=("name", "out", "seed", "loop"))
    args = p.parse_args(argv)
    if not 2 <= args.reps <= MAX_REPS:
        raise ValueError(f"--reps must be in [2, {MAX_REPS}] A/B pairs, got {args.reps}")
    cfg = configs.config_from_args(args)
    if args.out:  # before the data loads and anything compiles
        cmd.prepare_file(args.out, overwrite=args.overwrite)
    from jaxbench.data import load_dataset

    data = load_dataset(cfg)
    cmd.on_stop = lambda word: f"{word}; nothing written" + (f" to {args.out}" if args.out else "")
    res = measure(cfg, data, args.reps)
    res["environment"] = report.environment(("jax",))
    res["command"] = " ".join(["python -m jaxbench.microbench", *argv])
    for key, item in res.items():
        if isinstance(item, dict) and "b_over_a" in item:
            print(
                f"{key:<12} A {item['a']}: {1e3 * item['a_seconds']:.2f} ms   "
                f"B {item['b']}: {1e3 * item['b_seconds']:.2f} ms   B/A {item['b_over_a']:.3f}"
            )
    print(f"init (off the clock): {res['init_seconds_off_clock']:.2f} s")
    if args.out:
        report.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
