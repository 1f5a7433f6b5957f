"""Training configurations shared by `jaxbench` and `torch_ref` (standard library only).

Presets are functions that override the default rather than copy it. `lr` and
`weight_decay` are per *mean* loss, whatever `loss_reduction` (see `optimizer_scales`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _flag(default: Any, help_text: str) -> Any:
    """A config field and its `--help` line."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Recipe:
    """The training recipe: what changes the numbers (one recipe and seed, one result)."""

    name: str = _flag("resnet9", "preset the config came from")
    # --- data -----------------------------------------------------------------
    dataset: str = _flag("cifar10", "cifar10 or cifar100")
    source: str = _flag("auto", "auto (official files) or tfds")
    subset: int | None = _flag(
        None, "train on the first N training images, --batch-size to 50000 (all if unset)"
    )
    test_subset: int | None = _flag(
        None, "evaluate on the first N test images, 1 to 10000 (all if unset)"
    )
    # --- model ----------------------------------------------------------------
    model: str = _flag("resnet9", "network architecture")
    widths: tuple[int, ...] = _flag(
        (64, 128, 256, 512), "channel widths, each 1 to 4096, e.g. 16,32,64,128"
    )
    output_scale: float = _flag(0.125, "logits multiplier")
    head_unit_std: bool = _flag(
        False,
        "speedrun: the head's initial weights rescaled to unit standard deviation "
        "(airbench94_muon's `w *= 1 / w.std()`)",
    )
    bn_momentum: float = _flag(0.1, "BN running-stat momentum, PyTorch convention")
    bn_eps: float = _flag(1e-5, "BN epsilon")
    precision: str = _flag("auto", "float32, bfloat16, or auto (bfloat16 on GPU, float32 on CPU)")
    # --- optimisation -----------------------------------------------------------
    epochs: int = _flag(12, "training epochs")
    last_epoch_fraction: float = _flag(
        1.0,
        "train the first ceil(F x steps) batches of the last epoch only, and end the LR "
        "schedule there (the record's 7.59 epochs: --epochs 8 with 0.59)",
    )
    batch_size: int = _flag(512, "batch size (last partial batch dropped)")
    lr: float = _flag(0.4, "peak learning rate (per mean loss)")
    lr_peak_epoch: float = _flag(2.5, "epoch at which the LR peaks")
    lr_start: float = _flag(0.0, "LR at step 0, as a fraction of lr")
    lr_end: float = _flag(0.0, "LR at the end of the decay, as a fraction of lr")
    lr_flat_epochs: float = _flag(
        0.0,
        "last epochs with the LR held at lr_end (Page's EMA epochs; 0: none); "
        "the decay never ends before the peak",
    )
    momentum: float = _flag(0.9, "SGD momentum")
    nesterov: bool = _flag(True, "Nesterov momentum")
    weight_decay: float = _flag(5e-4, "coupled L2 decay (per mean loss), added to the gradient")
    bn_bias_lr_mult: float = _flag(1.0, "LR multiplier for BN biases")
    bn_bias_wd_mult: float = _flag(1.0, "weight-decay multiplier for BN biases")
    label_smoothing: float = _flag(0.2, "label smoothing")
    loss_reduction: str = _flag("sum", "sum (Myrtle; LR/WD rescaled by batch) or mean")
    lr_schedule: str = _flag(
        "one_cycle",
        "one_cycle (lr_start x lr -> lr at --lr-peak-epoch -> lr_end x lr) or "
        "linear (lr at the first update straight down to lr_end x lr at the end, "
        "airbench94_muon)",
    )
    optimizer: str = _flag(
        "sgd",
        "sgd, or muon: Muon on every trained 3x3 conv filter, SGD on the rest "
        "(airbench94_muon; speedrun net only)",
    )
    muon_lr: float = _flag(
        0.24, "--optimizer muon: peak LR of the filters (not rescaled by the batch)"
    )
    muon_momentum: float = _flag(0.6, "--optimizer muon: the filters' Nesterov momentum")
    muon_variant: str = _flag(
        "airbench94_muon",
        "--optimizer muon: whose update (`jaxbench.muon`): airbench94_muon, or record "
        "(cifar10-speedrun: other Newton-Schulz coefficients and pre-scaling, a float16 "
        "buffer, decay, weight normalisation at an adaptive interval)",
    )
    muon_weight_norm: bool = _flag(
        True,
        "--optimizer muon: rescale each filter to norm sqrt(out channels) before its update "
        "(every step in airbench94_muon, at the record's adaptive interval)",
    )
    # --- EMA and evaluation -------------------------------------------------------
    ema_every: int = _flag(5, "update the EMA every k steps (0: off)")
    ema_momentum: float = _flag(0.99, "EMA momentum: ema = m * ema + (1 - m) * params")
    tta: bool = _flag(True, "flip test-time augmentation at evaluation")
    tta_shift: bool = _flag(
        False, "with --tta: also average 1-px shifted views (airbench's 3-view TTA)"
    )
    tta_select: float = _flag(
        0.0,
        "selective TTA (the record's): the plain view's logits for every test image, the "
        "equal mean of the 6 views (--tta-shift's) for the fraction S least confident (0: off)",
    )
    lookahead: bool = _flag(
        False, "reset the net to the EMA at each EMA update (airbench lookahead)"
    )
    bn_scale_trainable: bool = _flag(True, "train BN scales (False: fixed at --bn-scale)")
    bn_scale: float = _flag(1.0, "BN scale at init, or its fixed value when not trainable")
    # --- Page's tricks: layer choices, built by each framework's layers.py ------------
    activation: str = _flag(
        "relu",
        "relu, celu, gelu (exact erf) or silu; the speedrun net's stem keeps its GELU",
    )
    celu_alpha: float = _flag(0.3, "alpha of --activation celu")
    pool_before_act: bool = _flag(
        False, "pool right after the conv (conv, pool, BN, act) instead of last"
    )
    ghost_bn: int = _flag(0, "ghost batch norm: BN statistics over groups of N images (0: off)")
    whiten: str = _flag(
        "none",
        "input stem: none (conv3x3), patch3 (Page: frozen 3x3 patch whitening + "
        "1x1 conv) or patch2 (airbench: frozen 2x2 whitening with bias)",
    )
    whiten_eps: float = _flag(1e-2, "whitening: eps added to the eigenvalues")
    whiten_images: int = _flag(10_000, "whitening: patch covariance of the first N training images")
    whiten_bias_init: str = _flag(
        "zero", "patch2 whitening bias init: zero (airbench) or uniform (torch default)"
    )
    whiten_bias_epochs: float = _flag(
        0,
        "speedrun: epochs during which the whitening bias trains (a fraction: the first "
        "ceil(E x steps per epoch) updates)",
    )
    whiten_bias_own_lr: bool = _flag(
        False,
        "speedrun: the whitening bias takes the BN biases' LR and decay, its LR "
        "linear to zero over --whiten-bias-epochs (airbench94_muon); off: the run's LR "
        "and decay (airbench94)",
    )
    eval_batch_size: int = _flag(1000, "evaluation batch size")
    eval_every: int = _flag(1, "monitoring evaluation every k epochs (the last epoch always)")
    # --- augmentation -------------------------------------------------------------
    crop_pad: int = _flag(4, "reflect-pad then random-crop (0: off)")
    flip: str = _flag("random", "none, random or alternating")
    cutout: int = _flag(8, "cutout square side in pixels (0: off)")
    jitter_brightness: float = _flag(
        0.0, "colour jitter: add a per-image shift drawn from [-B, B) to the normalised image"
    )
    jitter_contrast: float = _flag(
        0.0, "colour jitter: then multiply it by a per-image factor drawn from [1-C, 1+C)"
    )
    # --- several devices ------------------------------------------------------------
    bn_sync: str = _flag(
        "global",
        "with several devices: global (BN statistics over the whole batch, "
        "the same numbers as one device) or local (each device's share on its own, "
        "a different recipe)",
    )


