"""``python -m bench ...`` is ``peregrine bench ...``."""

import sys

from bench.cli import main

sys.exit(main())
