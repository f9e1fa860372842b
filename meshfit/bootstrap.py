"""`python -m meshfit.bootstrap SCRIPT [ARGS...]`: run a script after `jax.distributed` is set up
(the code lives in `meshfit.engine.processes.bootstrap`)."""

from meshfit.engine.processes.bootstrap import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
