"""`python -m meshfit.launch` (also `meshfit launch`): the local multi-process launcher
(documented path; the code lives in `meshfit.engine.processes.launch`)."""

import sys

from meshfit.engine.processes.launch import free_port, main, parse_args

__all__ = ["free_port", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
