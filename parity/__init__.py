"""Parity suite: prove that jaxbench (JAX/Flax) trains like torch_ref (PyTorch).

`python -m parity` runs seven checks (`parity.checks`), prints a table and writes `parity.json`,
`parity_report.md` and `curves.png`; `--plant NAME` runs checks 1-6 against a deliberately
broken reference (`parity.plants`) and must fail.
"""
