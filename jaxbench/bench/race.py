"""The race: warm-ups, self-checks, interleaved timed rounds within the budget, then the
vmapped seeds and the profiled runs, with bench.json rewritten after every run (`Bench`)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxbench import configs, report, stats
from jaxbench.bench import frameworks, records
from jaxbench.bench.budget import (
    SAFETY,
    SLACK_S,
    Budget,
    BudgetExceeded,
    Watchdog,
    fits,
    round_order,
)
from jaxbench.bench.frameworks import Entry, Trainer
from jaxbench.bench.output import format_tables, plot

SCHEMA_VERSION = 2
WARMUP_SEED = 1000  # never a timed seed (timed seeds are the round indices 0, 1, ...)
PROFILE_OVERHEAD = 2.0  # a profiled run's wall, predicted as this x a timed run's


@dataclass(frozen=True)
class Options:
    cfgs: tuple[configs.Config, ...]  # one per preset, overrides applied
    frameworks: tuple[str, ...]
    loops: tuple[str, ...]
    runs: int | None  # None: as many rounds as --max-seconds allows
    target: float
    out: Path
    stream: str
    torch_compile: bool | None
    torch_compile_mode: str | None
    max_seconds: float | None
    profile: Path | None
    overwrite: bool = False
    vmap_seeds: int = 0  # >1: after the rounds, K JAX seeds in one program

    @property
    def entries(self) -> tuple[Entry, ...]:
        return frameworks.make_entries(self.frameworks, self.loops)


def error_record(e: BaseException) -> dict[str, Any]:
    """An exception as bench.json keeps it: one line and the traceback's tail."""
    tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
    return {"error": f"{type(e).__name__}: {e}", "traceback_tail": "".join(tail)}


def _jax_program_check(cfg: configs.Config) -> dict[str, Any]:
    """JAX's programs as exported for CUDA, whatever this machine is (`bench.program`)."""
    from jaxbench.bench import program

    check = program.check_programs(cfg, platform="cuda")
    problems = [p for f in check["programs"].values() for p in f["problems"]]
    return {
        "status": "passed" if check["ok"] else "failed",
        "problems": problems,
        "platform": check["platform"],
        "compute_dtype": check["compute_dtype"],
        "report": program.format_report(check=check),
    }


