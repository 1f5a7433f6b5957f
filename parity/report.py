"""The suite's outputs: a table on stdout, `parity.json`, `parity_report.md` and `curves.png`.

Every file goes through `jaxbench.report`'s atomic writers, so an interrupted
run leaves the previous report intact rather than half a new one.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench import report
from parity.checks import CheckResult, Figure
from parity.plants import PLANTS
from parity.suite import SuiteResult


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def _tol(f: Figure | None) -> str:
    return "-" if f is None else f"{f.op} {_num(f.tolerance)}"


def table_rows(suite: SuiteResult) -> list[list[str]]:
    rows = []
    for r in suite.results:
        h = r.headline
        rows.append(
            [
                str(r.number),
                r.name,
                _num(h.value) if h else "error",
                _tol(h),
                "pass" if r.passed else "FAIL",
                f"{r.seconds:.1f}",
                (h.name if h else "") if r.error is None else f"error: {r.error}",
            ]
        )
    return rows


HEADER = ["#", "check", "measured", "tolerance", "result", "seconds", "figure"]


def format_table(suite: SuiteResult) -> str:
    """A fixed-width table, one row per check, showing the headline figure."""
    rows = [HEADER, *table_rows(suite)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def to_json(suite: SuiteResult) -> dict[str, Any]:
    return {
        "passed": suite.passed,
        "verdict": suite.verdict(),
        "quick": suite.quick,
        "plant": suite.plant,
        "plant_description": PLANTS[suite.plant].how if suite.plant else None,
        "data": suite.data_source,
        "seconds": suite.seconds,
        "config": suite.config.to_dict(),
        "checks": [r.as_dict() for r in suite.results],
        "curves": suite.curves,
        "environment": report.environment(("jax", "torch")),
    }


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _figures_md(r: CheckResult) -> list[str]:
    rows = [[f.name, _num(f.value), _tol(f), "pass" if f.passed else "**FAIL**"] for f in r.figures]
    return _md_table(["figure", "measured", "tolerance", "result"], rows)


def to_markdown(suite: SuiteResult, has_plot: bool) -> str:
    env = report.environment(("jax", "torch"))
    lines = [
        "# Parity report: jaxbench (JAX/Flax) vs torch_ref (PyTorch)",
        "",
        f"**{suite.verdict()}** - {sum(r.passed for r in suite.results)} of "
        f"{len(suite.results)} checks passed in {suite.seconds:.0f} s.",
        "",
        f"- config: `{suite.config.name}`{' (quick mode)' if suite.quick else ''}; "
        f"data: {suite.data_source}",
        f"- jax {env.get('jax')} ({env.get('jax_device')}), flax {env.get('flax')}, "
        f"optax {env.get('optax')}, torch {env.get('torch')} ({env.get('torch_device')}), "
        f"python {env['python']}, {env['date']}",
        f"- command: `{env['command']}`",
        "- checks 1-6 run at float32 full precision (JAX matmul precision 'highest', "
        "PyTorch TF32 off); check 7 runs the trainers in their normal mode.",
    ]
    if suite.plant:
        lines += ["", f"Planted bug `{suite.plant}`: {PLANTS[suite.plant].how}."]
    lines += ["", "## Summary", ""]
    lines += _md_table(HEADER, table_rows(suite))
    for r in suite.results:
        lines += ["", f"## Check {r.number}: {r.name}", ""]
        doc = _CHECK_NOTES.get(r.number)
        if doc:
            lines += [doc, ""]
        if r.error:
            lines += [f"Error: `{r.error}`", ""]
            tb = r.details.get("traceback")
            if tb:
                lines += ["```", tb.rstrip(), "```", ""]
        if r.number == 7 and "table" in r.details:
            lines += [
                f"Configuration: {r.details['note']}; {r.details['seeds']} seeds per "
                "framework, the same weights per seed in both (torch_ref's init, "
                "converted).",
                "",
            ]
            lines += _curve_table(r.details["table"])
            if has_plot:
                lines += ["", "![curves](curves.png)"]
            lines += [""]
        failed = r.failed_figures
        if len(r.figures) > 12:
            shown = failed + [f for f in r.figures if f.passed and f.headline][:8]
            lines += [
                f"{len(r.figures)} figures; failed ones and the main ones shown "
                "(all in parity.json).",
                "",
            ]
            lines += _figures_md(CheckResult(r.number, r.name, figures=shown))
        else:
            lines += _figures_md(r)
    return "\n".join(lines) + "\n"


def _curve_table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        out.append(
            [
                row["metric"],
                str(row["epoch"]),
                f"{100 * row['jax_mean']:.2f} ± {100 * row['jax_std']:.2f}",
                f"{100 * row['torch_mean']:.2f} ± {100 * row['torch_std']:.2f}",
                f"{100 * row['diff']:+.2f}",
                f"{100 * row['se_unpaired']:.2f} x {row['se_multiplier']:.1f}",
                f"{100 * row['tolerance']:.2f}",
            ]
        )
    return _md_table(
        ["metric", "epoch", "jax % (mean ± sd)", "torch %", "diff", "SE x q", "bar"], out
    )


_CHECK_NOTES: dict[int, str] = {
    1: "Each framework's own init for several seeds, pooled per layer and tested against "
    "uniform(-b, b), b = 1/sqrt(fan_in): |z| of mean and variance <= 5, a Kolmogorov-Smirnov "
    "test at alpha 1e-4, max|w| <= b and close to b; BN at scale 1, bias 0, mean 0, var 1; "
    "torch->flax->torch and flax->torch->flax conversions bit-exact.",
    2: "Same weights (torch_ref's, converted; running statistics warmed by two train-mode "
    "batches), same batch. Logits in train and eval mode, every module's output, the BN "
    "running statistics after one more train-mode batch (compared in PyTorch's unbiased "
    "convention), and a probe that re-runs every conv layer at stride 2 on an even-sized "
    "input with the layer's own padding setting: ResNet-9's stride-1 3x3 convs cannot show "
    "an XLA 'SAME' vs symmetric padding difference, a strided variant does.",
    3: "Gradient of the configured loss (label smoothing, reduction) w.r.t. every parameter, "
    "train-mode BN, same weights and batch: relative error ||g_jax - g_torch|| / ||g||.",
    4: "The optax LR schedule against the LR torch_ref sets (lr_at(t)) at every step of the "
    "run; K updates from the same parameters and random gradients (coupled decay, Nesterov, "
    "BN-bias group, also with 64x / 1/64 multipliers) and the EMA of params and BN "
    "statistics (live statistics changed identically every step).",
    5: "The shared stream's plans (random and alternating flip, epochs 0-1) applied by "
    "jaxbench.augment, torch_ref.augment and stream.apply_plan_numpy: every byte.",
    6: "Both trainers (train_and_evaluate, stream='shared') from the same weights: the "
    "per-step training losses.",
    7: "Both trainers, stream='shared', several seeds: per-epoch mean test accuracy and EMA "
    "accuracy, each seed a matched pair (same weights, same batches); bar max(floor, 2 "
    "standard errors of the difference of the means, Welch), floor 0.5 points (resnet9 full "
    "mode: 0.3, final epoch 0.15); the paired standard error is reported beside it.",
}


def plot_curves(curves: dict[str, Any]) -> bytes | None:
    """PNG bytes of both frameworks' mean curves with a min-max band, or None without data."""
    runs = curves.get("runs")
    if not runs or not runs.get("jax") or not runs.get("torch"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in zip(
        axes, ("val_acc", "ema_val_acc"), ("test accuracy", "EMA test accuracy"), strict=True
    ):
        for fw, color in (("jax", "tab:blue"), ("torch", "tab:orange")):
            acc = 100 * np.array([[row[metric] for row in run] for run in runs[fw]], float)
            epochs = np.arange(1, acc.shape[1] + 1)
            ax.plot(epochs, acc.mean(0), "o-", color=color, label=f"{fw} (n={len(acc)})")
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=color, alpha=0.2)
        ax.set_xticks(epochs)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (mean, band: min-max over seeds)")
    axes[0].legend()
    fig.suptitle(textwrap.fill(curves.get("note", ""), 110), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(suite: SuiteResult, out: str | Path) -> list[Path]:
    """parity.json, parity_report.md and (when check 7 ran) curves.png under `out`."""
    out = Path(out)
    written = []
    png = plot_curves(suite.curves)
    if png is not None:
        report.atomic_write_bytes(out / "curves.png", png)
        written.append(out / "curves.png")
    report.write_json(out / "parity.json", to_json(suite))
    report.atomic_write_text(out / "parity_report.md", to_markdown(suite, png is not None))
    written += [out / "parity.json", out / "parity_report.md"]
    return written
