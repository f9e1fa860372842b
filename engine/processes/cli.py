"""The `meshfit` command: `meshfit launch ...` (see `meshfit.launch`)."""

from __future__ import annotations

import sys

from meshfit.engine.processes.launch import main as launch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: meshfit launch --nproc N [--coordinator HOST:PORT] [--cpu-devices-per-process K] SCRIPT [ARGS...]"
        )
        return 0 if argv else 2
    if argv[0] == "launch":
        return launch(argv[1:])
    print(f"meshfit: unknown command {argv[0]!r}; the only command is 'launch'.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
