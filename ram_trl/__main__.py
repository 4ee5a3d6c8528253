"""``python -m ram_trl``: the ``ram-trl`` command line."""

import sys

from ram_trl.cli import main

sys.exit(main())