class Bench:
    """The whole command's state: budget, contenders, bench.json, and the runs so far."""

    def __init__(
        self,
        opts: Options,
        trainers: dict[str, Trainer],
        data: dict[str, Any],
        command: str,
        budget: Budget,
        log: Callable[[str], None] = print,
    ) -> None:
        self.opts = opts
        self.trainers = trainers
        self.data = data
        self.budget = budget
        self.log = log
        self.watchdog = Watchdog(budget, reserve=SLACK_S)  # the files are written in budget
        self.entries = list(opts.entries)
        self.caches: dict[str, Any] = {}  # JAX entry name -> CompileCache
        self.estimates: dict[tuple[str, str], float] = {}  # (preset, entry) -> wall seconds
        self.doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "complete": False,
            "command": command,
            "started": report.now_iso(),
            "finished": None,
            "elapsed_seconds": 0.0,
            "max_seconds": opts.max_seconds,
            "runs_requested": opts.runs,
            "target": opts.target,
            "presets": [c.name for c in opts.cfgs],
            "contenders": [vars(e) for e in self.entries],
            "dropped": {},
            "stop_reason": None,
            "order": [],
            "environment": None,
            "races": {
                c.name: records.new_race(c, data[c.name], opts.target, opts.stream)
                for c in opts.cfgs
            },
            "files": ["bench.json"],
        }
        for race in self.doc["races"].values():
            race["frameworks"] = {
                e.name: records.new_contender(e.framework, e.loop) for e in self.entries
            }

    # -- files
    def save(self) -> None:
        self.doc["elapsed_seconds"] = round(self.budget.elapsed(), 2)
        report.write_json(self.opts.out / "bench.json", self.doc)

    def _stamp(self) -> str:
        return f"[{self.budget.elapsed():7.1f}s]"

    def torch_setup(self) -> dict[str, Any]:
        return frameworks.torch_kwargs(self.opts.torch_compile, self.opts.torch_compile_mode)

    # -- environment
    def record_environment(self) -> None:
        """Versions and settings; a framework that would run on the CPU beside a GPU is dropped
        (a full preset there would take the whole budget and say nothing of the GPU)."""
        env = report.environment(self.opts.frameworks)
        env["command"] = self.doc["command"]
        env["nvidia_smi"] = report.nvidia_smi()
        jax_gpu = env.get("jax_backend") in ("gpu", "cuda", "rocm")
        torch_gpu = env.get("torch_device") not in (None, "cpu")
        if env["nvidia_smi"].get("available") or jax_gpu or torch_gpu:
            if "jax" in self.opts.frameworks and not jax_gpu:
                self.drop("jax", f"no GPU backend (jax_backend={env.get('jax_backend')})")
            if "torch" in self.opts.frameworks and not torch_gpu:
                self.drop("torch", "torch.cuda.is_available() is False")
        env["settings_start"] = report.numeric_settings()
        self.doc["environment"] = env
        self.save()

    def drop(self, framework: str, reason: str) -> None:
        self.entries = [e for e in self.entries if e.framework != framework]
        self.doc["dropped"][framework] = reason
        self.log(f"{self._stamp()} {framework}: dropped: {reason}")

    # -- one run
    def attempt(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """`fn(*args, **kwargs)` under the watchdog: (its result, None) or (None, its error
        record); only the budget's end propagates (one failure must not cost the rest)."""
        try:
            with self.watchdog.guard():
                return fn(*args, **kwargs), None
        except BudgetExceeded:
            raise
        except Exception as e:
            return None, error_record(e)

    def call(self, cfg: configs.Config, entry: Entry, seed: int, **extra: Any) -> dict[str, Any]:
        """One trainer run; returns its summary."""
        return frameworks.run_trainer(
            self.trainers[entry.framework],
            entry,
            entry.config(cfg).replace(seed=seed, out=None),
            data=self.data[cfg.name],
            stream=self.opts.stream,
            torch_setup=self.torch_setup() if entry.framework == "torch" else {},
            caches=self.caches,
            **extra,
        )

    def run(self, cfg: configs.Config, entry: Entry, seed: int, kind: str) -> dict[str, Any] | None:
        """A warm-up or timed run, recorded in bench.json; an error retires the contender."""
        race = self.doc["races"][cfg.name]
        fw = race["frameworks"][entry.name]
        t0 = self.budget.elapsed()
        summary, error = self.attempt(self.call, cfg, entry, seed)
        if error is not None:
            fw["error"] = {**error, "seed": seed, "kind": kind}
            self.log(
                f"{self._stamp()} {cfg.name} {entry.name}: {kind} failed: {fw['error']['error']}"
            )
            self.save()
            return None
        wall = self.budget.elapsed() - t0
        rec = records.run_record(summary, cfg, race["n_train"], race["n_test"])
        rec["wall_seconds"] = wall
        self.doc["order"].append(
            {"preset": cfg.name, "contender": entry.name, "seed": seed, "kind": kind}
        )
        key = (cfg.name, entry.name)
        if kind == "warm-up":
            fw["warmup"] = rec
            fw["trainer"] = {k: summary[k] for k in frameworks.TRAINER_INFO_KEYS if k in summary}
            self.estimates[key] = wall
        else:
            fw["runs"].append(rec)
            if seed not in race["seeds"]:
                race["seeds"].append(seed)
            self.estimates[key] = max(r["wall_seconds"] for r in fw["runs"])
        records.refresh_race(race, cfg, self.opts.target)
        self.save()
        self.log(
            f"{self._stamp()} {cfg.name:<9} {entry.name:<9} {kind:<8} seed {seed:<4} "
            f"acc {rec['accuracy']:.4f}  time {rec['time_seconds']:.2f} s  "
            f"compile {rec['compile_seconds'] or 0:.1f} s  wall {wall:.1f} s"
        )
        return summary

    def active(self, cfg: configs.Config) -> list[Entry]:
        """The contenders still racing in this preset (warmed up, no error)."""
        fws = self.doc["races"][cfg.name]["frameworks"]
        ready = {n for n, fw in fws.items() if fw["warmup"] is not None and not fw["error"]}
        return [e for e in self.entries if e.name in ready]

    def round_cost(self, scale: float = 1.0) -> float:
        """Predicted wall seconds of a run (x `scale`) of every contender still racing."""
        runs = [(c.name, e.name) for c in self.opts.cfgs for e in self.active(c)]
        return sum(scale * self.estimates[key] for key in runs)

    # -- the phases
    def race(self) -> None:
        """Every phase in order; on `BudgetExceeded` or a signal the caller calls `close`."""
        self.record_environment()
        self.watchdog.arm()
        self.warmups()
        self.doc["stop_reason"] = self.rounds()
        if self.opts.vmap_seeds:
            self.vmapped()
        if self.opts.profile is not None:
            self.profiles()

    def warmups(self) -> None:
        """A warm-up of every contender in every preset, then the self-checks. Under a
        budget, a later preset starts only if its warm-up, one timed run and a round of what
        is warm fit (predicted from the first preset's warm-up and the counted FLOPs)."""
        first = self.opts.cfgs[0]
        for i, cfg in enumerate(self.opts.cfgs):
            for entry in self.entries:
                if i and self.budget.limited:
                    guess = self.estimates.get((first.name, entry.name), 0.0) * records.work_ratio(
                        cfg, first, self.doc["races"]
                    )
                    warm = self.round_cost()
                    if not fits(self.budget.remaining(), 2 * guess + warm):
                        reason = (
                            f"budget: its warm-up and one run (~{2 * guess:.0f} s predicted) "
                            f"and a round of the others (~{warm:.0f} s) do not fit"
                        )
                        fw = self.doc["races"][cfg.name]["frameworks"][entry.name]
                        fw["error"] = {"error": f"skipped: {reason}"}
                        self.log(f"{self._stamp()} {cfg.name} {entry.name}: skipped: {reason}")
                        continue
                self.run(cfg, entry, WARMUP_SEED, "warm-up")
            self.self_checks(cfg)

    def self_checks(self, cfg: configs.Config) -> None:
        """Checks that hold each side to account, recorded in the race (never timed). Under a
        budget they run only if they and a round still fit, each predicted to cost a warm-up
        (they build the programs again): a check must not push the runs past --max-seconds."""
        checks = self.doc["races"][cfg.name]["self_checks"]
        cost = sum(self.estimates.get((cfg.name, e.name), 0.0) for e in self.active(cfg))
        budget_left = not self.budget.limited or fits(self.budget.remaining(), 2 * cost)
        skipped = {"status": "skipped", "detail": f"budget: checks and a round (~{2 * cost:.0f} s)"}
        for entry in self.active(cfg):
            run_cfg = entry.config(cfg)
            if entry.framework == "jax":
                from jaxbench.bench import program  # JAX's programs, XLA's FLOPs

                todo = {"jax_program": _jax_program_check, "jax_flops": program.flop_check}
                args: tuple[Any, ...] = (run_cfg,)
            else:
                todo = {"torch_sync": frameworks.torch_sync_check}
                args = (run_cfg.replace(seed=WARMUP_SEED, out=None), self.data[cfg.name])
                args += (self.torch_setup(),)
            for name, fn in todo.items():
                if name in checks:
                    continue
                try:
                    checks[name] = fn(*args) if budget_left else dict(skipped)
                except Exception as e:
                    checks[name] = {"status": "error", **error_record(e)}
        for name, result in checks.items():
            why = result.get("problems") or result.get("error") or result.get("detail") or ""
            why = "; ".join(why) if isinstance(why, list) else why
            self.log(
                f"{self._stamp()} {cfg.name} self-check {name}: {result.get('status')}"
                + (f" ({why})" if why and result.get("status") != "passed" else "")
            )
        self.save()

    def rounds(self) -> str:
        """Timed rounds until --runs or the budget; returns why they stopped."""
        r = 0
        reserve = 0.0 if self.opts.profile is None else self.round_cost(PROFILE_OVERHEAD)
        while True:
            todo = [(cfg, e) for cfg in self.opts.cfgs for e in self.active(cfg)]
            if not todo:
                return "no contender left to run"
            if self.opts.runs is not None and r >= self.opts.runs:
                return f"reached --runs {self.opts.runs}"
            cost = self.round_cost()
            if self.budget.limited and not fits(self.budget.remaining(), cost, reserve):
                return (
                    f"budget: next round predicted {cost:.1f} s (x{SAFETY} + {SLACK_S:.0f} s), "
                    f"{self.budget.remaining():.1f} s left, {reserve:.1f} s kept for profiles"
                )
            for cfg in round_order(self.opts.cfgs, r):
                for entry in round_order(self.active(cfg), r):
                    self.run(cfg, entry, r, "timed")
            r += 1

    def vmapped(self) -> None:
        """Per preset, K JAX seeds in one vmapped program (`train.train_seeds`), timed as a
        run is (steps and final evaluation, compilation excluded), beside the runs alone."""
        k = self.opts.vmap_seeds
        for cfg in self.opts.cfgs:
            entry = next((e for e in self.active(cfg) if e.framework == "jax"), None)
            if entry is None:
                continue
            race = self.doc["races"][cfg.name]
            est = k * self.estimates[(cfg.name, entry.name)]  # at worst, K runs one by one
            if self.budget.limited and not fits(self.budget.remaining(), est):
                race["vmap_seeds"] = {"k": k, "skipped": f"budget: ~{est:.0f} s predicted"}
                self.log(f"{self._stamp()} {cfg.name} {k} seeds, one program: skipped (budget)")
                continue
            run_cfg = entry.config(cfg).replace(out=None)
            res, error = self.attempt(
                frameworks.train_seeds, run_cfg, range(k), self.data[cfg.name]
            )
            if error is not None:
                race["vmap_seeds"] = {"k": k, **error}
                continue
            # the "K seeds, one program" row: its time, per seed, beside a run alone's mean
            alone = race["frameworks"][entry.name]["summary"]
            accs = [s["final"][records.headline_metric(cfg)] for s in res["seeds"]]
            t = res["total_time_seconds"]
            race["vmap_seeds"] = {
                "k": k,
                "contender": entry.name,
                "time_seconds": t,
                "time_per_seed": t / k,
                "time_alone": alone["time_seconds"]["mean"] if alone else None,
                "compile_seconds": res["compile_seconds"],
                "accuracy": stats.describe(accs),
                "seeds": list(range(k)),
            }
            self.save()
            self.log(
                f"{self._stamp()} {cfg.name} {k} seeds, one program: {t:.2f} s ({t / k:.2f} s "
                f"per seed), acc mean {race['vmap_seeds']['accuracy']['mean']:.4f}"
            )

    def profiles(self) -> None:
        """One profiled run per contender (off the statistics): traces and top-op tables."""
        from jaxbench.profiling import format_top_ops

        for cfg in self.opts.cfgs:
            for entry in self.active(cfg):
                est = PROFILE_OVERHEAD * self.estimates[(cfg.name, entry.name)]
                if self.budget.limited and not fits(self.budget.remaining(), est):
                    self.log(f"{self._stamp()} {cfg.name} {entry.name}: profile skipped (budget)")
                    continue
                folder = self.opts.profile / cfg.name / entry.name
                fw = self.doc["races"][cfg.name]["frameworks"][entry.name]
                summary, error = self.attempt(
                    self.call, cfg, entry, WARMUP_SEED, profile_dir=folder
                )
                fw["profile"] = error or summary.get("profile")
                if error is not None:
                    continue
                if fw["profile"]:
                    title = f"{cfg.name} {entry.name}: top operations"
                    self.log(format_top_ops(fw["profile"]["top_ops"], title))
                self.save()

    def finish(self, complete: bool) -> None:
        """Statistics, verdicts, plots and the table from whatever finished."""
        self.watchdog.disarm()
        for cfg in self.opts.cfgs:
            race = self.doc["races"][cfg.name]
            records.refresh_race(race, cfg, self.opts.target)
            race["complete"] = complete
            if any(fw["runs"] for fw in race["frameworks"].values()):
                png = f"bench-{cfg.name}.png"
                try:
                    if plot(race, self.opts.out / png) and png not in self.doc["files"]:
                        self.doc["files"].append(png)
                except Exception as e:  # a plot is not worth losing the JSON over
                    race["plot_error"] = f"{type(e).__name__}: {e}"
        if self.doc["environment"] is not None:
            self.doc["environment"]["settings_end"] = report.numeric_settings()
        self.doc["complete"] = complete
        self.doc["finished"] = report.now_iso()
        self.save()

    def close(self, complete: bool) -> None:
        """bench.json and the plots written, then the table and the files' names printed."""
        self.finish(complete)
        print(format_tables(self.doc, self.budget.elapsed()), flush=True)
        print(f"wrote {', '.join(str(self.opts.out / f) for f in self.doc['files'])}", flush=True)
