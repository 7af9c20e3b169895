"""``python -m gen_worker.discover [--project DIR]``: print the endpoint.lock of a project.

Run at image build time (``python -m gen_worker.discover > /app/.tensorhub/endpoint.lock``).
On any error: one ``error: ...`` line on stderr, nothing on stdout, exit code 1, so a broken
endpoint fails the build instead of baking an empty manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gen_worker.discovery import discover, encode_lock
from gen_worker.errors import DefinitionError

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project",
        default=".",
        metavar="DIR",
        help="the endpoint project (the folder with endpoint.toml); default: the current folder",
    )


def run(args: argparse.Namespace) -> int:
    try:
        lock = discover(args.project).lock
        data = encode_lock(lock)
    except DefinitionError as exc:
        # One line: build logs show the last line of a failed step.
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gen_worker.discover",
        description="Discover an endpoint's worker functions and print its endpoint.lock.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
