"""Which files of a Hugging Face repo a diffusers or transformers load needs (pure rules).

The input is the repo listing at one commit (path, size, LFS sha256); nothing is read. Rules:

* **Never pickle**: ``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle`` are never
  selected, nor the ``*.bin.index.json`` style indexes that point at them. Other frameworks'
  weights (``.msgpack`` flax, ``.h5`` tf, ``.onnx``, ``.ot``, ``.gguf``, ...) are not selected
  either: only torch safetensors are loaded.
* **No clutter**: README and other ``.md``, ``.gitattributes``, licenses, images, custom code
  (``*.py``: remote code is never run) and anything else a load does not read.
* **Load folders**. A repo with ``model_index.json`` at its root is a *diffusers* repo: the root
  contributes ``model_index.json`` only (single-file checkpoints there are skipped) and every
  top-level folder with a ``config.json``, ``*_config.json`` or tokenizer file (``vocab.*``,
  ``merges.txt``, ``tokenizer.json``, ``*.model``) directly inside is a component.
  Any other repo is a *transformers* repo: the root is the load folder, plus the module
  folders (``1_Pooling/``, ``2_Dense/`` ...) when ``modules.json`` marks a
  sentence-transformers repo. Other folders (``onnx/``, ``flax/``, ``openvino/``,
  ``coreml/`` ...) and anything nested below a load folder's top level are skipped.
* **In a load folder** the top-level configs and tokenizer/processor files are kept
  (``*.json``, ``*.txt``, ``*.model``, ``*.jinja``, ``*.tiktoken``, ``vocab*``, ``merges*``),
  and for each weights group (``model``, ``diffusion_pytorch_model``, ``adapter_model``,
  ``pytorch_lora_weights``) exactly one precision: ``fp16``, else ``bf16``, else the
  default (no variant). A precision is either one file (``name[.variant].safetensors``,
  preferred) or a complete shard set: its index (``name.safetensors.index[.variant].json`` or
  ``name.variant.safetensors.index.json``) and every shard ``name[.variant]-0000i-of-0000n``.
  Other variants (``non_ema`` ...) and incomplete shard sets are skipped.
* **Unloadable**: a load folder that ships weights but none as selectable safetensors (only
  pickle, only another framework, only unknown names) is a :class:`ValidationError` naming the
  folder; its pickle files are still never downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from gen_worker.errors import ValidationError

__all__ = [
    "DIFFUSERS_INDEX",
    "PICKLE_SUFFIXES",
    "PREFERRED_VARIANTS",
    "WEIGHT_NAMES",
    "RepoFile",
    "select_files",
    "weight_variants",
]

DIFFUSERS_INDEX = "model_index.json"
SENTENCE_TRANSFORMERS_INDEX = "modules.json"
WEIGHT_NAMES = frozenset(
    {"model", "diffusion_pytorch_model", "adapter_model", "pytorch_lora_weights"}
)
# Reduced precision first: half the bytes to download and to hold in memory.
PREFERRED_VARIANTS: tuple[str | None, ...] = ("fp16", "bf16", None)

PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
_FOREIGN_FORMATS = {
    ".msgpack": "flax",
    ".h5": "tensorflow",
    ".keras": "keras",
    ".tflite": "tflite",
    ".pb": "tensorflow",
    ".onnx": "onnx",
    ".onnx_data": "onnx",
    ".ot": "rust-bert",
    ".gguf": "gguf",
    ".ggml": "ggml",
    ".mlmodel": "coreml",
    ".npz": "numpy",
}
_OTHER_RUNTIME_FOLDERS = frozenset(
    {"onnx", "flax", "openvino", "coreml", "tf", "tensorflow", "mlx", "gguf", "ggml", "tflite"}
)
_KEEP_SUFFIXES = frozenset({".json", ".txt", ".model", ".jinja", ".tiktoken"})
_CLUTTER_SUFFIXES = frozenset(
    {".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".bmp", ".pdf", ".ipynb"}
)
_CLUTTER_STEMS = ("license", "licence", "readme", "notice", "copying", "requirements")
_CLUTTER_REASON = "documentation or repo metadata; a load does not read it"

_SHARD = re.compile(r"(?P<base>[^.]+?)(?:\.(?P<variant>[^.]+))?-(?P<n>\d{5})-of-(?P<of>\d{5})")
_SINGLE = re.compile(r"(?P<base>[^.]+)(?:\.(?P<variant>[^.]+))?")
_INDEX = re.compile(
    r"(?P<base>[^.]+)(?:\.(?P<v1>[^.]+))?\.safetensors\.index(?:\.(?P<v2>[^.]+))?\.json"
)
_OTHER_INDEX = re.compile(r".+\.(?P<fmt>[A-Za-z0-9_]+)\.index(?:\.[^.]+)?\.json")
_MODULE_FOLDER = re.compile(r"\d+_[A-Za-z]\w*")

Kind = Literal["safetensors", "pickle", "foreign", "keep", "skip"]


@dataclass(frozen=True, slots=True)
class RepoFile:
    """One file of a repo listing; ``sha256`` is set for LFS files."""

    path: str
    size: int
    sha256: str | None = None

    @property
    def folder(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class _WeightName:
    base: str
    variant: str | None
    shard: int | None = None
    of: int | None = None
    is_index: bool = False


@dataclass(slots=True)
class _Precision:
    """Every file of one weights group at one variant."""

    single: RepoFile | None = None
    index: RepoFile | None = None
    shards: dict[int, RepoFile] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)
    files: list[RepoFile] = field(default_factory=list)

    def add(self, file: RepoFile, parsed: _WeightName) -> None:
        self.files.append(file)
        if parsed.is_index:
            self.index = file
        elif parsed.shard is not None and parsed.of is not None:
            self.shards[parsed.shard] = file
            self.totals.add(parsed.of)
        else:
            self.single = file

    def pick(self) -> list[RepoFile] | None:
        if self.single is not None:
            return [self.single]
        if self.problem() is None and self.index is not None:
            return [self.index, *(self.shards[i] for i in sorted(self.shards))]
        return None

    def problem(self) -> str | None:
        """Why the shard set cannot be loaded, or None when it is complete."""
        if self.index is None:
            return "incomplete shard set: its .safetensors.index.json is missing"
        if not self.shards:
            return "an index without any of its shards"
        if len(self.totals) != 1:
            return f"shards disagree on their count ({sorted(self.totals)})"
        total = next(iter(self.totals))
        missing = [i for i in range(1, total + 1) if i not in self.shards]
        if missing:
            return f"incomplete shard set: shard(s) {missing} of {total} missing"
        return None


def select_files(files: Sequence[RepoFile]) -> tuple[list[RepoFile], list[tuple[str, str]]]:
    """Split a listing into the files a load needs and ``(path, reason)`` for the others.

    Both lists are sorted by path. Raises :class:`ValidationError` when a load folder has
    weights but none it can load (see the module docstring).
    """
    root_names = {f.name for f in files if not f.folder}
    is_diffusers = DIFFUSERS_INDEX in root_names
    load_folders = _load_folders(files, is_diffusers)
    members: dict[str, list[RepoFile]] = {}
    selected: list[RepoFile] = []
    skipped: list[tuple[str, str]] = []
    for file in files:
        if file.folder in load_folders:
            members.setdefault(file.folder, []).append(file)
        elif not file.folder:
            if file.name == DIFFUSERS_INDEX:
                selected.append(file)
            else:
                skipped.append((file.path, _diffusers_root_reason(file.name)))
        else:
            skipped.append((file.path, _outside_reason(file.path, is_diffusers, load_folders)))
    for folder in sorted(members):
        where = _describe(folder, is_diffusers)
        kept, dropped = _select_folder(where, members[folder])
        selected.extend(kept)
        skipped.extend(dropped)
    return sorted(selected, key=lambda f: f.path), sorted(skipped)


def weight_variants(selected: Iterable[RepoFile]) -> dict[str, str]:
    """``{folder: variant}`` for the load folders whose selected weights are a variant.

    The loader passes it on (diffusers/transformers ``variant="fp16"``); the root is ``""``.
    """
    variants: dict[str, str] = {}
    for file in selected:
        parsed = _parse_weight(file.name)
        if parsed is not None and parsed.variant is not None:
            variants[file.folder] = parsed.variant
    return variants


def _load_folders(files: Sequence[RepoFile], is_diffusers: bool) -> frozenset[str]:
    top_level: dict[str, set[str]] = {}
    for file in files:
        folder = file.folder
        if folder and "/" not in folder:
            top_level.setdefault(folder, set()).add(file.name)
    usable = {f for f in top_level if f.lower() not in _OTHER_RUNTIME_FOLDERS}
    if is_diffusers:
        return frozenset(f for f in usable if any(_marks_component(n) for n in top_level[f]))
    has_modules = any(f.path == SENTENCE_TRANSFORMERS_INDEX for f in files)
    modules = {f for f in usable if has_modules and _MODULE_FOLDER.fullmatch(f)}
    return frozenset({"", *modules})


def _marks_component(name: str) -> bool:
    """A file that only a diffusers component folder (a model, scheduler, tokenizer) has."""
    if name == "config.json" or name.endswith(("_config.json", ".model")):
        return True
    return name in ("tokenizer.json", "merges.txt") or name.startswith("vocab.")


def _describe(folder: str, is_diffusers: bool) -> str:
    if not folder:
        return "the repo root"
    return f"{'component' if is_diffusers else 'module folder'} '{folder}/'"


def _select_folder(
    where: str, files: list[RepoFile]
) -> tuple[list[RepoFile], list[tuple[str, str]]]:
    kept: list[RepoFile] = []
    skipped: list[tuple[str, str]] = []
    weights: list[RepoFile] = []
    found_weights: list[RepoFile] = []
    for file in files:
        kind, reason = _classify(file.name)
        if kind in ("safetensors", "pickle", "foreign"):
            found_weights.append(file)
        if kind == "safetensors":
            weights.append(file)
        elif kind == "keep":
            kept.append(file)
        else:
            skipped.append((file.path, reason))
    chosen, dropped = _choose_weights(weights)
    if found_weights and not chosen:
        raise _unloadable(where, found_weights)
    return kept + chosen, skipped + dropped


def _classify(name: str) -> tuple[Kind, str]:
    """What a file in a load folder is; the reason says why a skipped one is not needed."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".safetensors" or _INDEX.fullmatch(name):
        return "safetensors", ""
    if suffix in PICKLE_SUFFIXES:
        return "pickle", f"pickle format ({suffix}) is never downloaded"
    if suffix in _FOREIGN_FORMATS:
        fmt = _FOREIGN_FORMATS[suffix]
        return "foreign", f"{fmt} weights ({suffix}); only torch safetensors are loaded"
    reason = _skip_reason(name, suffix)
    return ("keep", "") if reason is None else ("skip", reason)


