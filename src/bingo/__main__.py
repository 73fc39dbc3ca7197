"""``python -m bingo``: the same as the ``bingo`` command."""

import sys

from .cli import main

sys.exit(main())