@dataclass(frozen=True)
class RunOptions:
    """How and where one run of a recipe goes; these leave the numbers as they are."""

    seed: int = _flag(0, "seed for init, shuffling and augmentation")
    data_dir: str | None = _flag(
        None, "folder with the official CIFAR layout (else $JAXBENCH_DATA_DIR, cache)"
    )
    loop: str = _flag("auto", "scan (whole epoch in one jit), step, or auto")
    devices: int = _flag(
        0,
        "data-parallel devices per process: the batch is split over them, "
        "the weights replicated (0: every local device)",
    )
    out: str | None = _flag(
        None,
        "the run folder: config.json, metrics.jsonl (a row per epoch), status.json "
        "(running, done, diverged or interrupted, and how far) and summary.json",
    )
    checkpoint_every: int = _flag(
        0,
        "save a checkpoint to OUT/checkpoints every N epochs, off the clock, "
        "for --resume (0: never)",
    )


@dataclass(frozen=True)
class Config(RunOptions, Recipe):
    """A run: the recipe's fields, then the run options' (field docs become `--help`)."""

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed, validated."""
        return validate(dataclasses.replace(self, **changes))

    def recipe(self) -> Recipe:
        """What a compile cache keys on (besides the loop and the devices)."""
        return recipe_of(self)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)


def recipe_of(cfg: Recipe) -> Recipe:
    """The `Recipe` fields of a config, without its run options."""
    return Recipe(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Recipe)})


def validate(cfg: Config) -> Config:
    """Reject impossible combinations early, with a message that names the fix."""
    _check_choices(cfg)
    _check_counts(cfg)
    _check_rates(cfg)
    return cfg


def _check_choices(cfg: Config) -> None:
    choices = {
        "dataset": ("cifar10", "cifar100"),
        "source": ("auto", "tfds"),
        "precision": ("auto", "float32", "bfloat16"),
        "loss_reduction": ("sum", "mean"),
        "flip": ("none", "random", "alternating"),
        "loop": ("auto", "scan", "step"),
        "activation": ACTIVATIONS,
        "whiten": ("none", "patch3", "patch2"),
        "whiten_bias_init": ("zero", "uniform"),
        "bn_sync": ("global", "local"),
        "optimizer": ("sgd", "muon"),
        "lr_schedule": ("one_cycle", "linear"),
        "muon_variant": MUON_VARIANTS,
        "model": MODELS,
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    if cfg.tta_select and not cfg.tta:
        raise ValueError("--tta-select picks images for test-time views: it needs --tta")
    if cfg.model == "resnet9" and len(cfg.widths) != 4:
        raise ValueError("--widths for resnet9 takes four numbers, e.g. --widths 64,128,256,512")
    if cfg.model == "speedrun" and len(cfg.widths) != 3:
        raise ValueError("--widths for speedrun takes three numbers, e.g. --widths 64,256,256")
    if cfg.model == "resnet9" and cfg.whiten not in ("none", "patch3"):
        raise ValueError("--whiten for resnet9 is none or patch3 (Page's 3x3 patch whitening)")
    if cfg.model == "speedrun" and cfg.whiten != "patch2":
        raise ValueError(
            "the speedrun net's stem is airbench's 2x2 whitening: --whiten patch2 "
            "(start from --config speedrun for airbench's whitening eps and image count)"
        )


def _check_counts(cfg: Config) -> None:
    """Sizes, epochs and pixel counts, each in its range (`COUNT_RANGES`)."""
    for name, (low, high, unit) in COUNT_RANGES.items():
        v = getattr(cfg, name)
        if not low <= v <= high:
            raise ValueError(
                f"--{name.replace('_', '-')} must be in [{low}, {high}] {unit}, got {v}"
            )
    if cfg.ghost_bn < 0 or (cfg.ghost_bn and cfg.batch_size % cfg.ghost_bn):
        raise ValueError(
            f"--ghost-bn {cfg.ghost_bn} must be 0 (off) or divide --batch-size {cfg.batch_size}, "
            "e.g. 32 for batch 512"
        )
    if not all(0 < w <= MAX_WIDTH for w in cfg.widths):
        raise ValueError(
            f"--widths entries must be in [1, {MAX_WIDTH}] channels, e.g. 16,32,64,128; "
            f"got {_shown(cfg.widths)}"
        )
    for name, opening in (("lr_flat_epochs", "["), ("lr_peak_epoch", "(")):
        v = getattr(cfg, name)
        if not ((0.0 <= v) if opening == "[" else (0.0 < v)) or not v <= cfg.epochs:  # NaN too
            raise ValueError(
                f"--{name.replace('_', '-')} must be in {opening}0, --epochs] = "
                f"{opening}0, {cfg.epochs}], got {v!r}"
            )
    train_images, test_images = DATASET_IMAGES[cfg.dataset]
    if cfg.subset is not None and cfg.subset < cfg.batch_size:
        raise ValueError(
            f"--subset {cfg.subset} is smaller than one batch ({cfg.batch_size}); "
            "raise --subset or lower --batch-size"
        )
    if cfg.subset is not None and cfg.subset > train_images:
        raise ValueError(
            f"--subset must be in [--batch-size, {train_images}] = [{cfg.batch_size}, "
            f"{train_images}] images ({cfg.dataset}'s training set), got {cfg.subset}"
        )
    if cfg.test_subset is not None and not 0 < cfg.test_subset <= test_images:
        raise ValueError(
            f"--test-subset must be in [1, {test_images}] images ({cfg.dataset}'s test set), "
            f"got {cfg.test_subset}"
        )


def _check_rates(cfg: Config) -> None:
    """Rates and fractions that would train nothing or diverge at once."""
    ranges = {  # name: (ends, lowest, highest, e.g.); an end "(" or ")" is left out
        "lr": ("(]", 0.0, 1e4, "0.4"),  # per mean loss: speedrun_muon's is 1340
        "weight_decay": ("[)", 0.0, 1.0, "5e-4"),
        "lr_start": ("[]", 0.0, 1.0, "0.2 (a fraction of --lr)"),
        "lr_end": ("[]", 0.0, 1.0, "0.1 (a fraction of --lr)"),
        "bn_bias_lr_mult": ("[]", 0.0, 1e3, "64"),
        "bn_bias_wd_mult": ("[]", 0.0, 1e3, "0.015625"),
        "output_scale": ("(]", 0.0, 100.0, "0.125"),
        "bn_eps": ("(]", 0.0, 1.0, "1e-5"),
        "bn_scale": ("(]", 0.0, 100.0, "1.0"),
        "celu_alpha": ("(]", 0.0, 100.0, "0.3"),
        "whiten_eps": ("(]", 0.0, 1.0, "1e-2"),
        "muon_lr": ("(]", 0.0, 100.0, "0.24"),
        "momentum": ("[)", 0.0, 1.0, "0.9"),
        "muon_momentum": ("[)", 0.0, 1.0, "0.6"),
        "bn_momentum": ("(]", 0.0, 1.0, "0.1 (PyTorch's convention)"),
        "label_smoothing": ("[)", 0.0, 1.0, "0.2"),
        "ema_momentum": ("[)", 0.0, 1.0, "0.99"),
        "jitter_brightness": ("[]", 0.0, 10.0, "0.1399 (normalised units)"),
        "last_epoch_fraction": ("(]", 0.0, 1.0, "0.59"),
        "tta_select": ("[)", 0.0, 1.0, "0.25"),
        # past --epochs means "the whole run", so a shortened preset stays valid
        "whiten_bias_epochs": ("[]", 0.0, MAX_EPOCHS, "3 (0: the whitening bias stays frozen)"),
        "jitter_contrast": ("[)", 0.0, 1.0, "0.1308"),
    }
    for name, (ends, low, high, example) in ranges.items():
        v = getattr(cfg, name)
        above = v > low if ends[0] == "(" else v >= low
        below = v < high if ends[1] == ")" else v <= high
        if not (above and below):  # NaN and infinities fail too
            what = "a positive finite number" if ends[0] == "(" else "a finite number"
            raise ValueError(
                f"--{name.replace('_', '-')} must be {what} in {ends[0]}{low:g}, {high:g}"
                f"{ends[1]}, e.g. {example}; got {v!r}"
            )


def check_supported(cfg: Config, trainer: str) -> None:
    """Refuse fields a model does not implement (ResNet-9: the airbench-only ones)."""
    if cfg.model not in MODELS:
        raise ValueError(f"{trainer} trains --model {' or '.join(MODELS)}, not {cfg.model!r}")
    if cfg.model == "speedrun":
        return
    unsupported = {
        "lookahead": cfg.lookahead,
        "tta_shift": cfg.tta_shift,
        "tta_select": cfg.tta_select,
        "whiten_bias_epochs": cfg.whiten_bias_epochs,
        "whiten_bias_own_lr": cfg.whiten_bias_own_lr,
        "optimizer": cfg.optimizer != "sgd",
        "head_unit_std": cfg.head_unit_std,
    }
    for name, active in unsupported.items():
        if active:
            raise ValueError(
                f"{trainer} does not implement --{name.replace('_', '-')} for {cfg.model} "
                f"(got {getattr(cfg, name)!r}); leave it at its resnet9 default"
            )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows each flag's default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        plain = "(default:" in text or text == argparse.SUPPRESS or not action.option_strings
        if plain or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) and defaults in `--help`: every entry point's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def check_wait(timeout_s: int) -> None:
    """`--dist-timeout` of either trainer: whole seconds up to a day, else a one-line ValueError."""
    if not 0 < timeout_s <= MAX_WAIT_S:
        raise ValueError(
            f"--dist-timeout must be seconds in [1, {MAX_WAIT_S}] (up to a day), got {timeout_s}"
        )


def optimizer_scales(cfg: Config) -> tuple[float, float]:
    """(lr, weight_decay) as the optimizer sees them: / and x batch for a summed loss."""
    if cfg.loss_reduction == "sum":
        return cfg.lr / cfg.batch_size, cfg.weight_decay * cfg.batch_size
    return cfg.lr, cfg.weight_decay


# --- presets ------------------------------------------------------------------


def myrtle24() -> Config:
    """Page's Myrtle ResNet-9 baseline: 24 epochs, none of the later tricks.

    Source: D. Page, "How to train your ResNet" (2018) and the baseline of "bag of
    tricks": conv, BN, ReLU, pool; crop + flip + 8x8 cutout; LR 0 -> 0.4 at epoch 5 -> 0
    at 24; Nesterov 0.9; output x 1/8. Published: 94.1% mean (n=50), 75 s on a V100.
    Command: `python -m jaxbench.train --config myrtle24 --data-dir DIR`.
    Measured here: not yet (24 full epochs take hours on a 2-core CPU).
    """
    return Config().replace(
        name="myrtle24",
        epochs=24,
        lr=0.4,
        lr_peak_epoch=5.0,
        label_smoothing=0.0,
        ema_every=0,
        tta=False,
    )


def resnet9() -> Config:
    """Page's final 10-epoch ResNet-9: every trick of "bag of tricks" stacked, in his order.

    Source: D. Page, "How to train your ResNet 8: bag of tricks" (2019) and its notebook's
    final cell. Published: 94.1% mean test accuracy (flip TTA) in 26 s on a V100.
    Deviations: torch-style Nesterov (equal while the LR is flat); the EMA updates after
    steps 5, 10, ... (Page: 1, 6, ...); the patch covariance is divided by n, not n - 1.
    Command: `python -m jaxbench.train --config resnet9 --data-dir DIR`; remove one trick
    with `--no-<trick>` (`TRICKS`). Measured here (2-core CPU, full data, float32):
    torch_ref 93.89% (seed 0), 94.20% (seed 1) (`results/cpu-2core/resnet9-torch-full*/`).
    """
    return myrtle24().replace(
        name="resnet9",
        epochs=10,
        lr=1.0,
        lr_peak_epoch=2.0,
        lr_end=0.1,
        lr_flat_epochs=2.0,
        cutout=0,
        pool_before_act=True,
        label_smoothing=0.2,
        activation="celu",
        celu_alpha=0.3,
        ghost_bn=32,
        bn_scale_trainable=False,
        bn_scale=1.0,
        bn_bias_lr_mult=64.0,
        bn_bias_wd_mult=1.0 / 64.0,
        output_scale=1.0 / 16.0,
        whiten="patch3",
        whiten_eps=1e-2,
        whiten_images=10_000,
        ema_every=5,
        ema_momentum=0.99**5,
        tta=True,
    )


def tiny() -> Config:
    """A narrow plain ResNet-9 on an 8,000-image subset: a CPU smoke test that learns.

    Command: `python -m jaxbench.train --config tiny --data-dir DIR` (2 CPU cores, float32).
    Measured 2026-11-26 (jax 0.10.2, 2 idle cores, seed 0): 62.4% EMA test accuracy
    (1,000 images), 48 s wall; torch_ref 62.6% EMA, 21 s wall. Expected: >= 50%.
    """
    return Config().replace(
        name="tiny",
        widths=(16, 32, 64, 128),
        subset=8_000,
        test_subset=1_000,
        epochs=3,
        batch_size=100,
        lr_peak_epoch=1.0,
        ema_momentum=0.8,
        precision="float32",
    )


def speedrun() -> Config:
    """airbench94 (K. Jordan): whitened conv net, lookahead EMA, 3-view TTA, batch 1024.

    Command: `python -m jaxbench.train --config speedrun --data-dir DIR` (or torch_ref).
    Published: 94.01% mean test accuracy (n=1000) in 9.9 epochs, 3.83 s on an A100.
    Measured here (2-core CPU, full data, float32, seed 0): torch_ref 94.23%
    (`results/cpu-2core/speedrun-torch-full-zero-bias/`). 10 whole epochs: 480 steps.

    Units: airbench sums the loss with lr = 11.5 / 7850.67 and coupled decay
    wd = 0.0153 * 1024 / 7850.67 (kilostep 7850.67 = 1024 * (1 + 1 / 0.15)); per mean loss
    that is lr = 1.5 and weight_decay = 0.0153 / 11.5 (the same per-step shrink). BN
    biases: lr x 64, decay / 64. LR x 0.2 -> 1 -> 0.07, peak at step round(2.3 * 48) = 110
    (airbench: 109 of 476). EMA every 5 steps with decay ema_momentum * (step / total)^3.
    """
    return Config().replace(
        name="speedrun",
        model="speedrun",
        activation="gelu",
        pool_before_act=True,
        whiten="patch2",
        whiten_eps=5e-4,
        whiten_images=5_000,
        whiten_bias_init="zero",
        widths=(64, 256, 256),
        output_scale=1.0 / 9.0,
        bn_momentum=0.4,
        bn_eps=1e-12,
        bn_scale_trainable=False,
        whiten_bias_epochs=3,
        epochs=10,
        batch_size=1024,
        lr=1.5,  # = 11.5 / (1 + 1 / (1 - 0.85))
        lr_peak_epoch=2.3,
        lr_start=0.2,
        lr_end=0.07,
        momentum=0.85,
        nesterov=True,
        weight_decay=0.0153 / 11.5,
        bn_bias_lr_mult=64.0,
        bn_bias_wd_mult=1.0 / 64.0,
        label_smoothing=0.2,
        loss_reduction="sum",
        ema_every=5,
        ema_momentum=0.95**5,
        lookahead=True,
        tta=True,
        tta_shift=True,
        crop_pad=2,
        flip="alternating",
        cutout=0,
    )


def speedrun_muon() -> Config:
    """airbench94_muon (K. Jordan): the speedrun net trained by Muon, batch 2000, 8 epochs.

    Source: `airbench94_muon.py`: 94.01% mean test accuracy (n=200) in 2.59 s on an A100.
    Command: `python -m jaxbench.train --config speedrun_muon --data-dir DIR` (or
    torch_ref); `--no-muon` trains every parameter with the SGD groups instead.
    Measured here (2-core CPU, full data, seed 0): jaxbench 93.94%, torch_ref 93.97%
    (results/cpu-2core/speedrun_muon-{jax,torch}-full). The source's choices, each with
    its field and the SGD numbers in per-mean-loss units: docs/recipes.md, `speedrun_muon`.
    """
    head_lr, bias_lr, batch = 0.67, 0.053, 2000
    return speedrun().replace(
        name="speedrun_muon",
        batch_size=batch,
        epochs=8,
        lr_schedule="linear",
        lr=head_lr * batch,
        lr_start=1.0,
        lr_end=0.0,
        lr_peak_epoch=1.0,  # unused by the linear schedule
        weight_decay=2e-6 / head_lr,
        bn_bias_lr_mult=bias_lr / head_lr,
        bn_bias_wd_mult=head_lr / bias_lr,
        optimizer="muon",
        muon_lr=0.24,
        muon_momentum=0.6,
        output_scale=1.0 / 256.0,
        head_unit_std=True,
        whiten_bias_init="uniform",
        whiten_bias_own_lr=True,
        ema_every=0,
        lookahead=False,
    )


def speedrun_record() -> Config:
    """The CIFAR-10 speedrun record (hiverge/cifar10-speedrun, `cifar10_speedrun.py`): the
    speedrun net with the record's Muon, batch 1536, 7.59 epochs.

    Source: 94.01% mean test accuracy (n=200) in 2.015 s on an A100. Command: `python -m
    jaxbench.train --config speedrun_record --data-dir DIR` (or torch_ref); each trick off
    with `--no-<trick>`: `muon`, `weight-norm`, `color-jitter`, `silu`, `selective-tta`,
    `bn-momentum`; `--whiten-images 5000` gives airbench's whitening sample back.
    Measured here (2-core CPU, full data, seed 0): torch_ref 94.15%, jaxbench 94.00%
    (results/cpu-2core/speedrun_record-{torch,jax}-full). 243 updates = ceil(7.59 x 32):
    the last epoch stops after 19 of its 32 batches, where the LR schedule ends. The
    source's other choices, each with its field: docs/recipes.md, `speedrun_record` (its
    SVD whitening is `jaxbench.whitening`'s eigendecomposition: no switch).
    """
    head_lr, bias_lr, batch = 0.5415, 0.0573, 1536
    return speedrun_muon().replace(
        name="speedrun_record",
        batch_size=batch,
        epochs=8,
        last_epoch_fraction=0.59,
        lr=head_lr * batch,
        weight_decay=1.0418e-6 / head_lr,
        bn_bias_lr_mult=bias_lr / head_lr,
        bn_bias_wd_mult=head_lr / bias_lr,
        momentum=0.825,
        muon_variant="record",
        muon_lr=0.205,
        muon_momentum=0.655,
        whiten_bias_epochs=0.19,
        whiten_images=960,
        activation="silu",
        bn_momentum=1 - 0.5566,
        label_smoothing=0.09,
        jitter_brightness=0.1399,
        jitter_contrast=0.1308,
        tta_select=0.25,
    )


DEFAULT_PRESET = "resnet9"
PRESETS: dict[str, Callable[[], Config]] = {
    "resnet9": resnet9,
    "myrtle24": myrtle24,
    "tiny": tiny,
    "speedrun": speedrun,
    "speedrun_muon": speedrun_muon,
    "speedrun_record": speedrun_record,
}
MODELS: tuple[str, ...] = ("resnet9", "speedrun")
SEEDS = 2**31  # --seed in [0, SEEDS): every framework's generator takes it
MAX_VMAP_SEEDS = 64  # K copies of a model, its optimizer state and activations on one device
MAX_WAIT_S = 24 * 3600  # --dist-timeout: a process later than a day is not coming
ACTIVATIONS: tuple[str, ...] = ("relu", "celu", "gelu", "silu")
MUON_VARIANTS: tuple[str, ...] = ("airbench94_muon", "record")
MAX_EPOCHS = 1000  # --epochs, and the epoch cadences and counts measured in epochs
MAX_BATCH = 65_536  # images in a batch (the memory check refuses what does not fit)
MAX_WIDTH = 4096  # channels of one layer (--widths entries)
MAX_DEVICES = 1024  # --devices per process
MAX_EMA_EVERY = 100_000  # steps between EMA updates (more than any run here takes: never)
# (training, test) images of each dataset: --subset, --test-subset and --whiten-images
DATASET_IMAGES: dict[str, tuple[int, int]] = {
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
}
# Integer fields: name -> (lowest, highest, unit and what an end means). The cadences stop
# at MAX_EPOCHS, not at --epochs: past --epochs they mean "the last epoch only", so a
# shortened preset (--epochs 2) stays valid.
COUNT_RANGES: dict[str, tuple[int, int, str]] = {
    "epochs": (1, MAX_EPOCHS, "epochs"),
    "batch_size": (1, MAX_BATCH, "images"),
    "eval_batch_size": (1, MAX_BATCH, "images"),
    "eval_every": (1, MAX_EPOCHS, "epochs (the last epoch is always evaluated)"),
    "checkpoint_every": (0, MAX_EPOCHS, "epochs (0: no checkpoints)"),
    "ema_every": (0, MAX_EMA_EVERY, "steps (0: no EMA)"),
    "whiten_images": (1, 50_000, "training images"),
    "devices": (0, MAX_DEVICES, "devices per process (0: every local device)"),
    "crop_pad": (0, 16, "pixels (0: no crop)"),
    "cutout": (0, 32, "pixels (0: no cutout)"),
    "seed": (0, SEEDS - 1, "(0 to 2**31 - 1)"),
}

# `--no-<trick>`: the fields that remove one of Page's tricks, set to the Myrtle
# baseline's values (`myrtle24`), so `--config resnet9 --no-whiten` is an ablation.
TRICKS: dict[str, dict[str, Any]] = {
    "pool-before-act": {"pool_before_act": False},
    "label-smoothing": {"label_smoothing": 0.0},
    "celu": {"activation": "relu"},
    "ghost-bn": {"ghost_bn": 0},
    "frozen-bn-scale": {"bn_scale_trainable": True},
    "bias-lr": {"bn_bias_lr_mult": 1.0, "bn_bias_wd_mult": 1.0},
    "whiten": {"whiten": "none"},
    "ema": {"ema_every": 0, "lookahead": False},
    "tta": {"tta": False, "tta_shift": False, "tta_select": 0.0},
    # airbench94_muon's optimizer split: every parameter back on Nesterov SGD (the
    # filters join the head's group)
    "muon": {"optimizer": "sgd"},
    # the record's: filters at their own norm (Muon), colour jitter, SiLU in the blocks, its
    # BN momentum (airbench94's 0.4 back; both use eps 1e-12)
    "weight-norm": {"muon_weight_norm": False},
    "bn-momentum": {"bn_momentum": 0.4},
    "color-jitter": {"jitter_brightness": 0.0, "jitter_contrast": 0.0},
    "silu": {"activation": "gelu"},
    "selective-tta": {"tta_select": 0.0},  # back to --tta-shift's weighted views for all
}


def without_trick(cfg: Config, trick: str) -> Config:
    """`cfg` with one of Page's tricks removed (`TRICKS`); a clear error for a typo."""
    if trick not in TRICKS:
        raise ValueError(f"unknown trick {trick!r}; choose one of {', '.join(TRICKS)}")
    return cfg.replace(**TRICKS[trick], name=f"{cfg.name}-no-{trick}")


