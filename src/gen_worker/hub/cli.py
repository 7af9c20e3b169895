"""``gen-worker hub``: run the local hub, or publish a directory into it.

::

    gen-worker hub serve --root DIR [--listen HOST:PORT] [--token T ...] [--url-ttl SECONDS]
                         [--public-url URL] [--signing-key-file PATH] [--max-file-bytes N]
    gen-worker hub publish OWNER/REPO[:TAG] PATH --root DIR [--attr k=v ...] [--part-size BYTES]

``serve`` prints ``listening on http://HOST:PORT`` once it accepts requests and stops cleanly
(exit 0) on SIGINT/SIGTERM. ``publish`` prints the new snapshot's checkpoint id and what it
holds. Bad input is one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from gen_worker.errors import GenWorkerError
from gen_worker.hub.publish import DEFAULT_PART_SIZE_BYTES, publish
from gen_worker.hub.server import HubSettings, serve
from gen_worker.hub.signing import DEFAULT_URL_TTL_S
from gen_worker.models.manifest import PARTS_SUFFIX, SnapshotManifest
from gen_worker.refs import normalize_ref

__all__ = ["DEFAULT_LISTEN", "main"]

DEFAULT_LISTEN = "127.0.0.1:8787"
_PART = re.compile(r"(.+)\.part\d{4,}")


class _UsageError(Exception):
    """A command-line mistake: reported as one ``error:`` line with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8787`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    return parse


def _attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. dtype=bf16")
    return key.strip(), value


def _parser(prog: str) -> _Parser:
    parser = _Parser(prog=prog, description="The local hub: model snapshots and the file API.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    run = commands.add_parser("serve", help="serve a hub root over HTTP")
    run.add_argument("--root", required=True, metavar="DIR", help="the hub's storage directory")
    run.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"default {DEFAULT_LISTEN} (port 0: any free)",
    )
    run.add_argument(
        "--token",
        dest="tokens",
        action="append",
        default=[],
        metavar="T",
        help="require 'Authorization: Bearer T' (repeatable; default: open)",
    )
    run.add_argument(
        "--url-ttl",
        type=_positive(float),
        default=DEFAULT_URL_TTL_S,
        metavar="SECONDS",
        help="lifetime of signed blob and part URLs",
    )
    run.add_argument(
        "--public-url",
        metavar="URL",
        help="base of the URLs handed out (default: the request's own)",
    )
    run.add_argument(
        "--signing-key-file",
        metavar="PATH",
        help="a key (16+ bytes) to sign URLs with, so they outlive a restart",
    )
    run.add_argument(
        "--max-file-bytes",
        type=_positive(int),
        metavar="N",
        help="refuse file API uploads above N bytes",
    )
    run.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    pub = commands.add_parser("publish", help="publish a directory or file as a snapshot")
    pub.add_argument("ref", metavar="OWNER/REPO[:TAG]")
    pub.add_argument("path", metavar="PATH")
    pub.add_argument("--root", required=True, metavar="DIR", help="the hub's storage directory")
    pub.add_argument(
        "--attr",
        dest="attrs",
        action="append",
        type=_attr,
        default=[],
        metavar="KEY=VALUE",
        help="an attribute of the snapshot (repeatable)",
    )
    pub.add_argument(
        "--part-size",
        type=_positive(int),
        default=DEFAULT_PART_SIZE_BYTES,
        metavar="BYTES",
        help="split files larger than this into parts",
    )
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    if args.public_url is not None and not args.public_url.startswith(("http://", "https://")):
        raise _UsageError(f"--public-url {args.public_url!r} must start with http:// or https://")
    key = None
    if args.signing_key_file is not None:
        try:
            key = Path(args.signing_key_file).read_bytes().strip()
        except OSError as exc:
            raise _UsageError(f"--signing-key-file: cannot read it: {exc.strerror}") from None
    try:
        settings = HubSettings(
            Path(args.root),
            tuple(args.tokens),
            args.url_ttl,
            key,
            args.public_url,
            args.max_file_bytes,
        )
        host, port = args.listen
        asyncio.run(
            serve(
                settings,
                host,
                port,
                log_level=args.log_level,
                ready=lambda url: print(f"listening on {url}", flush=True),
            )
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:
        if exc.filename:  # the root (or a directory in it) cannot be created or used
            raise _UsageError(
                f"cannot use --root {args.root}: {exc.strerror or exc} ({exc.filename})"
            ) from None
        host, port = args.listen
        raise _UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return 0


def _describe(ref: str, manifest: SnapshotManifest) -> str:
    """One line: the checkpoint id, and the files and bytes it holds (a split file once)."""
    split = {
        e.path.removesuffix(PARTS_SUFFIX) for e in manifest.entries if e.path.endswith(PARTS_SUFFIX)
    }
    files = size = 0
    for entry in manifest.entries:
        part_of = _PART.fullmatch(entry.path)
        if part_of is not None and part_of.group(1) in split:
            size += entry.size_bytes
        elif entry.path.removesuffix(PARTS_SUFFIX) in split:
            files += 1
        else:
            files += 1
            size += entry.size_bytes
    note = f", {len(split)} split into parts" if split else ""
    return f"published {ref} {manifest.digest} ({files} files, {size} bytes{note})"


def _run_publish(args: argparse.Namespace) -> int:
    try:
        parsed, changed = normalize_ref(args.ref)
        ref = parsed.canonical
        if changed:
            print(f"note: using the canonical ref {ref!r} for {args.ref!r}", file=sys.stderr)
        manifest = publish(
            args.root, ref, args.path, attributes=dict(args.attrs), part_size_bytes=args.part_size
        )
    except GenWorkerError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:
        raise _UsageError(
            f"cannot publish {args.path}: {exc.strerror or exc} ({exc.filename or args.root})"
        ) from None
    print(_describe(ref, manifest), flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "gen-worker hub") -> int:
    """Run ``gen-worker hub`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.command == "serve":
            return _run_serve(args)
        return _run_publish(args)
    except _UsageError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m gen_worker.hub.cli"))
