"""Everything one short GPU visit measures, in one command: `python -m jaxbench.gpu_visit`.

A lent GPU comes for minutes, one command of at most 10 minutes at a time, so
this script does the whole visit inside a wall-clock budget and writes its
results as it goes (atomically: a kill still leaves valid JSON):

1. the environment: versions, `nvidia-smi -L`, XLA / TF32 settings;
2. for each preset (default `resnet9`, then `speedrun`): the `jaxbench.bench`
   race, JAX against PyTorch, one warm-up each, then *rounds* of one timed run
   per framework (same seed, alternating which goes first) for as long as the
   budget allows, so both frameworks always have the same number of runs;
   `bench-<preset>.json` (bench.json's schema) and `bench-<preset>.png`;
3. right after the first preset: JAX's loop choice on this device, a few epochs
   with `loop=scan` and with `loop=step` (the CPU showed scan ~30x slower; on a
   GPU it should win, but this measures it);
4. `visit.json`: what ran, what was skipped and why, the budget used, the table.

Budget: before each round the script predicts its cost from the walls already
seen (the warm-up first, then the slowest timed run), times a safety factor,
and starts it only if it fits beside the time reserved for what must still run
(the loop check, the minimum of later presets). Later presets are skipped with
a reason when they no longer fit. A SIGALRM watchdog at the end of the budget
interrupts a run that overruns its prediction. JAX's persistent compilation
cache (a fresh temporary folder) lets timed runs reuse the warm-up's compiled
programs; the warm-up's cold compile is still what `compile` reports.

Robustness: a phase that fails is recorded (error and traceback tail) and the
visit goes on; a framework that cannot start, or that would run on the CPU
beside a GPU, is dropped with a reason rather than eating the budget.

Files in --out: visit.json plus bench-<preset>.json/.png per preset raced
(5 for the default presets; the device returns at most 8).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxbench import bench, configs, report

SCHEMA_VERSION = 1
DEFAULT_BUDGET_S = 540.0  # the device's 10-minute command limit, less unpacking and slack
DEFAULT_PRESETS = ("resnet9", "speedrun")
WARMUP_SEED = 1000  # never a timed seed (timed seeds are 0, 1, ... one per round)
SAFETY = 1.25  # predicted cost x this must fit (runs vary; compile caches may miss)
SLACK_S = 5.0  # plus this much, for writing files and the plot
FIRST_MIN_ROUNDS = 2  # the first preset's rounds before time is kept for later presets
LATER_MIN_ROUNDS = 2  # time kept for later presets: their warm-ups + this many rounds
LOOP_CHOICES = ("scan", "step")
ENV_VARS = (
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "JAX_COMPILATION_CACHE_DIR",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
)


def _log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {message}", flush=True)


# --- budget and scheduling (pure; unit-tested with a fake clock) -----------------------------


@dataclass
class Budget:
    """Seconds allowed from `start` on `clock`; the clock is injectable for tests."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=math.nan)

    def __post_init__(self) -> None:
        if math.isnan(self.start):
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


def fits(remaining: float, estimate: float, reserve: float = 0.0) -> bool:
    """Whether work predicted to take `estimate` s may start with `remaining` s left.

    `reserve` is kept for work that must still run afterwards; the estimate is
    inflated by SAFETY and SLACK_S so one slow run does not overrun the budget.
    """
    return remaining - reserve >= estimate * SAFETY + SLACK_S