def get_config(name: str) -> Config:
    """A preset by name, with a clear error for a typo."""
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --- command line -----------------------------------------------------------------


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--widths takes comma-separated integers, e.g. 16,32,64,128; got {text!r}"
        ) from None


def _field_parser(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """How a field's value is read from a flag or a sweep grid."""
    if f.name == "widths":
        return _parse_widths
    return {
        "bool": _parse_bool,
        "int | None": _optional(int),
        "float | None": _optional(float),
        "int": int,
        "float": float,
    }.get(str(f.type), str)


def parse_field(name: str, text: str) -> Any:
    """One Config field's value from text; a one-line ValueError names a bad field or value."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if name not in fields or name == "name":
        raise ValueError(f"{name!r} is not a config field (`--help` of jaxbench.train lists them)")
    try:
        return _field_parser(fields[name])(text)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{name}={text!r} is not a valid value ({e})") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _shown(value: Any) -> str:
    """A field's value as a user would type it on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, with none, all or nothing read as None (unset)."""
    return lambda text: None if text.lower() in ("none", "all", "") else parse(text)


def add_config_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("name",)) -> None:
    """`--config` (unless skipped) and a flag per Config field; unset flags keep the preset."""
    if "config" not in skip:
        parser.add_argument(
            "--config",
            default=DEFAULT_PRESET,
            choices=sorted(PRESETS),
            help="preset to start from; the defaults shown below are this default preset's, "
            "another preset brings its own",
        )
    shown = get_config(DEFAULT_PRESET)
    trick_flags = {f"--no-{trick}" for trick in TRICKS}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(shown, f.name)
        kind: dict[str, Any] = {"type": _field_parser(f), "metavar": f.name.upper()}
        default = f"(default: {_shown(value)})"
        if f.name in COUNT_RANGES:  # its range, as `validate` holds it
            default = f"({COUNT_RANGES[f.name][0]} to {COUNT_RANGES[f.name][1]}; {default[1:]}"
        if f.type == "bool":  # --x / --no-x, as ruff and pytest spell switches
            negative = "--no-" + f.name.replace("_", "-")
            default = f"(default: on; {negative} turns it off)" if value else "(default: off)"
            kind = {"action": "store_const", "const": True}
            if negative not in trick_flags:  # else the trick flag below turns it off
                parser.add_argument(
                    negative, dest=f.name, action="store_const", const=False,
                    default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                )  # fmt: skip
        help_ = f"{f.metadata.get('help', '')} {default}".strip()
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_, **kind)
    tricks = parser.add_argument_group(
        "ablation", "remove one of Page's tricks from the preset (set to the Myrtle baseline)"
    )
    for trick, changes in TRICKS.items():
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        tricks.add_argument(
            f"--no-{trick}",
            dest="no_tricks",
            action="append_const",
            const=trick,
            default=argparse.SUPPRESS,
            help=f"sets {shown}",
        )


