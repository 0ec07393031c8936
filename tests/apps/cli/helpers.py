"""Running the `difflab` command in-process in tests."""
from __future__ import annotations

import signal
import sys

from difflab.apps.cli.app import main


def run(argv: list, capsys) -> tuple[int, str, str]:
    """Run `difflab ARGV` in-process; returns (exit status, stdout, stderr)."""
    old, sys.argv = sys.argv, ["difflab", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


class StartedWork(BaseException):
    """Raised by the tripwire: the command accepted the arguments and is working."""


def tripwire(signum, frame) -> None:
    """SIGALRM handler for fuzzing: stop a command that started working by raising StartedWork, but
    never inside an import (a half-done import would break the next cases): retry 0.1 s later."""
    caller = frame
    while caller is not None:
        if caller.f_code.co_filename.startswith("<frozen importlib"):
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            return
        caller = caller.f_back
    raise StartedWork("the command accepted its arguments and started working")
