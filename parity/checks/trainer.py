"""Check 6: the trainers' own training and evaluation code."""

from __future__ import annotations

import numpy as np
import torch

from parity.checks.base import (
    CheckResult,
    Context,
    Figure,
    subset_data,
    synthetic_dataset,
)

TRAJECTORY_FLOOR = 1e-5  # relative; below this two float32 runs agree outright
TRAJECTORY_FACTOR = 10.0  # times float32's own chaos envelope, see check_trajectory
PERTURBATION = 1e-6  # relative noise on the initial weights: about ten float32 ulps


def check_trainer(ctx: Context) -> CheckResult:
    """Both trainers from the same weights on the shared stream: per-step training losses.

    SGD on a small ResNet is chaotic in float32: a one-ulp change of the initial
    weights grows roughly tenfold per step (measured: 1e-7 at step 1, ~1e-4 at
    step 4, ~1e-2 by step 12, within one framework). A fixed bar would either fail
    correct code or be toothless, so the bar is measured too: torch_ref is run a
    twice more from weights perturbed by ~10 ulps (relative noise 1e-6; the two
    frameworks' per-step rounding differences act like that: measured), and at
    every step t the JAX-vs-PyTorch difference must stay within
    max(1e-5, 10 x the largest perturbed-vs-unperturbed difference up to step t+1).
    A recipe difference (LR, decay, momentum, BN, augmentation) shows within a
    step or two, while the envelope is still ~1e-6.
    """
    from jaxbench import train as jtrain
    from torch_ref import train as ttrain

    res = CheckResult(6, "trainer")
    h = ctx.harness
    n_train, n_test, batch = (1000, 500, 100) if ctx.quick else (5000, 1000, 250)
    cfg = ctx.arith_cfg.replace(
        subset=n_train,
        test_subset=n_test,
        batch_size=batch,
        eval_batch_size=n_test,
        epochs=2,
        lr_peak_epoch=1.0,
        seed=3,
    )
    if cfg.model == "speedrun":  # freeze the whitening bias after epoch 1 of 2, so it shows
        cfg = cfg.replace(whiten_bias_epochs=1)
    data = (
        subset_data(ctx.data, n_train, n_test)
        if ctx.data is not None
        else synthetic_dataset(n_train, n_test)
    )
    tmodel = h.torch_model(cfg, cfg.seed)
    sd = {k: v.clone() for k, v in tmodel.state_dict().items()}
    variables = h.to_flax(sd, momentum=cfg.bn_momentum)
    common = dict(data=data, stream="shared", progress=False, quiet=True)
    js = jtrain.train_and_evaluate(cfg, init_variables=variables, **common)
    ts = ttrain.train_and_evaluate(cfg, init_state_dict=sd, compile=False, **common)
    perturbed = []
    for noise_seed in range(2):
        rng = np.random.default_rng(noise_seed)
        noisy = {
            k: v * (1 + PERTURBATION * torch.from_numpy(rng.standard_normal(v.shape)).to(v.dtype))
            if v.is_floating_point()
            else v
            for k, v in sd.items()
        }
        run = ttrain.train_and_evaluate(cfg, init_state_dict=noisy, compile=False, **common)
        perturbed.append(np.asarray(run["step_losses"]))
    jl, tl = np.asarray(js["step_losses"]), np.asarray(ts["step_losses"])
    n = min(len(jl), len(tl), *(len(p) for p in perturbed))
    rel = np.abs(jl[:n] - tl[:n]) / np.maximum(np.abs(tl[:n]), 1e-12)
    chaos = np.max([np.abs(p[:n] - tl[:n]) for p in perturbed], axis=0) / np.maximum(
        np.abs(tl[:n]), 1e-12
    )
    # Running max with one step of lookahead: chaotic jumps (a max-pool tie flipping) land
    # a step earlier or later from run to run.
    envelope = np.maximum.accumulate(np.append(chaos[1:], chaos[-1:]))
    bar = np.maximum(TRAJECTORY_FLOOR, TRAJECTORY_FACTOR * envelope)
    ratio = rel / bar
    worst = int(np.argmax(ratio))
    res.figures.append(
        Figure(
            f"step loss relative |diff| / bar, worst of {n} steps (step {worst})",
            float(ratio[worst]),
            1.0,
        )
    )
    res.figures.append(
        Figure("steps recorded (jax - torch)", abs(len(jl) - len(tl)), 0, headline=False)
    )
    res.details = {
        "config": {k: cfg.to_dict()[k] for k in ("widths", "subset", "batch_size", "epochs")},
        "steps": n,
        "jax_losses": jl.tolist(),
        "torch_losses": tl.tolist(),
        "torch_perturbed_losses": [p.tolist() for p in perturbed],
        "relative_diff": rel.tolist(),
        "chaos_envelope": envelope.tolist(),
        "bar": bar.tolist(),
        "synthetic_data": ctx.data is None,
    }
    return res
