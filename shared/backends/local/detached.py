"""`python -m shared.backends.local.detached ROLE MODULE DIRECTORY`: how `spawn` runs
`python -m MODULE DIRECTORY`. It writes `DIRECTORY/ROLE.pid` before anything else, so that the
process says who it is even when whoever started it was killed before it could, then runs the
module as the main program. The lock `spawn` handed over stays open all along, this process's
alone (`hold_lock`)."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from shared.backends.local.processes import hold_lock, write_whole

    hold_lock()
    role, module, directory = argv
    write_whole(Path(directory) / f"{role}.pid", str(os.getpid()))
    sys.argv = [module, directory]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
