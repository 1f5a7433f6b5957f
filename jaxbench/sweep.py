"""`python -m jaxbench.sweep`: a grid over config fields, seeds per cell, both frameworks.

    python -m jaxbench.sweep --config tiny --grid batch_size=100,200 lr=0.2,0.4 \\
        --seeds 2 --frameworks jax,torch --data-dir DIR --out runs/sweep
    python -m jaxbench.sweep ... --shard 0/2 --out runs/s0   # and 1/2 on another machine
    python -m jaxbench.sweep --merge runs/s0 runs/s1 --out runs/sweep

Every run is a preset (`--config`, changed for all runs by `--set FIELD=VALUE`) with one
grid cell and one seed applied, without monitoring evaluations unless `eval_every` is named.
Each finished run is a flushed line of `OUT/runs.jsonl`: the same command continues a killed
sweep. At the end (and on Ctrl-C; not before the first run) come `summary.json`, `table.md`
and, for a 1-D or 2-D grid, `lines.png` or `heatmap.png`. Values with commas (`widths`) are
separated by `;`. Exit codes: 0 done, 1 a worker failed, 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench import configs, report, stats
from jaxbench import sweep_workers as workers
from jaxbench.command import BAD_INPUT, Command, check_writable, run_command
from jaxbench.configs import PRESETS, Config, OneLineErrorParser, get_config, parse_field
from jaxbench.progress import progress_bar

RUNS = "runs.jsonl"
SPEC = "sweep.json"
SWEEP_FILES: tuple[str, ...] = (
    RUNS,
    SPEC,
    "summary.json",
    "table.md",
    "heatmap.png",
    "lines.png",
    workers.WORKERS_DIR,
)
FRAMEWORKS = ("jax", "torch")
MAX_SEEDS = 1000  # seeds per cell: more says nothing a thousand do not
MAX_SHARDS = 10_000  # --shard i/n: machines sharing one sweep
# Bad input exits 2: RuntimeError too, from a framework that is not installed.
ERRORS = {**BAD_INPUT, RuntimeError: 2}
Grid = dict[str, list[Any]]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: a framework, a grid cell (field -> value) and a seed."""

    framework: str
    cell: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def key(self) -> str:
        """The run's identity in runs.jsonl (canonical JSON)."""
        return json.dumps([self.framework, [[k, _jsonable(v)] for k, v in self.cell], self.seed])

    def config(self, base: Config) -> Config:
        return base.replace(**dict(self.cell), seed=self.seed, out=None, checkpoint_every=0)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parse_grid(items: Sequence[str]) -> Grid:
    """`["lr=0.2,0.4", "batch_size=256"]` -> {"lr": [0.2, 0.4], "batch_size": [256]}."""
    if not items:
        raise ValueError("--grid is empty; give at least one field=v1,v2,... (e.g. lr=0.2,0.4)")
    grid: Grid = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not text.strip():
            raise ValueError(f"--grid {item!r}: expected field=v1,v2,... (e.g. lr=0.2,0.4)")
        if name in grid:
            raise ValueError(f"--grid names {name} twice; give all its values in one item")
        if name in ("seed", "out", "checkpoint_every"):
            raise ValueError(f"--grid {name}: not a sweep field (seeds: --seeds N)")
        sep_char = ";" if ";" in text else ","
        parts = [v.strip() for v in text.split(sep_char)]
        if not all(parts):  # `lr=0.2,` or `lr=0.2,,0.4`: a value left out, not a value
            raise ValueError(
                f"--grid {item!r}: an empty value (a stray {sep_char!r}); "
                f"remove it or give the value (e.g. {name}=v1{sep_char}v2)"
            )
        values = [parse_field(name, v) for v in parts]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"--grid {name}: a value appears twice")
        grid[name] = values
    return grid


def _runs(grid: Grid, first: int, seeds: int, frameworks: Sequence[str]) -> list[RunSpec]:
    """Every run, cell by cell, seed by seed, frameworks interleaved."""
    return [
        RunSpec(fw, tuple(zip(grid, values, strict=True)), seed)
        for values in itertools.product(*grid.values())
        for seed in range(first, first + seeds)
        for fw in frameworks
    ]


