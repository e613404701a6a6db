"""``python -m bench.compare``: the whole comparison (``bench.compare.run_all``)."""

import sys

from bench.compare.run_all import main

sys.exit(main())
