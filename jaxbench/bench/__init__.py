"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

One command for a user who rents a GPU by the minute and wants the whole comparison:
several presets (`--config resnet9,speedrun`), both frameworks, JAX's loop choice
(`--loop scan,step`), within a wall-clock budget (`--max-seconds`), with profiles on
request (`--profile DIR`). docs/benchmark.md says what is timed, the order of work
(warm-ups, self-checks, alternating timed rounds, profiles) and the statistics.

Modules, one job each: `cli` (flags, data, start and stop), `race` (warm-ups, rounds,
phases, bench.json), `records` (run records, summaries, verdicts), `output` (table,
plots), `frameworks` (every call into the trainers), `budget` (the clock and the
watchdog), `flops` (counted FLOPs), `program` and `hlo` (JAX's programs held to account).
"""

from jaxbench.bench.cli import main

__all__ = ["main"]
