"""`python -m jaxbench.bench`: see `jaxbench.bench.cli`."""

from jaxbench.bench.cli import main

main()
