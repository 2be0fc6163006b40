"""``python -m tmlib``: the command line (:mod:`tmlib.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
