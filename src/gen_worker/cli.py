"""The ``gen-worker`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gen_worker import discover as discover_command
from gen_worker._version import __version__

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gen-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gen-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    discover_parser = commands.add_parser(
        "discover", help="print the endpoint.lock of a project (build-time discovery)"
    )
    discover_command.add_arguments(discover_parser)
    discover_parser.set_defaults(handler=discover_command.run)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
