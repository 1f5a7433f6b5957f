"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

One command for a user who rents a GPU by the minute and wants the whole
comparison: several presets (`--config resnet9,speedrun`), both frameworks,
JAX's loop choice (`--loop scan,step`), within a wall-clock budget
(`--max-seconds`), with profiles on request (`--profile DIR`).

Order of work (docs/benchmark.md):
1. The dataset is loaded once into host memory and handed to every run.
2. Per preset and contender, one untimed warm-up run (seed `race.WARMUP_SEED`): it
   compiles (JAX: `jit(...).lower().compile()` into a `CompileCache` shared by
   later runs; PyTorch: `torch.compile` and a warm-up step, once per process),
   autotunes and grows the allocators. Then the self-checks: JAX's program as
   exported for the GPU (`program`), XLA's executed FLOPs against the
   counted ones (`flops`), and on CUDA PyTorch's timed steps under sync-debug mode.
3. Rounds: one timed run of every contender of every preset, seed = round
   index, the order alternating each round (ABAB, who goes first alternates),
   until `--runs` rounds or the budget says the next round would not fit
   (`budget`). Every contender so has the same seeds.
4. With `--profile`: one more run per contender under the profilers.
Results are written atomically after every run (a kill leaves valid JSON).

What is timed is each trainer's `total_time_seconds`: data-dependent
initialisation, every training step and the final evaluation with TTA, with a
device synchronisation before each clock read; compilation and the per-epoch
monitoring evaluations are excluded (docs/design.md).

Both frameworks run in this one process; `main` sets
`XLA_PYTHON_CLIENT_PREALLOCATE=false` (unless the caller set it) before JAX is
imported, so JAX does not reserve 75% of the GPU before PyTorch runs.

Statistics: mean, sample std (ddof=1), min and max over runs; the time ratio
of means has a 95% interval from the delta method on the log ratio with
Welch's degrees of freedom (`jaxbench.stats.ratio_ci`). A race whose contenders do not
both reach `--target` on average has no winner: "target not reached", no ratio.

Modules, one job each: `cli` (flags, data, start and stop), `race` (warm-ups, rounds,
phases, bench.json), `records` (run records, summaries, verdicts), `output` (table,
plots), `frameworks` (every call into the trainers), `budget` (the clock and the
watchdog), `flops` (counted FLOPs), `program` and `hlo` (JAX's programs held to account).
"""

from jaxbench.bench.cli import main

__all__ = ["main"]
