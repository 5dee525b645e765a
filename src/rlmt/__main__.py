"""``python -m rlmt``: the ``rlmt`` command line."""

import sys

from rlmt.cli import main

sys.exit(main())
