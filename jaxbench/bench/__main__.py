"""`python -m jaxbench.bench`: see `jaxbench.bench.cli`."""

import sys

from jaxbench.bench.cli import main

sys.exit(main())
