"""`python -m svdtune`: the same as the ``svdtune`` command."""

import sys

from svdtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
