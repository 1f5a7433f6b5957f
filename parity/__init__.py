"""Parity suite: prove that jaxbench (JAX/Flax) trains like torch_ref (PyTorch).

`python -m parity [--quick] [--data-dir DIR] [--out DIR] [--plant NAME]` runs
seven checks (init, forward, gradients, optimizer, augmentation, trainer,
accuracy curves; one module each in `parity/checks/`), prints a table and writes `parity.json`,
`parity_report.md` and `curves.png`. `--plant NAME` runs checks 1-6 against a
deliberately broken reference (`parity.plants`) and must fail.

Modules: `convert` (exact weight conversion), `checks` (one function per
check), `plants`, `suite` (`run_suite`), `report`, `stats`, `harness`.
"""
