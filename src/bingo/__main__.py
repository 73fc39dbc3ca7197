"""``python -m bingo``: the same as the ``bingo`` command (:mod:`bingo.bench.cli`)."""

import sys

from .bench.cli import main

sys.exit(main())
