"""Runs a user's script in a launcher child after `jax.distributed` is set up.

`python -m meshfit.bootstrap SCRIPT [ARGS...]`: the script then runs unchanged, as `__main__`,
even though it builds its module (and so touches devices) before calling `fit`.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import threading
import time
import traceback

from meshfit.engine.processes import distributed


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m meshfit.bootstrap SCRIPT [ARGS...]")
    _exit_with_launcher()
    distributed.initialize()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _abort(exc.code if isinstance(exc.code, int) else 1)
        raise
    except BaseException:
        traceback.print_exc()
        _abort(1)


def _exit_with_launcher() -> None:
    """A launcher killed outright (SIGKILL, a test's timeout) cannot stop its children, which
    would wait forever in a collective: leave as soon as it is gone."""
    launcher = os.environ.get(distributed.ENV_LAUNCHER_PID)
    if not launcher or int(launcher) != os.getppid():
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(1.0)
        with contextlib.suppress(Exception):  # its pipe is likely closed
            sys.stderr.write("meshfit: the launcher is gone; stopping this process\n")
            sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="meshfit-launcher-watch", daemon=True).start()


def _abort(code: int) -> None:
    # A failed process must not wait in jax.distributed's shutdown barrier for peers that are
    # still training: leave at once so the launcher sees the failure and stops the others.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