def run_rounds(
    frameworks: Sequence[str],
    estimates: dict[str, float],
    budget: Budget,
    run_one: Callable[[str, int], None],
    *,
    max_rounds: int | None = None,
    reserve: float = 0.0,
    start: int = 0,
) -> tuple[int, str]:
    """Timed rounds (one run per framework, seed = round index) while the next round fits.

    `estimates`: each framework's predicted wall per run (its warm-up at first);
    after a round, the slowest timed run seen in this call replaces it. The order
    alternates each round so drift over the visit (clocks, heat) hits both
    frameworks alike. `start` continues an earlier call's rounds (seeds, order);
    `max_rounds` counts them too. Returns (rounds completed in all, why it stopped).
    """
    est = {fw: float(estimates[fw]) for fw in frameworks}
    seen: dict[str, list[float]] = {fw: [] for fw in frameworks}
    rounds = start
    while True:
        if max_rounds is not None and rounds >= max_rounds:
            return rounds, f"reached --runs {max_rounds}"
        cost = sum(est.values())
        if not fits(budget.remaining(), cost, reserve):
            return rounds, (
                f"budget: next round predicted {cost:.1f} s (x{SAFETY} + {SLACK_S:.0f} s), "
                f"{budget.remaining():.1f} s left, {reserve:.1f} s reserved for later phases"
            )
        order = list(frameworks) if rounds % 2 == 0 else list(reversed(frameworks))
        for fw in order:
            t0 = budget.clock()
            run_one(fw, rounds)
            seen[fw].append(budget.clock() - t0)
            est[fw] = max(seen[fw])
        rounds += 1


def epoch_seconds(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Training seconds of each epoch but the last (whose time includes the final evaluation).

    The trainers report cumulative timed seconds per epoch; monitoring
    evaluations are off the clock, so differences are pure training epochs.
    """
    cumulative = [float(r["total_time_seconds"]) for r in rows[:-1]]
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def card_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', for results/<card>/; 'cpu' without a GPU."""
    if not name or name.lower() == "cpu":
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    if m:
        return m.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


class BudgetExceeded(Exception):
    """Raised inside a trainer call when the visit's wall-clock budget runs out."""


class Watchdog:
    """A SIGALRM at the end of the budget that interrupts a trainer call, and nothing else.

    The schedule predicts costs and should end in time on its own; this is the
    backstop for a run far slower than predicted. Outside `guard()` the alarm
    only marks the budget spent, so writing results is never interrupted.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.expired = False
        self.active = False

    def arm(self) -> bool:
        if not hasattr(signal, "setitimer"):
            return False
        signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.budget.remaining(), 0.001))
        return True

    def disarm(self) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0.0)

    def _fire(self, signum: int, frame: Any) -> None:
        self.expired = True
        if self.active:
            self.active = False
            raise BudgetExceeded(f"the {self.budget.seconds:.0f} s budget ran out during a run")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.expired:
            raise BudgetExceeded(f"the {self.budget.seconds:.0f} s budget is spent")
        self.active = True
        try:
            yield
        finally:
            self.active = False


# --- environment ------------------------------------------------------------------------------


def nvidia_smi() -> dict[str, Any]:
    """`nvidia-smi -L` and a read-only query of clocks and limits (never changes settings)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    query = "name,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
    for key, args in (
        ("list", ["-L"]),
        ("query", [f"--query-gpu={query}", "--format=csv"]),
    ):
        try:
            res = subprocess.run([smi, *args], capture_output=True, text=True, timeout=20)
            out[key] = (res.stdout or res.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            out[key] = f"failed: {e}"
    return out


def numeric_settings() -> dict[str, Any]:
    """Environment variables, JAX config and PyTorch TF32 flags that change the numbers."""
    out: dict[str, Any] = {"env": {k: os.environ.get(k) for k in ENV_VARS}}
    if "jax" in sys.modules:
        import jax

        out["jax"] = {
            k: getattr(jax.config, k, None)
            for k in (
                "jax_default_matmul_precision",
                "jax_enable_x64",
                "jax_compilation_cache_dir",
                "jax_persistent_cache_min_compile_time_secs",
            )
        }
    if "torch" in sys.modules:
        import torch

        t: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
        with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of
            warnings.simplefilter("ignore")  # fp32_precision; record whichever exists
            for name, obj in (("cuda_matmul", torch.backends.cuda.matmul), ("cudnn", None)):
                obj = obj if obj is not None else torch.backends.cudnn
                for attr in ("allow_tf32", "fp32_precision"):
                    try:
                        t[f"{name}.{attr}"] = getattr(obj, attr)
                    except (AttributeError, RuntimeError):
                        pass
        t["cudnn.benchmark"] = torch.backends.cudnn.benchmark
        t["cudnn.deterministic"] = torch.backends.cudnn.deterministic
        out["torch"] = {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in t.items()}
    return out


def enable_jax_cache(folder: Path) -> dict[str, Any]:
    """JAX's persistent compilation cache in `folder`, for every program however fast to build.

    Each trainer call compiles afresh; with the cache, timed runs load the
    warm-up's executables (same HLO, same autotuned kernels) instead of
    recompiling, so more rounds fit. Failure only costs time, so it is recorded.
    """
    import jax

    done: dict[str, Any] = {"dir": str(folder)}
    for key, value in (
        ("jax_compilation_cache_dir", str(folder)),
        ("jax_persistent_cache_min_compile_time_secs", 0.0),
        ("jax_persistent_cache_min_entry_size_bytes", 0),
    ):
        try:
            jax.config.update(key, value)
            done[key] = value
        except (AttributeError, KeyError, ValueError) as e:
            done[key] = f"not set: {e}"
    return done


# --- options ----------------------------------------------------------------------------------


_Parser = configs.OneLineErrorParser


@dataclass(frozen=True)
class VisitOptions:
    configs: tuple[configs.Config, ...]  # one per preset, overrides applied
    out: Path
    budget_seconds: float
    runs: int | None
    frameworks: tuple[str, ...]
    target: float
    stream: str
    torch_compile: bool | None
    loop_epochs: int
    loop_check: bool
    jax_cache: bool


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m jaxbench.gpu_visit",
        description="One GPU visit: environment, JAX-vs-PyTorch races per preset, JAX loop "
        "choice, all within --budget-seconds; results to --out.",
        allow_abbrev=False,
    )
    p.add_argument("--out", required=True, help="folder for visit.json and bench-*.json/png")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"wall-clock budget of the whole visit (default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--presets",
        default=",".join(DEFAULT_PRESETS),
        help="comma list of presets to race, in order (the first also gets the loop check)",
    )
    p.add_argument(
        "--runs", type=int, default=None, help="at most N timed runs per framework and preset"
    )
    p.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    p.add_argument("--target", type=float, default=0.94, help="accuracy target in (0, 1]")
    p.add_argument("--stream", default="fast", choices=("fast", "shared"), help="batch stream")
    p.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the PyTorch model (default: the trainer's choice)",
    )
    p.add_argument(
        "--loop-epochs",
        type=int,
        default=3,
        help="epochs per loop-check run (>= 2; all but the last are timed as pure epochs)",
    )
    p.add_argument(
        "--loop-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure JAX's loop=scan against loop=step",
    )
    p.add_argument(
        "--jax-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="JAX persistent compilation cache in a fresh temporary folder",
    )
    # Every Config field (--data-dir, --widths, --subset, ...) overrides every preset.
    configs.add_config_args(p, skip=("name", "out", "seed"))
    p.set_defaults(config=None)
    return p