# Fields a resumed run may change: they do not touch the numbers.
MAY_DIFFER: tuple[str, ...] = ("out", "data_dir", "checkpoint_every")


def resumed_config(args: argparse.Namespace, saved: Config, run_dir: str) -> Config:
    """The saved config with `MAY_DIFFER` flags applied; other flags must repeat it."""

    def refuse(flag: str, saved_value: object) -> ValueError:
        return ValueError(
            f"--resume {run_dir}: {flag} contradicts the run's saved config ({saved_value}); "
            "drop the flag to resume, or start a new run with --out"
        )

    name = getattr(args, "config", None)
    if name is not None and name != saved.name:
        raise refuse(f"--config {name}", f"config {saved.name}")
    for trick in getattr(args, "no_tricks", ()):
        if without_trick(saved, trick) != saved:
            raise refuse(f"--no-{trick}", "it has that trick")
    changes: dict[str, Any] = {"out": run_dir}
    for f in dataclasses.fields(Config):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        flag = f"--{f.name.replace('_', '-')} {value}"
        if f.name == "out":
            if Path(value).resolve() != Path(run_dir).resolve():
                raise refuse(flag, f"the run folder is {run_dir}")
        elif f.name in MAY_DIFFER:
            changes[f.name] = value
        elif value != getattr(saved, f.name):
            raise refuse(flag, f"{f.name}={getattr(saved, f.name)!r}")
    return saved.replace(**changes)


def config_from_args(args: argparse.Namespace) -> Config:
    """The chosen preset with every flag the user gave applied on top."""
    cfg = get_config(getattr(args, "config", None) or DEFAULT_PRESET)
    for trick in getattr(args, "no_tricks", ()):
        cfg = without_trick(cfg, trick)
    changes = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)
    }
    return cfg.replace(**changes)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (for reading a saved config.json)."""
    d = dict(d)
    if "widths" in d:
        d["widths"] = tuple(d["widths"])
    unknown = set(d) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)}")
    return validate(Config(**d))