def _skip_reason(name: str, suffix: str) -> str | None:
    """Why a file that is not weights is skipped; None for configs and tokenizer files."""
    lower = name.lower()
    other_index = _OTHER_INDEX.fullmatch(name)
    if other_index is not None:
        return f"index of .{other_index['fmt']} shards, which are never downloaded"
    if lower.startswith(".git") or suffix in _CLUTTER_SUFFIXES or lower.startswith(_CLUTTER_STEMS):
        return _CLUTTER_REASON
    if suffix == ".py":
        return "custom code; remote code is never run"
    if suffix in _KEEP_SUFFIXES or lower.startswith(("vocab", "merges")):
        return None
    return "not a file a diffusers or transformers load reads"


def _parse_weight(name: str) -> _WeightName | None:
    index = _INDEX.fullmatch(name)
    if index is not None:
        if index["v1"] and index["v2"]:
            return None
        return _WeightName(index["base"], index["v1"] or index["v2"], is_index=True)
    if not name.endswith(".safetensors"):
        return None
    stem = name[: -len(".safetensors")]
    shard = _SHARD.fullmatch(stem)
    if shard is not None:
        return _WeightName(shard["base"], shard["variant"], int(shard["n"]), int(shard["of"]))
    single = _SINGLE.fullmatch(stem)
    if single is None:
        return None
    return _WeightName(single["base"], single["variant"])


