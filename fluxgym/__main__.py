"""`python -m fluxgym ...`: thin entry point; everything lives in fluxgym.cli."""

import sys

from fluxgym.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
