"""``python -m machipc``: see machipc.cli."""

import sys

from .cli import main

sys.exit(main())