def _choose_weights(files: list[RepoFile]) -> tuple[list[RepoFile], list[tuple[str, str]]]:
    groups: dict[str, dict[str | None, _Precision]] = {}
    skipped: list[tuple[str, str]] = []
    for file in files:
        parsed = _parse_weight(file.name)
        if parsed is None or parsed.base not in WEIGHT_NAMES:
            names = ", ".join(sorted(WEIGHT_NAMES))
            skipped.append((file.path, f"not a weights name a load reads (those are: {names})"))
            continue
        group = groups.setdefault(parsed.base, {})
        group.setdefault(parsed.variant, _Precision()).add(file, parsed)
    chosen: list[RepoFile] = []
    for base in sorted(groups):
        picked, dropped = _choose_precision(groups[base])
        chosen.extend(picked)
        skipped.extend(dropped)
    return chosen, skipped


def _choose_precision(
    precisions: dict[str | None, _Precision],
) -> tuple[list[RepoFile], list[tuple[str, str]]]:
    picked: list[RepoFile] = []
    chosen_variant: str | None = None
    for variant in PREFERRED_VARIANTS:
        precision = precisions.get(variant)
        candidate = precision.pick() if precision is not None else None
        if candidate:
            picked, chosen_variant = candidate, variant
            break
    taken = {f.path for f in picked}
    skipped: list[tuple[str, str]] = []
    for variant, precision in precisions.items():
        reason = _dropped_reason(variant, precision, picked, chosen_variant)
        skipped.extend((f.path, reason) for f in precision.files if f.path not in taken)
    return picked, skipped


