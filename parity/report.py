"""The suite's outputs: a table on stdout, `parity.json`, `parity_report.md` and `curves.png`.

Every file goes through `jaxbench.report`'s atomic writers, so an interrupted
run leaves the previous report intact rather than half a new one.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench import report
from parity.checks import Figure
from parity.plants import PLANTS
from parity.suite import SuiteResult


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def _tol(f: Figure | None) -> str:
    return "-" if f is None else f"{f.op} {_num(f.tolerance)}"


def table_rows(suite: SuiteResult) -> list[list[str]]:
    rows = []
    for r in suite.results:
        h = r.headline
        measured, result = _num(h.value) if h else "error", "pass" if r.passed else "FAIL"
        figure = (h.name if h else "") if r.error is None else f"error: {r.error}"
        rows.append([str(r.number), r.name, measured, _tol(h), result, f"{r.seconds:.1f}", figure])
    return rows


HEADER = ["#", "check", "measured", "tolerance", "result", "seconds", "figure"]


def format_table(suite: SuiteResult) -> str:
    """A fixed-width table, one row per check, showing the headline figure."""
    rows = [HEADER, *table_rows(suite)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=False)]
        cells[1] = row[1].ljust(widths[1])  # the check's name
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
        "threads": suite.threads,
    }


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    head = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return head + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


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
        f"- code: commit `{env.get('git_commit') or 'unknown'}`"
        f"{' with uncommitted changes' if env.get('git_dirty') else ''}"
        f"{' (' + env['git_note'] + ')' if env.get('git_note') else ''}; "
        f"CPU {env.get('cpu_model')}; GPU {', '.join(env.get('gpu_models') or []) or 'none'}; "
        f"threads: XLA {(suite.threads or {}).get('xla_cpu_threads', 'default')}, "
        f"torch {(suite.threads or {}).get('torch_intra_op', 'default')}",
        f"- command: `{env['command']}`",
        "- checks 1-6 run at float32 full precision (JAX matmul precision 'highest', "
        "PyTorch TF32 off); check 7 runs the trainers in their normal mode.",
    ]
    if suite.plant:
        lines += ["", f"Planted bug `{suite.plant}`: {PLANTS[suite.plant].how}."]
    lines += ["", "## Summary", "", *_md_table(HEADER, table_rows(suite))]
    for r in suite.results:
        lines += ["", f"## Check {r.number}: {r.name}", ""]
        if doc := _CHECK_NOTES.get(r.number):
            lines += [doc, ""]
        if r.error:
            lines += [f"Error: `{r.error}`", ""]
            if tb := r.details.get("traceback"):
                lines += ["```", tb.rstrip(), "```", ""]
        if r.number == 7 and "null_table" in r.details:
            lines += _curves_md(r.details, has_plot)
        shown = r.figures
        if len(r.figures) > 12:
            shown = r.failed_figures + [f for f in r.figures if f.passed and f.headline][:8]
            n = len(r.figures)
            lines += [f"{n} figures; failed ones and the main ones shown (all in parity.json).", ""]
        rows = [[f.name, _num(f.value), _tol(f), "pass" if f.passed else "**FAIL**"] for f in shown]
        lines += _md_table(["figure", "measured", "tolerance", "result"], rows)
    return "\n".join(lines) + "\n"


def _pts(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _test_cells(row: dict[str, Any]) -> list[str]:
    """A chaos test's difference, bar, t (df) and verdict, in points."""
    t, verdict = f"{row['t']:+.2f} ({row['df']})", "pass" if row["passed"] else "**FAIL**"
    return [_pts(row["diff"], signed=True), _pts(row["bar"]), t, verdict]


def _curves_table(d: dict[str, Any]) -> list[str]:
    """Per (metric, epoch): the real comparison (jax against the torch runs) beside the null."""
    real = {(row["metric"], row["epoch"]): row for row in d.get("table", [])}
    rows = []
    for n in d["null_table"]:
        row = real.get((n["metric"], n["epoch"]))
        cells = [n["metric"], str(n["epoch"])]
        if row is not None:
            means = (row["treatment_mean"], row["reference_mean"], row["chaos_sd"])
            cells += [*map(_pts, means), *_test_cells(row)]
        else:  # a null-only run (no jax): the torch runs' mean and chaos from the null
            cells += ["-", _pts(n["reference_mean"]), _pts(n["chaos_sd"]), "-", "-", "-", "-"]
        rows.append([*cells, *_test_cells(n)])
    last = "torch" + "'" * (d.get("torch_runs", 3) - 1)
    header = ["metric", "epoch", "jax %", "torch % (all runs)", "chaos sd", "jax - torch", "bar"]
    header += ["t (df)", "real", f"null: {last} - torch", "null bar", "null t (df)", "null"]
    return _md_table(header, rows)


