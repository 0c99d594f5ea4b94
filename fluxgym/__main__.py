"""`python -m fluxgym ...`: thin entry point; everything lives in fluxgym.cli."""

import sys

from fluxgym.cli import main
from fluxgym.closed_pipe import quiet_closed_pipe

if __name__ == "__main__":
    with quiet_closed_pipe():  # `... status x | head -1`: no BrokenPipeError traceback, the usual exit code
        code = main(sys.argv[1:])
    sys.exit(code)
