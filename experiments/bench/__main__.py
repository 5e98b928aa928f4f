"""`python -m experiments.bench`: see the package docstring."""

import sys

from experiments.bench.run import main

sys.exit(main())