def _dropped_reason(
    variant: str | None,
    precision: _Precision,
    picked: list[RepoFile],
    chosen_variant: str | None,
) -> str:
    """Why the files of one precision of a group were not selected."""
    if variant not in PREFERRED_VARIANTS:
        why = f"{_label(variant)} is not loaded (only fp16, bf16 or the default precision)"
    elif variant == chosen_variant and picked:
        return f"the single file {picked[0].name} of the same precision is selected"
    elif precision.pick() is None:
        why = f"{_label(variant)}: {precision.problem()}"
    else:
        why = f"{_label(variant)} not needed"
    return f"{why}; {_label(chosen_variant)} is selected" if picked else why


def _label(variant: str | None) -> str:
    return "the default precision" if variant is None else f"variant {variant!r}"


def _diffusers_root_reason(name: str) -> str:
    kind, reason = _classify(name)
    if kind == "safetensors":
        return "single-file checkpoint; a diffusers load reads the component folders"
    if kind in ("pickle", "foreign") or reason == _CLUTTER_REASON:
        return reason
    return f"a diffusers load reads only {DIFFUSERS_INDEX} at the repo root"


def _outside_reason(path: str, is_diffusers: bool, load_folders: frozenset[str]) -> str:
    top = path.partition("/")[0]
    if top in load_folders:
        return f"nested below {top}/; a load reads only the top level of {top}/"
    if top.lower() in _OTHER_RUNTIME_FOLDERS:
        return f"{top}/ holds an export for another runtime; only torch safetensors are loaded"
    if is_diffusers:
        return f"{top}/ is not a diffusers component (no config or tokenizer file in it)"
    return f"{top}/ is not read by a transformers load from the repo root"


def _unloadable(where: str, found: list[RepoFile]) -> ValidationError:
    names = sorted(f.name for f in found)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    pickles = sorted({PurePosixPath(n).suffix.lower() for n in names} & PICKLE_SUFFIXES)
    why = f"pickle files ({', '.join(pickles)}) are never downloaded; " if pickles else ""
    return ValidationError(
        f"{where} has no loadable weights (found {shown}): {why}only torch safetensors named "
        "model, diffusion_pytorch_model, adapter_model or pytorch_lora_weights (one file or "
        "a complete shard set with its index, default precision or fp16/bf16) are loaded; "
        "use a revision that ships them"
    )
