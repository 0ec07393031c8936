"""Running the `difflab` command in-process in tests."""
from __future__ import annotations

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