def plan(base: Config, grid: Grid, seeds: int, frameworks: Sequence[str]) -> list[RunSpec]:
    """Every run (`_runs`), each cell validated."""
    specs = _runs(grid, base.seed, seeds, frameworks)
    for cell in dict.fromkeys(s.cell for s in specs):
        try:
            base.replace(**dict(cell))  # validates
        except ValueError as e:
            shown = " ".join(f"{k}={_shown(v)}" for k, v in cell)
            raise ValueError(f"grid cell {shown}: {e}") from None
    return specs


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def planned_keys(doc: dict[str, Any]) -> list[str]:
    """The keys of a sweep's whole plan (all shards) in `plan`'s order, from sweep.json."""
    return [s.key for s in _runs(doc["grid"], doc["base"]["seed"], doc["seeds"], doc["frameworks"])]


def shard(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Every `count`-th run from the `index`-th: shards are disjoint and cover the plan."""
    return list(specs[index::count])


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n <= MAX_SHARDS:
        raise ValueError(f"--shard {text}: need 0 <= i < n <= {MAX_SHARDS}")
    return i, n


def read_runs(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """The rows of a runs.jsonl. A last line cut short by a kill is not a run; `repair`
    removes it (only while no worker writes: else read under the writers' lock)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        with workers.locked(f.fileno(), exclusive=False) if not repair else nullcontext():
            raw = f.read()
    complete = raw[: raw.rfind(b"\n") + 1]
    if repair and len(complete) < len(raw):  # a write cut short: not a run
        report.atomic_write_bytes(path, complete)
    rows = []
    for n, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}: line {n} is not a run; remove it, then run again") from None
    return rows


def append_run(path: Path, row: dict[str, Any]) -> None:
    """One row in one write, flushed, under an exclusive lock (workers never interleave)."""
    line = (json.dumps(row, allow_nan=False, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with workers.locked(fd, exclusive=True):
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def run_row(spec: RunSpec, cfg: Config, summary: dict[str, Any] | None, status: str,
            detail: str | None, commit: str | None) -> dict[str, Any]:  # fmt: skip
    """What runs.jsonl keeps of one run."""
    summary = summary or {}
    final = summary.get("final", {})
    acc = final.get("ema_val_acc")
    return {
        "key": spec.key,
        "framework": spec.framework,
        "cell": {k: _jsonable(v) for k, v in spec.cell},
        "seed": spec.seed,
        "status": status,
        "detail": detail,
        "accuracy": _finite(acc if acc is not None else final.get("val_acc")),
        "val_acc": _finite(final.get("val_acc")),
        "time_seconds": _finite(summary.get("total_time_seconds")),
        "compile_seconds": _finite(summary.get("compile_seconds")),
        "commit": commit,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
        **{k: summary[k] for k in ("vmap_seeds", "program_seconds") if k in summary},
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (framework, cell): runs, how many finished, accuracy and time mean and spread."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["framework"], json.dumps(r["cell"], sort_keys=True)), []).append(r)
    out = []
    for (fw, cell), rs in groups.items():
        done = [r for r in rs if r["status"] == "done"]
        accs = [r["accuracy"] for r in done if r["accuracy"] is not None]
        times = [r["time_seconds"] for r in done if r["time_seconds"]]
        out.append(
            {
                "framework": fw,
                "cell": json.loads(cell),
                "runs": len(rs),
                "done": len(done),
                "accuracy": stats.mean_std(accs),
                "time_seconds": stats.mean_std(times),
            }
        )
    return out


def _pm(stat: dict[str, Any], scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def format_table(cells: Sequence[dict[str, Any]], grid: Grid) -> str:
    """Markdown, best accuracy first, then the faster."""
    ranked = sorted(
        cells,
        key=lambda c: (-(c["accuracy"]["mean"] or -1.0), c["time_seconds"]["mean"] or math.inf),
    )
    head = ["framework", *grid, "runs", "accuracy % (mean ± std)", "time s (mean ± std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in ranked:
        values = [_shown(tuple(v) if isinstance(v, list) else v) for v in
                  (c["cell"][name] for name in grid)]  # fmt: skip
        runs = f"{c['done']}/{c['runs']}"
        acc, secs = _pm(c["accuracy"], 100, 2), _pm(c["time_seconds"], 1, 1)
        lines.append("| " + " | ".join([c["framework"], *values, runs, acc, secs]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: Sequence[dict[str, Any]], spec: dict[str, Any]) -> list[Path]:
    """summary.json, table.md and the figure of the runs so far."""
    grid = spec["grid"]
    cells = aggregate(rows)
    summary = {
        "sweep": spec,
        "runs": len(rows),
        "planned": spec["planned"],
        "complete": len(rows) >= spec["planned"],
        "cells": cells,
    }
    report.write_json(out / "summary.json", summary)
    report.atomic_write_text(out / "table.md", format_table(cells, grid))
    figure = plot(out, cells, grid, spec["frameworks"])
    return [out / "summary.json", out / "table.md", *([figure] if figure is not None else [])]


def plot(out: Path, cells: Sequence[dict[str, Any]], grid: Grid, frameworks: Sequence[str]
         ) -> Path | None:  # fmt: skip
    """lines.png (1-D grid) or heatmap.png (2-D, a panel per framework and their difference)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(grid)
    if len(names) not in (1, 2):
        return None

    def mean(fw: str, cell: dict[str, Any]) -> tuple[float, ...]:
        acc = next((c["accuracy"] for c in cells if c["framework"] == fw and c["cell"] == cell), {})
        return tuple(math.nan if acc.get(k) is None else 100 * acc[k] for k in ("mean", "std"))

    as_json = [[_jsonable(v) for v in grid[n]] for n in names]
    if len(names) == 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        xs = range(len(as_json[0]))
        for fw in frameworks:
            m, s = zip(*(mean(fw, {names[0]: v}) for v in as_json[0]), strict=True)
            ax.errorbar(xs, m, yerr=s, capsize=4, label=fw, marker="o")
        ax.set_xticks(list(xs), [_shown(v) for v in grid[names[0]]])
        ax.set(xlabel=names[0], ylabel="test accuracy %")
        ax.legend()
        path = out / "lines.png"
    else:
        rows_v, cols_v = as_json
        panels = [(fw, fw) for fw in frameworks]
        if len(frameworks) == 2:
            panels.append((f"{frameworks[0]} - {frameworks[1]}", None))
        fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
        for i, (title, fw) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            m, s = np.full((2, len(rows_v), len(cols_v)), np.nan)  # means, spreads
            for (a, ra), (b, cb) in itertools.product(enumerate(rows_v), enumerate(cols_v)):
                cell = {names[0]: ra, names[1]: cb}
                if fw is not None:
                    m[a, b], s[a, b] = mean(fw, cell)
                else:
                    (m1, s1), (m2, s2) = mean(frameworks[0], cell), mean(frameworks[1], cell)
                    m[a, b], s[a, b] = m1 - m2, math.hypot(s1, s2)
            if fw is None:  # the difference: white at 0, symmetric
                lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
                im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            else:
                im = ax.imshow(m, cmap="viridis", aspect="auto")
            lo, hi = im.get_clim()
            fig.colorbar(im, ax=ax, shrink=0.8)
            for (a, b), v in np.ndenumerate(m):
                if math.isfinite(v):
                    spread = f"\n±{s[a, b]:.2f}" if math.isfinite(s[a, b]) else ""
                    bright = fw is None or (v - lo) > 0.6 * (hi - lo)
                    ax.text(b, a, f"{v:.2f}{spread}", ha="center", va="center", fontsize=8,
                            color="black" if bright else "white")  # fmt: skip
            ax.set_xticks(range(len(cols_v)), [_shown(v) for v in grid[names[1]]])
            ax.set_yticks(range(len(rows_v)), [_shown(v) for v in grid[names[0]]])
            ax.set(xlabel=names[1], ylabel=names[0], title=f"{title}: test acc %")
        path = out / "heatmap.png"
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def _plan_of(doc: dict[str, Any]) -> dict[str, Any]:
    """What two sweep.json of the same sweep share: all but the worker count and data folder."""
    base = {k: v for k, v in doc.get("base", {}).items() if k != "data_dir"}
    return {**{k: v for k, v in doc.items() if k != "workers"}, "base": base}


def _trainers(frameworks: Sequence[str], specs: Sequence[RunSpec], base: Config) -> dict[str, Any]:
    """Each framework's (train_and_evaluate, extra kwargs), having refused no cell."""
    from jaxbench.bench.frameworks import load_trainer

    out: dict[str, Any] = {}
    for fw in frameworks:
        train = load_trainer(fw)  # RuntimeError names the missing extra
        check = getattr(sys.modules[train.__module__], "check_supported", None)
        kwargs: dict[str, Any] = {}
        if fw == "jax":
            from jaxbench.programs import CompileCache

            kwargs["compile_cache"] = CompileCache()  # seeds share their programs
        for spec in specs:
            if spec.framework == fw and check is not None:
                check(spec.config(base))
        out[fw] = (train, kwargs)
    return out


def _data_for(base: Config) -> Callable[[Config], Any]:
    """The dataset, loaded once; each run takes its own subsets of it."""
    from jaxbench.data import load_dataset, take_subsets

    full = load_dataset(base.replace(subset=None, test_subset=None))
    return lambda cfg: take_subsets(full, cfg.subset, cfg.test_subset)


def batches(todo: Sequence[RunSpec], vmap_seeds: int) -> list[list[RunSpec]]:
    """The runs in order, JAX runs of one cell grouped up to `vmap_seeds` per program."""
    out: list[list[RunSpec]] = []
    open_group: dict[tuple[str, tuple[tuple[str, Any], ...]], list[RunSpec]] = {}
    for spec in todo:
        group = open_group.get(key := (spec.framework, spec.cell))
        if spec.framework != "jax" or group is None or len(group) >= vmap_seeds:
            group = open_group[key] = []
            out.append(group)
        group.append(spec)
    return out


def _train_group(
    group: list[RunSpec], base: Config, trainers: dict[str, Any], data: Callable[[Config], Any]
) -> list[tuple[dict[str, Any] | None, str, str | None]]:
    """(summary, status, detail) per run of `group`: one run, or seeds in one program."""
    cfg = group[0].config(base)
    try:
        if len(group) == 1:
            train, kwargs = trainers[group[0].framework]
            return [(train(cfg, None, data=data(cfg), progress=False, quiet=True, **kwargs),
                     "done", None)]  # fmt: skip
        from jaxbench.train import train_seeds

        res = train_seeds(cfg, [s.seed for s in group], data(cfg))
        per = res["total_time_seconds"] / len(group)
        return [
            ({**one, "total_time_seconds": per, "compile_seconds": res["compile_seconds"],
              "vmap_seeds": len(group), "program_seconds": res["total_time_seconds"]},
             "done", None)
            for one in res["seeds"]
        ]  # fmt: skip
    except FloatingPointError as e:
        return [(None, "diverged", str(e))] * len(group)
    except (ValueError, RuntimeError) as e:
        return [(None, "failed", f"{type(e).__name__}: {e}")] * len(group)


class Reporter:
    """The sweep's progress bar over all planned runs, or one line a run without it."""

    def __init__(self, done: int, planned: int, progress: bool, log: Callable[[str], None]):
        self.count, self.planned, self.log = done, planned, log
        self.bar = progress_bar(total=planned, initial=done, desc="sweep", unit="run",
                                disable=None if progress else True, file=sys.stderr)  # fmt: skip
        self.close = self.bar.close

    def row(self, row: dict[str, Any]) -> None:
        """Without the bar: `[3/36] jax batch_size=100 lr=0.4 seed=0: done, 63.10%, 39.9 s`."""
        self.bar.update(1)
        self.count += 1
        if self.bar.disable:
            acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
            secs = "-" if row["time_seconds"] is None else f"{row['time_seconds']:.1f} s"
            cell = " ".join(f"{k}={_shown(v)}" for k, v in row["cell"].items())
            self.log(f"[{self.count}/{self.planned}] {row['framework']} {cell} "
                     f"seed={row['seed']}: {row['status']}, {acc}, {secs}")  # fmt: skip


def _next_group(pending: list[list[RunSpec]], claims: workers.Claims | None,
                last: tuple[str, Any] | None) -> list[RunSpec]:  # fmt: skip
    """Pop the next group; a worker takes the runs it can claim, preferring its last program."""
    if claims is None:
        return pending.pop(0)
    while pending:
        group = pending.pop(workers.prefer_same_program(pending, last))
        if mine := [s for s in group if claims.claim(s.key)]:
            return mine
    return []


def run_sweep(out: Path, base: Config, todo: Sequence[RunSpec], trainers: dict[str, Any],
              data: Callable[[Config], Any], reporter: Reporter, vmap_seeds: int = 1,
              claims: workers.Claims | None = None, worker: dict[str, Any] | None = None,
              ) -> None:  # fmt: skip
    """Train `todo` into runs.jsonl; a worker (`claims`) trains only runs it claims."""
    commit = report.environment(()).get("git_commit")
    parent = os.getppid()
    pending = batches(todo, vmap_seeds)
    last = None
    try:
        while pending:
            if claims is not None and os.getppid() != parent:
                return  # orphaned: a rerun of the sweep will do the rest
            group = _next_group(pending, claims, last)
            if not group:
                break
            last = (group[0].framework, group[0].cell)
            for spec, (summary, status, detail) in zip(
                group, _train_group(group, base, trainers, data), strict=True
            ):
                row = run_row(spec, spec.config(base), summary, status, detail, commit)
                row.update(worker or {})
                append_run(out / RUNS, row)
                reporter.row(row)
    finally:
        reporter.close()


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(
        prog="python -m jaxbench.sweep",
        description="Train every cell of a grid over config fields, several seeds each, in "
        "one or both frameworks; resumable, shardable; writes runs.jsonl, summary.json, "
        "table.md and a heatmap.",
    )
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="base preset")
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="FIELD=V1,V2",
        help="config fields and their values (e.g. batch_size=256,512 lr=0.2,0.4)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="change the base preset for every run (e.g. subset=5000 epochs=2)",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help=f"seeds per cell, 1 to {MAX_SEEDS} (from the preset's)"
    )
    p.add_argument("--frameworks", default="jax", help="jax, torch or jax,torch")
    p.add_argument(
        "--vmap-seeds",
        type=int,
        default=1,
        metavar="K",
        help=f"train up to K (1 to {configs.MAX_VMAP_SEEDS}) seeds of a cell in one vmapped JAX "
        "program (time per run: the program's over K)",
    )
    p.add_argument("--data-dir", default=None, help="CIFAR folder (else $JAXBENCH_DATA_DIR)")
    p.add_argument("--out", default=None, help="the sweep folder, required (rerun to continue)")
    p.add_argument(
        "--shard", default="0/1", help=f"run only shard i of n (i/n, n up to {MAX_SHARDS})"
    )
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join these shard folders into --out")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N sweep processes side by side, each on its share of the CPU cores (and of "
        "CUDA_VISIBLE_DEVICES); per-run times are then a share's",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # i/N: set by --workers
    p.add_argument("--overwrite", action="store_true", help="start --out's sweep again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line a run)")
    return p


def merge(cmd: Command, out: Path, folders: Sequence[str], overwrite: bool) -> int:
    """Join shard folders of one sweep: their runs.jsonl rows, each run once."""
    specs = []
    for folder in folders:
        try:
            specs.append(json.loads((Path(folder) / SPEC).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"--merge {folder}: not a sweep folder ({e})") from None
    first = _plan_of({**specs[0], "shard": None, "planned": None})
    for folder, s in zip(folders, specs, strict=True):
        if _plan_of({**s, "shard": None, "planned": None}) != first:
            raise ValueError(f"--merge {folder}: a different sweep (grid, seeds or config differ)")
    cmd.prepare_out(out, SWEEP_FILES, overwrite=overwrite)
    rows: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for row in read_runs(Path(folder) / RUNS):
            rows.setdefault(row["key"], row)
    full = planned_keys(specs[0])
    order = {key: i for i, key in enumerate(full)}
    merged = sorted(rows.values(), key=lambda r: order.get(r["key"], len(order)))
    report.write_jsonl(out / RUNS, merged)
    doc = {**specs[0], "shard": "merged", "merged_from": [str(f) for f in folders],
           "planned": len(full)}  # fmt: skip
    report.write_json(out / SPEC, doc)
    write_outputs(out, merged, doc)
    print(f"merged {len(merged)} of {len(full)} runs from {len(folders)} folders into {out}")
    return 0


def sweep_plan(args: argparse.Namespace) -> tuple[Config, Grid, list[str], list[RunSpec]]:
    """(base config, grid, frameworks, this shard's runs) from the flags, checked."""
    base = get_config(args.config)
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (e.g. epochs=2)")
        name = name.strip().replace("-", "_")
        base = base.replace(**{name: parse_field(name, text.strip())})
    env_dir = os.environ.get("JAXBENCH_DATA_DIR") or None
    if (data_dir := env_dir if args.data_dir is None else args.data_dir) is not None:
        base = base.replace(data_dir=data_dir)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if not frameworks or any(f not in FRAMEWORKS for f in frameworks):
        raise ValueError(f"--frameworks {args.frameworks!r}: choose jax, torch or both")
    if not 1 <= args.seeds <= MAX_SEEDS or base.seed + args.seeds > configs.SEEDS:
        high = min(MAX_SEEDS, configs.SEEDS - base.seed)
        raise ValueError(
            f"--seeds must be in [1, {high}] seeds per cell (from seed {base.seed}), "
            f"got {args.seeds}"
        )
    if not 1 <= args.vmap_seeds <= configs.MAX_VMAP_SEEDS:
        raise ValueError(
            f"--vmap-seeds must be in [1, {configs.MAX_VMAP_SEEDS}] seeds per program, "
            f"got {args.vmap_seeds}"
        )
    if args.vmap_seeds > 1 and base.lookahead:
        raise ValueError("--vmap-seeds does not implement --lookahead; drop one")
    index, count = parse_shard(args.shard)
    grid = parse_grid(args.grid)
    named = {item.partition("=")[0].strip().replace("-", "_") for item in args.set}
    if "eval_every" not in named | set(grid):  # runs.jsonl keeps only the final accuracy
        # capped: an --epochs above the range is then named as such when its run is planned
        last = max([base.epochs, *grid.get("epochs", [])])
        base = base.replace(eval_every=min(last, configs.MAX_EPOCHS))
    return base, grid, frameworks, shard(plan(base, grid, args.seeds, frameworks), index, count)


def _worker_main(cmd: Command, args: argparse.Namespace) -> int:
    """One worker of `--workers N`: trains the runs it can claim (the parent summarises)."""
    cpus = workers.enter_worker()  # before JAX or PyTorch start
    out = Path(args.out)
    index, count = parse_shard(args.worker)
    claims = workers.Claims(out / workers.WORKERS_DIR / "claims")
    if not claims.folder.is_dir() or not (out / SPEC).is_file():
        raise ValueError(f"--worker: {out} is not a sweep started with --workers")
    base, _, frameworks, mine = sweep_plan(args)
    finished = {r["key"] for r in read_runs(out / RUNS, repair=False)}
    todo = [s for s in mine if s.key not in finished]
    trainers = _trainers(frameworks, todo, base)
    data = _data_for(base)
    cmd.on_stop = lambda word: f"{word}: worker {index}/{count} stopped; its runs are in {out}"
    print(f"worker {index}/{count} on CPU cores {cpus}: {len(todo)} runs to share", flush=True)
    reporter = Reporter(len(mine) - len(todo), len(mine), False, lambda m: print(m, flush=True))
    mark = {"worker": f"{index}/{count}", "cpus": len(cpus)}
    run_sweep(out, base, todo, trainers, data, reporter, vmap_seeds=args.vmap_seeds,
              claims=claims, worker=mark)  # fmt: skip
    return 0


def _prepare(cmd: Command, out: Path, spec: dict[str, Any], overwrite: bool) -> None:
    """--out: a new folder, or this same sweep stopped part-way (continued where it ended)."""
    if (out / SPEC).is_file() and not overwrite:
        try:
            old = json.loads((out / SPEC).read_text())
        except ValueError as e:
            raise ValueError(f"--out {out}: its {SPEC} is unreadable ({e})") from None
        if _plan_of(old) != _plan_of(spec):
            raise ValueError(
                f"--out {out} holds a different sweep; rerun its own command to "
                "continue it, choose another folder, or pass --overwrite"
            )
        check_writable(out, "--out")
    else:
        cmd.prepare_out(out, SWEEP_FILES, overwrite=overwrite)


def stopped(out: Path, word: str, before: set[str], old_spec: bytes | None) -> str:
    """Ctrl-C after sweep.json: the finished runs' summary, or with none the folder as it was."""
    rows = read_runs(out / RUNS)
    if not rows:
        for name in sorted(set(os.listdir(out)) - before):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if old_spec is not None and (out / SPEC).read_bytes() != old_spec:
            report.atomic_write_bytes(out / SPEC, old_spec)
        return f"{word} before the first run; nothing written to {out}"
    write_outputs(out, rows, json.loads((out / SPEC).read_text()))
    return (
        f"{word} after {len(rows)} runs; they are in {out / RUNS}, "
        "and the same command continues the sweep"
    )


def _main(cmd: Command, argv: list[str]) -> int:
    """Check flags, --out, trainers and data before sweep.json, then train what is left."""
    args = build_parser().parse_args(argv)
    if args.out is None:
        raise ValueError("--out DIR is required: the folder that keeps the sweep's runs")
    if args.worker is not None:
        return _worker_main(cmd, args)
    out = Path(args.out)
    if args.merge:
        if args.workers != 1:
            raise ValueError("--workers runs a sweep; --merge only joins folders")
        return merge(cmd, out, args.merge, args.overwrite)
    workers.check_workers(args.workers)
    base, grid, frameworks, mine = sweep_plan(args)
    spec = {
        "config": base.name,
        "base": base.to_dict(),
        "grid": {k: [_jsonable(v) for v in vs] for k, vs in grid.items()},
        "seeds": args.seeds,
        "frameworks": frameworks,
        "shard": args.shard,
        "planned": len(mine),
        "workers": args.workers,
    }
    _prepare(cmd, out, spec, args.overwrite)
    finished = {r["key"] for r in read_runs(out / RUNS)}
    todo = [s for s in mine if s.key not in finished]
    trainers = _trainers(frameworks, todo, base)
    # With --workers each worker loads its own copy: this one only proves the data is there.
    data = _data_for(base) if todo else None
    if args.workers > 1:
        data = None
    before = set(os.listdir(out))
    old_spec = (out / SPEC).read_bytes() if (out / SPEC).is_file() else None
    report.write_json(out / SPEC, spec)
    cmd.on_stop = lambda word: stopped(out, word, before, old_spec)
    print(
        f"sweep {args.config}: {len(mine)} runs in shard {args.shard} "
        f"({len(mine) - len(todo)} done before), {len(grid)}-D grid, "
        f"{args.seeds} seed(s), {', '.join(frameworks)} -> {out}",
        flush=True,
    )
    status = 0
    if todo:
        reporter = Reporter(len(mine) - len(todo), len(mine), not args.no_progress, print)
        if args.workers > 1:
            try:
                poll = functools.partial(read_runs, out / RUNS, repair=False)
                failed = workers.run_workers(out, argv, args.workers, poll, reporter.row)
            finally:
                reporter.close()
            for line in failed:
                print(f"error: {line}", file=sys.stderr)
            status = 1 if failed else 0
        else:
            assert data is not None
            run_sweep(out, base, todo, trainers, data, reporter, vmap_seeds=args.vmap_seeds)
    rows = read_runs(out / RUNS)
    written = write_outputs(out, rows, spec)
    print(format_table(aggregate(rows), grid), end="")
    print(f"wrote {', '.join(str(p) for p in [out / RUNS, *written])}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxbench.sweep`; exit codes in the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda cmd: _main(cmd, args), errors=ERRORS)


if __name__ == "__main__":
    sys.exit(main())