def _curves_md(d: dict[str, Any], has_plot: bool) -> list[str]:
    """Check 7's configuration, its real and null comparisons side by side, and the plot."""
    runs, alpha = d.get("torch_runs", 3), d.get("alpha", float("nan"))
    reruns = ", ".join("torch" + "'" * k for k in range(1, runs))
    lines = [
        f"Configuration: {d['note']}. {d['seeds']} seeds; per seed, jax and torch start from "
        f"the same weights (torch_ref's init, converted) and {runs - 1} torch reruns "
        f"({reruns}) from those weights perturbed by ~1 ulp, all on the same batches.",
        "",
        f"Stated false-alarm rate: alpha = {100 * alpha:g}% per comparison (family-wise over "
        f"its {len(d['null_table'])} figures, Bonferroni), so at most {200 * alpha:g}% for the "
        "check. Real: jax against the mean of all torch runs; null: the last torch rerun "
        "against the others, the same test with one reference run fewer (measured here on "
        "every call). Differences, chaos sd (one run's, from the torch runs' within-seed "
        "spread) and bars in accuracy points; t with its degrees of freedom.",
        "",
        *_curves_table(d),
    ]
    if div := d.get("loss_divergence"):
        parts = [
            f"{pair}: {v['first_10_steps']:.2g} in the first 10 steps, {v['last_epoch']:.2g} "
            "in the last epoch"
            for pair, v in div.items()
        ]
        lines += [
            "",
            "Divergence from the torch run (mean |per-step training loss difference|, over "
            "seeds): " + "; ".join(parts) + ".",
        ]
        real, null = div.get("jax vs torch"), div.get("torch' vs torch")
        if real and null and real["last_epoch"] > 3 * null["last_epoch"]:
            lines += [
                "",
                "**Warning**: in the last epoch jax is "
                f"{real['last_epoch'] / max(null['last_epoch'], 1e-30):.0f}x further from "
                "torch than the rerun is: chaos has not saturated (too few steps), so the "
                "null understates the noise and the bars are too narrow for this run.",
            ]
    secs, cpu = d.get("seconds") or {}, d.get("cpu_seconds") or {}
    if secs:
        times = ", ".join(f"{k} {secs[k]:.0f} / {cpu.get(k, float('nan')):.0f} s" for k in secs)
        lines += ["", f"Time (wall / CPU, all seeds): {times}."]
    if has_plot:
        lines += ["", "![curves](curves.png)"]
    return [*lines, ""]


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
    3: "Gradient of each trainer's own training loss (jaxbench.train.make_loss_fn, "
    "torch_ref.train.train_forward with loss_options: normalisation of the uint8 batch, "
    "train-mode forward, label-smoothed loss) w.r.t. every parameter, same weights and "
    "batch: relative error ||g_jax - g_torch|| / ||g||. The speedrun net gets float noise "
    "instead of images (its identity filters make real images' max-pool ties).",
    4: "The optax LR schedule against the LR torch_ref sets (lr_at(t)) at every step of the "
    "run; K updates from the same parameters and random gradients (coupled decay, Nesterov, "
    "BN-bias group, also with 64x / 1/64 multipliers) and the EMA of params and BN "
    "statistics (live statistics changed identically every step). Muon (airbench94_muon and "
    "the record) on the model's conv filters: each framework's updates against the float64 "
    "reference (jaxbench.muon) within 10x the float32 noise of the reference rerun in "
    "float32, and against each other within 20x.",
    5: "The shared stream's plans (random and alternating flip, epochs 0-1) applied by "
    "jaxbench.augment, torch_ref.augment and stream.apply_plan_numpy: every byte.",
    6: "Both trainers' own train_and_evaluate (stream='shared', float32, full precision) "
    "through their parity hooks: torch_ref runs free, and the JAX trainer starts every step "
    "from torch_ref's state (params, BN statistics, momentum, step counters, EMA), so "
    "float32 chaos cannot build up; what JAX's loop carries into the next step is compared. "
    "Per-step loss; BN statistics per element; the LR, weight decay and EMA decay each "
    "trainer actually applied, recovered from its own update, against the config; params, "
    "momentum and EMA params as a whole (their gradient is float32-ambiguous near ReLU "
    "and max-pool kinks); evaluation of identical weights: every TTA view's logits, the loss, "
    "the accuracies. Module docstring of parity/checks/trainer.py: the argument and the bars.",
    7: "Both trainers, stream='shared', several seeds, each a matched pair (same weights, "
    "same batches), plus torch reruns from the same weights perturbed by ~1 ulp: is jax "
    "further from torch than torch is from itself? Per epoch and metric (test accuracy, EMA "
    "test accuracy) a paired t test of jax against the torch runs, its variance from the "
    "torch runs' own spread (float32 chaos), Bonferroni over the figures; the same test of "
    "a torch rerun against the other torch runs is the null, run and reported every time. "
    "The bar follows the chaos measured in the same call, so it is as wide on any CPU as "
    "that CPU's float32 noise needs, and no wider.",
}


