"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

Several presets, both frameworks, JAX's loops, within a wall-clock budget (docs/benchmark.md).
Modules: `cli`, `race` (the phases, bench.json), `records`, `output` (table, plots),
`frameworks` (the trainers), `budget`, `flops`, `program` and `hlo` (JAX's programs held to
account), `to94` (the FLOPs-to-94% table).
"""
