"""The ``gen-worker`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gen_worker import discover as discover_command
from gen_worker._version import __version__

__all__ = ["main"]


def _serve(argv: Sequence[str]) -> int:
    # Imported here so `gen-worker discover` (image build time) never loads the web stack.
    from gen_worker.testing import http_runner  # noqa: PLC0415

    return http_runner.main(argv, prog="gen-worker serve")


def _hub(argv: Sequence[str]) -> int:
    from gen_worker.hub import cli as hub_cli  # noqa: PLC0415  # see _serve

    return hub_cli.main(argv, prog="gen-worker hub")


def _models(argv: Sequence[str]) -> int:
    from gen_worker.models import cli as models_cli  # noqa: PLC0415  # see _serve

    return models_cli.main(argv, prog="gen-worker models")


# Commands that own their options (and their --help); their arguments are handed over untouched.
_DELEGATED = {"serve": _serve, "hub": _hub, "models": _models}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] and args_list[0] in _DELEGATED:
        return _DELEGATED[args_list[0]](args_list[1:])
    parser = argparse.ArgumentParser(prog="gen-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gen-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    discover_parser = commands.add_parser(
        "discover", help="print the endpoint.lock of a project (build-time discovery)"
    )
    discover_command.add_arguments(discover_parser)
    discover_parser.set_defaults(handler=discover_command.run)
    commands.add_parser(
        "serve", help="run the functions locally over HTTP (see: gen-worker serve --help)"
    )
    commands.add_parser("hub", help="run or fill a local model hub (see: gen-worker hub --help)")
    commands.add_parser(
        "models", help="pull, list and remove models in the local store (gen-worker models -h)"
    )
    args = parser.parse_args(args_list)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
