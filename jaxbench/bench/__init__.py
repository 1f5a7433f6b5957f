"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

Several presets, both frameworks, JAX's loops, within a wall-clock budget (docs/benchmark.md).
Modules: `cli` (flags, start, stop), `race` (the phases, bench.json), `records` (run records,
verdicts), `output` (table, plots), `frameworks` (calls into the trainers), `budget` (clock,
watchdog), `flops` (counted FLOPs), `program` and `hlo` (JAX's programs held to account),
`to94` (the FLOPs-to-94% table).
"""
