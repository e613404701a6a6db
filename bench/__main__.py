"""``python -m bench ...`` is ``peregrine bench ...``."""

import sys

from bench.loadgen.cli import main

sys.exit(main())
