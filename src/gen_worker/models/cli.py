"""``gen-worker models pull|ls|rm``: the store from the command line.

``pull`` resolves a ref (hub or Hugging Face), downloads what the store lacks with a progress
bar, and prints the snapshot directory on stdout; interrupted, it resumes on the next run. A
failure is one ``error:`` line on stderr and exit status 1. ``ls`` lists the store's
snapshots with their refs, sizes and last use; ``rm`` removes one that is not in use.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from gen_worker.config import ModelSettings, load_model_settings
from gen_worker.errors import GenWorkerError
from gen_worker.models.fetch import SnapshotFetcher
from gen_worker.models.hub_client import HubClient
from gen_worker.models.source import ModelSource
from gen_worker.models.store import Store

__all__ = ["ProgressBar", "main"]


class ProgressBar:
    """A one-line progress bar on a terminal; on a pipe, a line every 10%."""

    def __init__(self, label: str, out: TextIO = sys.stderr) -> None:
        self._label = label
        self._out = out
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        fraction = done / total if total else 1.0
        rate = done / max(now - self._started, 1e-6)
        if self._tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            filled = int(30 * fraction)
            self._out.write(
                f"\r{self._label} [{'#' * filled}{' ' * (30 - filled)}] {fraction:6.1%} "
                f"{_size(done)}/{_size(total)} {_size(int(rate))}/s "
            )
            self._out.flush()
            return
        decile = int(fraction * 10)
        if decile > self._last_decile:
            self._last_decile = decile
            self._out.write(f"{self._label}: {fraction:.0%} of {_size(total)}\n")
            self._out.flush()

    def close(self) -> None:
        if self._tty and self._last_draw:
            self._out.write("\n")
            self._out.flush()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _attributes(pairs: Sequence[str]) -> dict[str, str | list[str]]:
    out: dict[str, str | list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise GenWorkerError(f"--attr {pair!r}: expected key=value (e.g. --attr dtype=bf16)")
        # key=a,b lists acceptable values in order of preference.
        out[key] = value.split(",") if "," in value else value
    return out


async def _pull(args: argparse.Namespace, settings: ModelSettings) -> int:
    store = Store(settings.store_root)
    url = args.hub or settings.tensorhub_url
    hub = HubClient(url, args.token or settings.tensorhub_token or "") if url else None
    events: list[tuple[str, dict[str, Any]]] = []
    source = ModelSource(
        SnapshotFetcher(store),
        hub=hub,
        hf_endpoint=settings.hf_endpoint,
        hf_token=settings.hf_token,
        on_event=lambda kind, payload: events.append((kind, payload)),
    )
    bar = ProgressBar(args.ref)
    try:
        path = await source.pull(args.ref, attributes=_attributes(args.attr), on_progress=bar)
    finally:
        bar.close()
        await source.aclose()
    completed = [p for kind, p in events if kind == "model.download.completed"]
    if completed:
        sent = sum(int(p.get("bytes_transferred", 0)) for p in completed)
        print(f"downloaded {_size(sent)} ({sent} bytes) into {path}", file=sys.stderr)
    else:
        print(f"already in the store: {path}", file=sys.stderr)
    print(path)
    return 0


def _ls(args: argparse.Namespace, settings: ModelSettings) -> int:
    store = Store(settings.store_root)
    refs: dict[str, list[str]] = {}
    for ref, digest in store.refs().items():
        refs.setdefault(digest, []).append(ref)
    infos = store.inventory()
    if args.json:
        for info in infos:
            row = {
                "digest": info.digest,
                "refs": sorted(refs.get(info.digest, [])),
                "size_bytes": info.size_bytes,
                "files": info.file_count,
                "last_used": _when(info.last_used),
                "in_use": info.in_use,
                "path": str(info.path),
            }
            print(msgspec.json.encode(row).decode())
        return 0
    if not infos:
        print(f"no snapshots in {store.root}")
        return 0
    for info in infos:
        names = ", ".join(sorted(refs.get(info.digest, []))) or "-"
        busy = " (in use)" if info.in_use else ""
        print(
            f"{info.digest}  {_size(info.size_bytes):>9}  {info.file_count:>4} files  "
            f"{_when(info.last_used)}  {names}{busy}"
        )
    return 0


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _rm(args: argparse.Namespace, settings: ModelSettings) -> int:
    store = Store(settings.store_root)
    target = args.target
    digest = target if target.startswith("blake3:") else store.get_ref(target)
    if digest is None:
        raise GenWorkerError(
            f"{target!r} is neither a snapshot digest (blake3:<hex>) nor a ref in the store "
            "(see gen-worker models ls)"
        )
    if not store.has_snapshot(digest):
        raise GenWorkerError(f"snapshot {digest} is not in the store")
    store.remove_snapshot(digest)
    print(f"removed {digest}")
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pull = commands.add_parser("pull", help="download a model into the local store")
    pull.add_argument("ref", help="owner/repo[:tag][#flavor], owner/repo@blake3:<hex>, hf:o/r")
    pull.add_argument("--hub", help="hub base URL (default: TENSORHUB_URL)")
    pull.add_argument("--token", help="hub bearer token (default: TENSORHUB_TOKEN)")
    pull.add_argument(
        "--attr", action="append", default=[], metavar="K=V", help="attribute to match"
    )
    ls = commands.add_parser("ls", help="list the snapshots in the local store")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    rm = commands.add_parser("rm", help="remove a snapshot (by digest or ref) from the store")
    rm.add_argument("target", help="blake3:<hex> or a ref shown by ls")
    for sub in (pull, ls, rm):
        sub.add_argument("--cache-dir", help="store root's parent (default: TENSORHUB_CACHE_DIR)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "gen-worker models") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        settings = load_model_settings()
        if args.cache_dir:
            settings = msgspec.structs.replace(settings, cache_dir=args.cache_dir)
        if args.command == "pull":
            return asyncio.run(_pull(args, settings))
        if args.command == "ls":
            return _ls(args, settings)
        return _rm(args, settings)
    except GenWorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(prog="python -m gen_worker.models.cli"))
