"""The benchmark's output besides bench.json: the results table, the verdict lines and the
bench-<preset>.png plots (docs/benchmark.md, "Reading the table")."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from jaxbench import report
from jaxbench.bench.records import programs_built

HEADER: tuple[str, ...] = (
    "framework",
    "preset",
    "devices",
    "runs",
    "acc mean±std",
    ">=target",
    "time mean±std",
    "compile",
    "img/s",
    "TFLOP/s",
    "epoch>=target",
    "built",
)
COLORS: dict[str, str] = {"jax": "tab:blue", "torch": "tab:orange"}


def plus_minus(stat: dict[str, Any], digits: int) -> str:
    """'mean±std', or 'mean (1 run)' when one run leaves no spread to show."""
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f} (1 run)"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def _row(name: str, fw: dict[str, Any], preset: str) -> list[str]:
    """One contender's cells, in the order of `HEADER`."""
    s = fw["summary"]
    built = programs_built([fw["warmup"], *fw["runs"]])
    comp = s["compile_seconds"]["warmup"]
    ips, tf, ep = s["images_per_second"], s["tflops_per_second"], s["epoch_reaching_target"]
    return [
        name,
        preset,
        str(s.get("devices", 1)),
        str(s["runs"]),
        plus_minus(s["accuracy"], 4),
        f"{s['runs_at_target']}/{s['runs']}",
        plus_minus(s["time_seconds"], 2) + " s",
        "-" if comp is None else f"{comp:.1f} s",
        "-" if ips is None else f"{ips:.0f}",
        "-" if tf is None else f"{tf:.3g}",
        "-" if ep is None else str(ep),
        "-" if built is None else str(built),
    ]


def _notes(doc: dict[str, Any]) -> list[str]:
    """The lines under the table: definitions, the vmapped-seeds row, the verdicts."""
    lines = [
        f"acc = {doc['accuracy_metric_description']}; target {doc['target']:.4f}; "
        "time = timed training + final evaluation; compile = warm-up run's",
        "built = runs that compiled their programs (JAX) or ran the compile/autotune warm-up "
        "(PyTorch), warm-up included: 1 means every timed run reused them",
    ]
    v = doc.get("vmap_seeds")
    if v and "time_seconds" in v:
        alone = "-" if v["time_alone"] is None else f"{v['time_alone']:.2f} s"
        lines.append(
            f"{v['k']} seeds, one program ({v['contender']}): {v['time_seconds']:.2f} s, "
            f"{v['time_per_seed']:.2f} s per seed against {alone} for a run alone; "
            f"acc {plus_minus(v['accuracy'], 4)}"
        )
    elif v:
        lines.append(f"{v['k']} seeds, one program: {v.get('skipped') or v.get('error')}")
    return lines + [format_verdict(v, doc["preset"]) for v in doc.get("verdicts", {}).values()]


def format_table(doc: dict[str, Any]) -> str:
    """The results table (plus FLOP rate and epoch-at-target), then the ratio line."""
    rows = [list(HEADER)]
    for name, fw in doc["frameworks"].items():
        if fw["summary"] is not None:
            rows.append(_row(name, fw, doc["preset"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + _notes(doc))


def format_verdict(verdict: dict[str, Any], preset: str) -> str:
    """One line: the time ratio with its interval, or why the race has no winner."""
    pair = f"{verdict['numerator']}/{verdict['denominator']} ({preset})"
    if verdict["status"] == "target not reached":
        below = ", ".join(f"{n} {a:.4f}" for n, a in verdict["below_target"].items())
        return (
            f"time ratio {pair}: target not reached (mean accuracy below "
            f"{verdict['target']:.4f}: {below}); no winner"
        )
    if verdict["status"] != "ratio":
        return f"time ratio {pair}: {verdict['status']}"
    ratio, ci = verdict["ratio"], verdict["ratio"]["ci"]
    span = "n/a (needs >= 2 runs each)" if ci is None else f"{ci[0]:.3f}..{ci[1]:.3f}"
    return (
        f"time ratio {pair}: {ratio['value']:.3f}, {100 * ratio['level']:.0f}% CI {span} "
        "(< 1: the numerator is faster)"
    )


def format_tables(doc: dict[str, Any], elapsed: float) -> str:
    """Every preset's table (or why it has none), the retired contenders, why it stopped."""
    parts = []
    for race in doc["races"].values():
        timed = any(fw["summary"] for fw in race["frameworks"].values())
        parts.append(format_table(race) if timed else f"{race['preset']}: no timed runs")
        for name, fw in race["frameworks"].items():
            if fw["error"]:
                parts.append(f"{race['preset']} {name}: {fw['error']['error']}")
    parts.append(f"stopped: {doc['stop_reason']}; {elapsed:.0f} s in all")
    return "\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> bool:
    """bench.png: accuracy vs time (per run, mean epoch curve) and vs epoch; False (nothing
    written) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_t, ax_e = fig.subplots(1, 2)
    for name, fw in doc["frameworks"].items():
        if fw.get("summary") is None:
            continue
        color = COLORS.get(name)
        times, accs = ([r[k] for r in fw["runs"]] for k in ("time_seconds", "accuracy"))
        ax_t.scatter(times, accs, color=color, label=f"{name}: final, one point per run", zorder=3)
        curve = [p for p in fw["summary"]["mean_curve"] if p["accuracy"] is not None]
        epochs, times, accs = ([p[k] for p in curve] for k in ("epoch", "time_seconds", "accuracy"))
        if curve and None not in times:
            ax_t.plot(
                times, accs, color=color, marker=".", alpha=0.6, label=f"{name}: mean epoch curve"
            )
        if curve:
            ax_e.plot(epochs, accs, color=color, marker="o", label=name)
    for ax in (ax_t, ax_e):
        ax.axhline(doc["target"], color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_ylabel(doc["accuracy_metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_xlabel("timed seconds (cumulative)")
    ax_t.set_title(f"{doc['preset']}: accuracy vs time")
    ax_e.set_xlabel("epoch")
    ax_e.xaxis.get_major_locator().set_params(integer=True)
    ax_e.set_title("mean accuracy per epoch (monitoring evaluations)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    report.atomic_write_bytes(path, buf.getvalue())
    return True
