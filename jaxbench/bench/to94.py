"""Training FLOPs to 94%, per recipe, independent of the hardware: `python -m jaxbench.bench.to94`.

A recipe's work is its training GFLOP per image times the images it trains on
(ceil(epochs x steps per epoch) full batches). Two counts per image: counted
(`flops.train_flops_per_image`, 3x forward with padding taps, plus Muon's Newton-Schulz
matmuls spread over the batch) and XLA's (the cost analysis of the compiled train step
on this machine's backend, per image: no padding taps, BN, loss and optimizer included).
Rows: the published records, each on the preset that has its net and batch, then this
project's presets as they train. The table in docs/recipes.md is one run of this command.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from jaxbench import configs, muon
from jaxbench.bench import flops
from jaxbench.command import Command, run_command
from jaxbench.configs import Config

TRAIN_IMAGES = configs.DATASET_IMAGES["cifar10"][0]


@dataclass(frozen=True)
class Anchor:
    """A published recipe: its epochs and batch, the preset with its net, its stated work."""

    name: str
    preset: str
    epochs: float
    batch: int
    spec: muon.MuonSpec | None  # its Muon, None: SGD only
    published_pflop: float | None  # docs/recipes.md's "work" column; None: not stated


ANCHORS: tuple[Anchor, ...] = (
    Anchor("Page's ResNet-9, bag of tricks", "resnet9", 10, 512, None, 1.15),
    Anchor("airbench94", "speedrun", 9.9, 1024, None, 0.36),
    Anchor("airbench94_muon", "speedrun_muon", 8, 2000, muon.AIRBENCH94_MUON, 0.29),
    Anchor("record (cifar10-speedrun)", "speedrun_record", 7.59, 1536, muon.RECORD, None),
)


def newton_schulz_flops(cfg: Config, spec: muon.MuonSpec) -> int:
    """Matmul FLOPs of one Muon update of every trained 3x3 filter: per iteration on the wide
    (m, n) matrix, A = XX^T (2m^2 n), A^2 (2m^3) and (bA + cA^2)X (2m^2 n)."""
    total = 0
    for _, k, c_in, c_out, _, _, trained in flops.conv_layers(cfg):
        if trained and k > 2:  # the 2x2 whitening filter is frozen or on SGD
            m, n = sorted((c_out, c_in * k * k))
            total += spec.ns_steps * (4 * m * m * n + 2 * m**3)
    return total


def xla_train_flops_per_image(cfg: Config) -> float:
    """XLA's FLOPs of the compiled train step (this backend) per image of the batch."""
    from jaxbench.bench import program  # jax: only when asked

    p = program.build_pieces(cfg, batches=2)
    step, args = program.program_fn(p, "step", donate=False)
    return program.executed_flops(step.lower(*args).compile()) / cfg.batch_size


def training_images(epochs: float, batch: int) -> int:
    """Images trained in ceil(epochs x full batches per epoch) steps."""
    return math.ceil(epochs * (TRAIN_IMAGES // batch)) * batch


def rows(presets: Sequence[str], xla: bool) -> list[dict[str, object]]:
    """One row per anchor, then per preset: net, batch, epochs, steps, GFLOP/image, PFLOP."""
    todo = [(a.name, configs.get_config(a.preset).replace(batch_size=a.batch), a) for a in ANCHORS]
    for name in presets:
        cfg = configs.get_config(name)
        spec = muon.spec_of(cfg) if cfg.optimizer == "muon" else None
        epochs = cfg.epochs - 1 + cfg.last_epoch_fraction  # the record's 7.59
        todo.append(
            (f"preset `{name}`", cfg, Anchor(name, name, epochs, cfg.batch_size, spec, None))
        )
    cache: dict[tuple[str, int], float] = {}
    out = []
    for name, cfg, a in todo:
        images = training_images(a.epochs, a.batch)
        # 3x forward per image, plus one Newton-Schulz pass per step shared by the batch
        ns = newton_schulz_flops(cfg, a.spec) / cfg.batch_size if a.spec is not None else 0.0
        counted = flops.train_flops_per_image(cfg) + ns
        key = (a.preset, a.batch)
        if xla and key not in cache:
            cache[key] = xla_train_flops_per_image(cfg)
        executed = cache.get(key)
        out.append({
            "recipe": name, "net": a.preset, "batch": a.batch, "epochs": a.epochs,
            "steps": images // a.batch, "counted_gflop": counted / 1e9,
            "xla_gflop": None if executed is None else executed / 1e9,
            "counted_pflop": counted * images / 1e15,
            "xla_pflop": None if executed is None else executed * images / 1e15,
            "published_pflop": a.published_pflop,
        })  # fmt: skip
    return out


def markdown(table: list[dict[str, object]]) -> str:
    """The rows as a markdown table, GFLOP to 4 digits and PFLOP to 3."""

    def num(v: object, digits: int) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    head = (
        "| recipe | net (preset) | batch | epochs | steps | GFLOP/image counted | XLA "
        "| PFLOP counted | XLA | published |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    body = [
        f"| {r['recipe']} | `{r['net']}` | {r['batch']} | {r['epochs']:g} | {r['steps']} "
        f"| {num(r['counted_gflop'], 4)} | {num(r['xla_gflop'], 4)} "
        f"| {num(r['counted_pflop'], 3)} | {num(r['xla_pflop'], 3)} "
        f"| {num(r['published_pflop'], 2)} |"
        for r in table
    ]
    return "\n".join([head, *body])


def _main(cmd: Command, argv: list[str]) -> int:
    p = configs.OneLineErrorParser(prog="python -m jaxbench.bench.to94", description=__doc__)
    presets_help = "comma list of presets to add after the published recipes"
    p.add_argument("--config", default=",".join(a.preset for a in ANCHORS), help=presets_help)
    p.add_argument("--no-xla", action="store_true", help="counted FLOPs only (no compilation)")
    args = p.parse_args(argv)
    presets = args.config.split(",")
    for name in presets:
        configs.get_config(name)  # an unknown name: one line, exit 2
    cmd.inputs_checked()
    print(markdown(rows(presets, xla=not args.no_xla)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda cmd: _main(cmd, args))


if __name__ == "__main__":
    sys.exit(main())