_RUN_STYLE = {"jax": ("tab:blue", "-"), "torch": ("tab:orange", "-")}


def plot_curves(curves: dict[str, Any]) -> bytes | None:
    """PNG bytes: each run kind's mean curve over seeds (torch reruns dashed and dotted) and,
    below, the paired differences with their bars (real and null); None without data."""
    runs = curves.get("runs")
    if not runs or not runs.get("torch"):
        return None
    from matplotlib.figure import Figure as PlotFigure

    reruns = [n for n in runs if n.startswith("torch'")]
    null = f"null: {reruns[-1] if reruns else ''} - torch"
    tables = {"jax - torch": curves.get("table") or [], null: curves.get("null_table") or []}
    rows = 2 if any(tables.values()) else 1
    fig = PlotFigure(figsize=(11, 4 * rows))
    axes = fig.subplots(rows, 2, sharex=True, squeeze=False)
    for col, (metric, title) in enumerate(
        (("val_acc", "test accuracy"), ("ema_val_acc", "EMA test accuracy"))
    ):
        ax = axes[0, col]
        for name, run in runs.items():
            acc = 100 * np.array([[row[metric] for row in r] for r in run], float)
            epochs = np.arange(1, acc.shape[1] + 1)
            rerun = ("tab:orange", "--" if name.count("'") == 1 else ":")
            color, style = _RUN_STYLE.get(name, rerun)
            label = f"{name} (n={len(acc)})"
            ax.plot(epochs, acc.mean(0), style, marker="o", color=color, label=label)
            if name in _RUN_STYLE:
                ax.fill_between(epochs, acc.min(0), acc.max(0), color=color, alpha=0.15)
        ax.set_xticks(epochs)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        axes[-1, col].set_xlabel("epoch")
        if rows == 2:
            ax = axes[1, col]
            for (name, table), color, shift in zip(
                tables.items(), ("tab:blue", "tab:gray"), (-0.06, 0.06), strict=True
            ):
                pts = [row for row in table if row["metric"] == metric]
                if not pts:
                    continue
                e = np.array([row["epoch"] for row in pts], float) + shift
                diff = 100 * np.array([row["diff"] for row in pts])
                bar = 100 * np.array([row["bar"] for row in pts])
                ax.errorbar(
                    e, diff, yerr=bar, fmt="o", color=color, capsize=4, label=f"{name} ± bar"
                )
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(f"{title}: paired mean difference (points)")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("% (mean over seeds; band: min-max)")
    axes[0, 0].legend(fontsize=8)
    if rows == 2:
        axes[1, 0].set_ylabel("points")
        axes[1, 0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(curves.get("note", ""), 120), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_outputs(suite: SuiteResult, out: str | Path) -> list[Path]:
    """parity.json, parity_report.md and (when check 7 ran) curves.png under `out`."""
    out = Path(out)
    png = plot_curves(suite.curves)
    if png is not None:
        report.atomic_write_bytes(out / "curves.png", png)
    report.write_json(out / "parity.json", to_json(suite))
    report.atomic_write_text(out / "parity_report.md", to_markdown(suite, png is not None))
    written = [out / "parity.json", out / "parity_report.md"]
    return written if png is None else [out / "curves.png", *written]
