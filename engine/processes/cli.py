"""The `meshfit` command: `meshfit launch ...` (see `meshfit.launch`), `meshfit plot ...`."""

from __future__ import annotations

import sys

USAGE = """usage: meshfit launch --nproc N [--coordinator HOST:PORT] [--cpu-devices-per-process K] SCRIPT [ARGS...]
       meshfit plot LOG_DIR_OR_METRICS_CSV [--out curves.png]"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "launch":
        from meshfit.engine.processes.launch import main as launch

        return launch(argv[1:])
    if argv[0] == "plot":
        from meshfit.engine.processes.plot import main as plot

        return plot(argv[1:])
    print(
        f"meshfit: unknown command {argv[0]!r}; the commands are 'launch' and 'plot'.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