def parse_args(argv: Sequence[str] | None = None) -> VisitOptions:
    """Flags -> VisitOptions; any bad value exits 2 with one line naming the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.error("--config is not used here; list presets with --presets resnet9,speedrun")
    if not getattr(args, "data_dir", None):
        parser.error("--data-dir is required: the folder that holds cifar-10-batches-bin/")
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder; unpack CIFAR-10 there first")
    if not args.budget_seconds > 0:
        parser.error(f"--budget-seconds must be positive, got {args.budget_seconds}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target is an accuracy in (0, 1], e.g. 0.94; got {args.target}")
    if args.loop_epochs < 2:
        parser.error("--loop-epochs must be at least 2 (the last epoch includes the evaluation)")
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    if not frameworks or any(f not in bench.FRAMEWORKS for f in frameworks):
        parser.error(f"--frameworks takes a comma list of {', '.join(bench.FRAMEWORKS)}")
    if len(set(frameworks)) != len(frameworks):
        parser.error(f"--frameworks lists a framework twice: {args.frameworks}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets or len(set(presets)) != len(presets):
        parser.error(f"--presets takes distinct preset names, got {args.presets!r}")
    cfgs = []
    for name in presets:
        if name not in configs.PRESETS:
            parser.error(
                f"unknown preset {name!r} in --presets; choose from {sorted(configs.PRESETS)}"
            )
        try:
            cfgs.append(
                configs.config_from_args(argparse.Namespace(**{**vars(args), "config": name}))
            )
        except ValueError as e:
            parser.error(f"preset {name}: {e}")
    return VisitOptions(
        configs=tuple(cfgs),
        out=Path(args.out),
        budget_seconds=args.budget_seconds,
        runs=args.runs,
        frameworks=frameworks,
        target=args.target,
        stream=args.stream,
        torch_compile=args.torch_compile,
        loop_epochs=args.loop_epochs,
        loop_check=args.loop_check and "jax" in frameworks,
        jax_cache=args.jax_cache,
    )


# --- the visit --------------------------------------------------------------------------------


def _error(e: BaseException) -> dict[str, Any]:
    tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
    return {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback_tail": "".join(tail)}


class Visit:
    """The visit's state: budget, output folder, visit.json, and the phases run so far."""

    def __init__(self, opts: VisitOptions, command: str, budget: Budget) -> None:
        self.opts = opts
        self.budget = budget
        self.trainers: dict[str, bench.Trainer] = {}
        self.frameworks: list[str] = list(opts.frameworks)  # less any that fail to start
        self.watchdog: Watchdog | None = None
        self.walls: dict[str, dict[str, float]] = {}  # first preset's warm-up/run walls
        self.doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "complete": False,
            "command": command,
            "started": report.now_iso(),
            "finished": None,
            "budget_seconds": opts.budget_seconds,
            "elapsed_seconds": 0.0,
            "presets": [c.name for c in opts.configs],
            "frameworks": list(opts.frameworks),
            "dropped_frameworks": {},
            "environment": None,
            "card": None,
            "card_slug": None,
            "phases": {},
            "skipped": [],
            "files": [],
            "table": None,
        }

    # -- files
    def save(self) -> None:
        self.doc["elapsed_seconds"] = round(self.budget.elapsed(), 2)
        report.write_json(self.opts.out / "visit.json", self.doc)

    def wrote(self, name: str) -> None:
        if name not in self.doc["files"]:
            self.doc["files"].append(name)

    def skip(self, phase: str, reason: str) -> None:
        self.doc["phases"][phase] = {"status": "skipped", "reason": reason}
        self.doc["skipped"].append({"phase": phase, "reason": reason})
        _log(self.budget, f"{phase}: skipped: {reason}")

    # -- phase 1
    def drop(self, framework: str, reason: str) -> None:
        """Race without `framework` from now on (it cannot start, or not on the GPU)."""
        if framework in self.frameworks:
            self.frameworks.remove(framework)
            self.doc["dropped_frameworks"][framework] = reason
            _log(self.budget, f"{framework}: dropped: {reason}")

    def record_environment(self, jax_cache: dict[str, Any] | None) -> None:
        """Versions and settings; a framework that cannot start, or would run on the CPU
        beside a GPU (a full preset there would eat the whole budget), is dropped."""
        env = report.environment(())
        for fw in list(self.frameworks):
            try:
                env.update({k: v for k, v in report.environment((fw,)).items() if k not in env})
            except Exception as e:
                self.drop(fw, f"cannot start: {type(e).__name__}: {e}")
        env["nvidia_smi"] = nvidia_smi()
        jax_gpu = env.get("jax_backend") in ("gpu", "cuda", "rocm")
        torch_gpu = env.get("torch_device") not in (None, "cpu")
        if env["nvidia_smi"]["available"] or jax_gpu or torch_gpu:
            if not jax_gpu:
                self.drop("jax", f"no GPU backend (jax_backend={env.get('jax_backend')})")
            if not torch_gpu:
                self.drop("torch", "torch.cuda.is_available() is False")
        env["settings_start"] = numeric_settings()
        env["jax_persistent_cache"] = jax_cache
        self.doc["environment"] = env
        card = env.get("torch_device") if env.get("torch_device") not in (None, "cpu") else None
        card = card or (env.get("jax_device") if jax_gpu else None)
        self.doc["card"] = card or "cpu"
        self.doc["card_slug"] = card_slug(card)
        self.wrote("visit.json")
        self.save()
        _log(
            self.budget,
            f"environment: card {self.doc['card']}, jax {env.get('jax')}, "
            f"torch {env.get('torch')}, driver {env.get('gpu_driver')}",
        )

    def trainer(self, framework: str) -> bench.Trainer:
        if framework not in self.trainers:
            self.trainers[framework] = bench.load_trainer(framework)
        return self.trainers[framework]

    def refusal(self, cfg: configs.Config) -> str | None:
        """Why a trainer refuses `cfg` (its `check_supported`), or None if all take it."""
        for fw in self.frameworks:
            try:
                module = sys.modules[self.trainer(fw).__module__]
                check = getattr(module, "check_supported", None)
                if check is not None:
                    check(cfg)
            except (RuntimeError, ValueError) as e:
                return f"{fw}: {e}"
        return None

    def _call(self, framework: str, cfg: configs.Config, data: Any) -> dict[str, Any]:
        """One trainer run as `bench.run_framework` makes it (no files, quiet)."""
        kwargs: dict[str, Any] = {
            "data": data,
            "stream": self.opts.stream,
            "progress": False,
            "quiet": True,
        }
        if framework == "torch":
            kwargs["compile"] = self.opts.torch_compile
        train = self.trainer(framework)
        if self.watchdog is None:
            return train(cfg.replace(out=None), None, **kwargs)
        with self.watchdog.guard():
            return train(cfg.replace(out=None), None, **kwargs)

    # -- phase 2/3: one preset's race
    def race(self, cfg: configs.Config, data: Any, reserve: float, first: bool) -> None:
        from jaxbench.data import take_subsets

        phase = f"bench-{cfg.name}"
        b = self.budget
        if not self.frameworks:
            self.skip(phase, f"no framework left to race: {self.doc['dropped_frameworks']}")
            return
        refused = self.refusal(cfg)
        if refused:
            self.skip(phase, f"refused by the trainer: {refused}")
            return
        if not first:
            est = self.preset_min_cost(rounds=1)
            if not fits(b.remaining(), est, reserve):
                self.skip(
                    phase,
                    f"budget: warm-ups + 1 round predicted {est:.0f} s, {b.remaining():.0f} s left",
                )
                return
        fws = tuple(self.frameworks)
        pdata = take_subsets(data, cfg.subset, cfg.test_subset)
        opts = bench.Options(
            cfg, fws, 0, self.opts.target, self.opts.out, self.opts.stream, self.opts.torch_compile
        )
        doc = bench._new_doc(opts, pdata, self.doc["command"])  # bench.json's schema
        doc["seeds"] = []
        doc["visit"] = {
            "interleaved": "rounds of one run per framework, order alternating each round",
            "warmup_seed": WARMUP_SEED,
            "order": [],
            "warmup_wall_seconds": {},
            "run_wall_seconds": {fw: [] for fw in fws},
            "stop_reason": None,
        }
        json_name, png_name = f"{phase}.json", f"{phase}.png"
        json_path = self.opts.out / json_name
        phase_rec: dict[str, Any] = {"status": "running", "file": json_name}
        self.doc["phases"][phase] = phase_rec
        n_train, n_test = doc["n_train"], doc["n_test"]
        t_phase = b.elapsed()
        try:
            for fw in fws:
                doc["frameworks"][fw] = {"warmup": None, "runs": [], "trainer": {}, "summary": None}
            report.write_json(json_path, doc)
            self.wrote(json_name)
            for fw in fws:
                t0 = b.elapsed()
                summary = self._call(fw, cfg.replace(seed=WARMUP_SEED), pdata)
                wall = b.elapsed() - t0
                rec = bench.run_record(summary, cfg, n_train, n_test)
                entry = doc["frameworks"][fw]
                entry["warmup"] = rec
                entry["trainer"] = {k: summary[k] for k in bench.TRAINER_INFO_KEYS if k in summary}
                doc["visit"]["warmup_wall_seconds"][fw] = wall
                report.write_json(json_path, doc)
                _log(
                    b,
                    f"{phase} {fw:<5} warm-up: acc {rec['accuracy']:.4f} time "
                    f"{rec['time_seconds']:.2f} s compile {rec['compile_seconds'] or 0:.1f} s "
                    f"wall {wall:.1f} s",
                )
            warm = dict(doc["visit"]["warmup_wall_seconds"])
            if first:
                self.walls = {"warmup": warm, "run": warm}
                reserve += self.loop_cost() * SAFETY

            def run_one(fw: str, seed: int) -> None:
                t0 = b.elapsed()
                summary = self._call(fw, cfg.replace(seed=seed), pdata)
                wall = b.elapsed() - t0
                rec = bench.run_record(summary, cfg, n_train, n_test)
                doc["frameworks"][fw]["runs"].append(rec)
                doc["visit"]["run_wall_seconds"][fw].append(wall)
                doc["visit"]["order"].append(fw)
                if seed not in doc["seeds"]:
                    doc["seeds"].append(seed)
                doc["runs_per_framework"] = min(len(doc["frameworks"][f]["runs"]) for f in fws)
                report.write_json(json_path, doc)
                _log(
                    b,
                    f"{phase} {fw:<5} seed {seed}: acc {rec['accuracy']:.4f} time "
                    f"{rec['time_seconds']:.2f} s wall {wall:.1f} s",
                )

            cap = self.opts.runs
            if first:
                # The first preset is the visit's point: its first rounds need only the loop
                # check's reserve; then the timed walls, not the cold warm-ups, size what the
                # later presets need, and that is reserved for the rounds after.
                head = FIRST_MIN_ROUNDS if cap is None else min(cap, FIRST_MIN_ROUNDS)
                rounds, why = run_rounds(fws, warm, b, run_one, max_rounds=head, reserve=reserve)
                if rounds:
                    walls = doc["visit"]["run_wall_seconds"]
                    self.walls["run"] = {fw: max(walls[fw]) for fw in fws}
                if rounds == head and (cap is None or rounds < cap):
                    reserve += self.reserve_after_first()
                    rounds, why = run_rounds(
                        fws,
                        self.walls["run"],
                        b,
                        run_one,
                        max_rounds=cap,
                        reserve=reserve,
                        start=rounds,
                    )
            else:
                rounds, why = run_rounds(fws, warm, b, run_one, max_rounds=cap, reserve=reserve)
            doc["visit"]["stop_reason"] = why
            phase_rec.update(status="done", rounds=rounds, stop_reason=why)
            _log(b, f"{phase}: {rounds} round(s); stopped: {why}")
        except Exception as e:  # one failure must not cost the rest of the visit
            phase_rec.update(_error(e))
            doc["visit"]["stop_reason"] = phase_rec["error"]
            _log(b, f"{phase}: error: {phase_rec['error']}")
        self.finish_race(cfg, doc, phase_rec, json_path, png_name)
        phase_rec["wall_seconds"] = round(b.elapsed() - t_phase, 2)
        self.save()

    def finish_race(
        self,
        cfg: configs.Config,
        doc: dict[str, Any],
        phase_rec: dict[str, Any],
        json_path: Path,
        png_name: str,
    ) -> None:
        """Statistics, ratio, table and plot from whatever runs finished."""
        fws = list(doc["frameworks"])
        counts = {fw: len(doc["frameworks"][fw]["runs"]) for fw in fws}
        phase_rec["runs"] = counts
        for fw in fws:
            entry = doc["frameworks"][fw]
            if entry["runs"]:
                entry["summary"] = bench.summarize(
                    entry["runs"], entry["warmup"], cfg, doc["target"]
                )
        if all(counts.get(fw) for fw in bench.FRAMEWORKS):
            times = {fw: [r["time_seconds"] for r in doc["frameworks"][fw]["runs"]] for fw in fws}
            try:
                ratio = bench.ratio_ci(times["jax"], times["torch"])
            except ImportError:  # scipy missing: keep the ratio, lose the interval
                ratio = {
                    "value": statistics.mean(times["jax"]) / statistics.mean(times["torch"]),
                    "level": bench.CI_LEVEL,
                    "ci": None,
                    "se_log": None,
                    "df": None,
                }
            doc["ratio"] = {
                "numerator": "jax",
                "denominator": "torch",
                **ratio,
                "method": bench.RATIO_METHOD,
            }
        doc["complete"] = phase_rec.get("status") == "done"
        report.write_json(json_path, doc)
        if fws and all(counts.values()):
            phase_rec["table"] = bench.format_table(doc)
            phase_rec["headline"] = {
                fw: {
                    "n": doc["frameworks"][fw]["summary"]["runs"],
                    "accuracy": doc["frameworks"][fw]["summary"]["accuracy"],
                    "time_seconds": doc["frameworks"][fw]["summary"]["time_seconds"],
                }
                for fw in fws
            }
            phase_rec["ratio"] = doc["ratio"]
            try:
                if bench.plot(doc, self.opts.out / png_name):
                    phase_rec["png"] = png_name
                    self.wrote(png_name)
            except Exception as e:  # a plot is not worth losing the visit's JSON over
                phase_rec["png_error"] = f"{type(e).__name__}: {e}"
        else:
            phase_rec["table"] = f"{cfg.name}: no timed runs (runs per framework: {counts})"

    # -- budget estimates from the first preset
    def preset_min_cost(self, rounds: int = LATER_MIN_ROUNDS) -> float:
        """Seconds for another preset: warm-ups + `rounds` rounds, at the first preset's walls."""
        if not self.walls:
            return 0.0
        warm = sum(self.walls["warmup"].values())
        return warm + rounds * sum(self.walls["run"].values())

    def loop_cost(self) -> float:
        """Predicted seconds of the loop check: two JAX runs, each at most a JAX warm-up."""
        if not self.opts.loop_check or "jax" not in self.frameworks:
            return 0.0
        return 2.0 * self.walls.get("warmup", {}).get("jax", 0.0)

    def reserve_after_first(self) -> float:
        """Time the first preset's later rounds leave for the later presets."""
        later = len(self.opts.configs) - 1
        return later * (self.preset_min_cost() * SAFETY + SLACK_S)

    # -- phase 4
    def loop_check(self, cfg: configs.Config, data: Any, reserve: float) -> None:
        """One short JAX run per loop kind; the steady epoch time decides which is faster."""
        from jaxbench.data import take_subsets

        phase = "loop-check"
        b = self.budget
        est = self.loop_cost()
        if not fits(b.remaining(), est, reserve):
            self.skip(phase, f"budget: predicted {est:.0f} s, {b.remaining():.0f} s left")
            return
        n = self.opts.loop_epochs
        base = cfg.replace(epochs=n, lr_peak_epoch=min(cfg.lr_peak_epoch, n), seed=0)
        pdata = take_subsets(data, base.subset, base.test_subset)
        rec: dict[str, Any] = {"status": "running", "preset": cfg.name, "epochs": n, "loops": {}}
        self.doc["phases"][phase] = rec
        t_phase = b.elapsed()
        try:
            for i, loop in enumerate(LOOP_CHOICES):
                if i and not fits(b.remaining(), est / 2, reserve):
                    raise TimeoutError(f"no budget left for loop={loop}")
                t0 = b.elapsed()
                s = self._call("jax", base.replace(loop=loop), pdata)
                per_epoch = epoch_seconds(s["epochs"])
                steady = per_epoch[1:] or per_epoch
                rec["loops"][loop] = {
                    "loop_reported": s.get("loop"),
                    "epoch_seconds": per_epoch,
                    "steady_epoch_seconds": statistics.median(steady),
                    "compile_seconds": s.get("compile_seconds"),
                    "total_time_seconds": s.get("total_time_seconds"),
                    "accuracy": s["final"].get(bench.headline_metric(base)),
                    "wall_seconds": b.elapsed() - t0,
                }
                self.save()
                _log(
                    b,
                    f"{phase} loop={loop}: {rec['loops'][loop]['steady_epoch_seconds']:.3f} "
                    f"s/epoch, compile {s.get('compile_seconds') or 0:.1f} s",
                )
            scan, step = (rec["loops"][k]["steady_epoch_seconds"] for k in LOOP_CHOICES)
            rec.update(
                status="done",
                scan_over_step=scan / step if step > 0 else None,
                faster="scan" if scan < step else "step",
            )
        except Exception as e:
            rec.update(_error(e))
            _log(b, f"{phase}: error: {rec['error']}")
        rec["wall_seconds"] = round(b.elapsed() - t_phase, 2)
        self.save()

    # -- phases 2-4, in order
    def run_phases(self, data: Any) -> None:
        """The first preset's race, the loop check, then the later presets while they fit."""
        cfgs = self.opts.configs
        for i, cfg in enumerate(cfgs):
            # what a later preset needs to start: its warm-ups and one round
            reserve = (len(cfgs) - 1 - i) * (self.preset_min_cost(1) * SAFETY + SLACK_S)
            if i == 0:
                self.race(cfg, data, reserve=0.0, first=True)
                reserve = (len(cfgs) - 1) * (self.preset_min_cost(1) * SAFETY + SLACK_S)
                if self.opts.loop_check and "jax" in self.frameworks:
                    self.loop_check(cfg, data, reserve)
                else:
                    self.skip("loop-check", "--no-loop-check, or jax is not raced")
            else:
                self.race(cfg, data, reserve=reserve, first=False)

    # -- phase 5
    def table(self) -> str:
        d = self.doc
        lines = [f"== GPU visit: card {d['card']} -> results/{d['card_slug']}/ =="]
        for name, rec in d["phases"].items():
            if name.startswith("bench-"):
                if rec.get("status") == "skipped":
                    lines.append(f"{name}: skipped: {rec['reason']}")
                    continue
                lines.append(rec.get("table") or f"{name}: {rec.get('status')}")
                if rec.get("status") == "error":
                    lines.append(f"{name}: stopped by {rec['error']}")
                else:
                    lines.append(f"{name}: {rec.get('rounds')} round(s); {rec.get('stop_reason')}")
            elif name == "loop-check":
                if rec.get("status") == "skipped":
                    lines.append(f"loop check: skipped: {rec['reason']}")
                    continue
                parts = [
                    f"{k} {v['steady_epoch_seconds']:.3f} s/epoch (compile "
                    f"{v['compile_seconds'] or 0:.1f} s)"
                    for k, v in rec["loops"].items()
                ]
                verdict = (
                    f"; scan/step = {rec['scan_over_step']:.2f}, {rec['faster']} is faster"
                    if rec.get("status") == "done" and rec.get("scan_over_step")
                    else f"; {rec.get('error', rec.get('status'))}"
                )
                lines.append(
                    f"loop check (jax, {rec['preset']}, {rec['epochs']} epochs): "
                    + ", ".join(parts)
                    + verdict
                )
        lines.append(
            f"budget: {self.budget.elapsed():.0f} of {d['budget_seconds']:.0f} s used; "
            f"files: {', '.join(d['files'])}"
        )
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the visit, print the table, write visit.json and bench-<preset>.json/png to --out."""
    budget = Budget(0.0)  # start the clock first; the real budget is set after parsing
    opts = parse_args(argv)
    budget.seconds = opts.budget_seconds
    # Before JAX is imported: let both frameworks take GPU memory on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = " ".join(
        ["python -m jaxbench.gpu_visit", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    opts.out.mkdir(parents=True, exist_ok=True)
    visit = Visit(opts, command, budget)
    cache_dir = (
        Path(tempfile.mkdtemp(prefix="jaxbench-visit-jax-cache-")) if opts.jax_cache else None
    )
    visit.watchdog = Watchdog(budget)
    try:
        visit.save()
        visit.watchdog.arm()
        jax_cache = None
        if cache_dir is not None and "jax" in opts.frameworks:
            jax_cache = enable_jax_cache(cache_dir)
        visit.record_environment(jax_cache)
        from jaxbench.data import load_dataset

        first = opts.configs[0]
        try:  # whole dataset once; each preset takes its own subset
            data = load_dataset(first.replace(subset=None, test_subset=None), progress=False)
        except (OSError, ValueError, KeyError) as e:
            print(
                f"python -m jaxbench.gpu_visit: error: cannot load {first.dataset}: {e}",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        _log(budget, f"data: {len(data.train_labels)} train / {len(data.test_labels)} test images")
        visit.run_phases(data)
        visit.doc["environment"]["settings_end"] = numeric_settings()
        visit.doc["complete"] = True
    finally:
        visit.watchdog.disarm()
        visit.doc["finished"] = report.now_iso()
        visit.doc["table"] = visit.table()
        visit.save()
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(visit.doc["table"], flush=True)


if __name__ == "__main__":
    main()
