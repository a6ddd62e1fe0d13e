"""``python -m sklearn_transfer COMMAND``: the command line (see :mod:`sklearn_transfer.cli`)."""

import sys

from sklearn_transfer.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
