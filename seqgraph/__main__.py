"""Command line: `python -m seqgraph demo | bench | viz ...` (each subcommand lives in its own module).

This module only dispatches to them; it must not hold a subcommand's logic."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m seqgraph demo [--steps N] [--batch B] [--every N] [--seed S] [--backend NAME]\n"
             "       python -m seqgraph bench [--help]\n"
             "       python -m seqgraph viz path/to/cell.py:make_cell [--unroll K] [--compact] [--backward] [-o out.svg]\n"
             "       python -m seqgraph --version\n"
             "each subcommand's --help says more")
    if not argv:
        print(f"a command is needed\n{usage}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"seqgraph {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as run
    elif cmd == "bench":
        from .bench import main as run
    elif cmd == "viz":
        from .viz import main as run
    else:
        print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
