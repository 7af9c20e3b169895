"""Loaders: a snapshot directory turned into the object a model parameter's annotation asks for.

The annotated type picks the loader:

* ``pathlib.Path`` / ``str``: the snapshot directory itself (nothing is loaded);
* a ``diffusers.DiffusionPipeline`` subclass: ``from_pretrained`` with the dtype the model's
  attributes ask for and the weight variant the snapshot holds, then placed through the
  low-VRAM ladder (:func:`gen_worker.low_vram.place_pipeline`);
* a transformers class (``AutoModel*``, ``AutoTokenizer``, ``AutoProcessor``, any
  ``PreTrainedModel`` subclass): ``from_pretrained``; models are moved to the device and put in
  eval mode;
* any other class with a ``from_pretrained(path)`` classmethod;
* ``object`` / ``Any``: what the snapshot looks like (``model_index.json``: a diffusers
  pipeline; ``config.json``: a transformers model), else the directory.

torch, diffusers and transformers are imported only here and only when a load needs them: an
endpoint that injects paths never imports them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_worker.errors import ModelLoadError

__all__ = [
    "Loaded",
    "describe_loader",
    "detect_variant",
    "is_path_target",
    "load_snapshot",
    "loader_kind",
    "object_size_bytes",
    "read_ahead",
    "torch_dtype",
]

Emit = Callable[[str, dict[str, Any]], None]

#: Attribute values naming a precision, as the hub's snapshot attributes and flavors spell them.
_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
}


@dataclass(slots=True)
class Loaded:
    """A loaded model and what the cache needs to know about it."""

    obj: Any
    #: Bytes of weights the object holds (0 for a directory).
    size_bytes: int
    #: ``path``, ``diffusers``, ``transformers``, ``tokenizer`` or ``from_pretrained``.
    kind: str
    #: Stateful objects (pipelines with a scheduler, fast tokenizers) serve one request at a
    #: time; plain ``nn.Module`` forwards and paths are shared freely.
    exclusive: bool
    placement: dict[str, Any] | None = None


def is_path_target(target: Any) -> bool:
    """The parameter wants the snapshot directory itself."""
    return target is Path or target is str


def _mro_names(target: Any) -> list[tuple[str, str]]:
    if not inspect.isclass(target):
        return []
    return [(k.__module__, k.__name__) for k in inspect.getmro(target)]


def loader_kind(target: Any, snapshot: Path | None = None) -> str:
    """Which loader serves ``target`` (``snapshot`` lets ``object`` look at the files)."""
    if target is Path or target is str:
        return "path"
    if target is object or target is Any:
        return _kind_of_files(snapshot)
    names = _mro_names(target)
    kind = "unsupported"
    if any(mod.startswith("diffusers") and name == "DiffusionPipeline" for mod, name in names):
        kind = "diffusers"
    elif any(mod.startswith("transformers") for mod, _ in names):
        lowered = target.__name__.lower()
        kind = "tokenizer" if "tokenizer" in lowered or "processor" in lowered else "transformers"
    elif callable(getattr(target, "from_pretrained", None)):
        kind = "from_pretrained"
    return kind


def _kind_of_files(snapshot: Path | None) -> str:
    if snapshot is not None and (snapshot / "model_index.json").is_file():
        return "diffusers"
    if snapshot is not None and (snapshot / "config.json").is_file():
        return "transformers"
    return "path"


def describe_loader(target: Any, snapshot: Path | None = None) -> str:
    """The loader's name in messages: ``diffusers:StableDiffusionPipeline.from_pretrained``."""
    kind = loader_kind(target, snapshot)
    name = getattr(target, "__qualname__", repr(target))
    if kind == "path":
        return f"path:{name}"
    if target is object or target is Any:
        return f"{kind}:auto"
    return f"{kind}:{name}.from_pretrained"


def torch_dtype(attributes: Mapping[str, Sequence[str] | str]) -> Any:
    """The torch dtype the attributes ask for (first preference), or None for the saved one."""
    values = attributes.get("dtype") or attributes.get("dtypes") or attributes.get("precision")
    if values is None:
        return None
    first = values if isinstance(values, str) else (values[0] if values else None)
    name = _DTYPES.get(str(first).lower()) if first else None
    if name is None:
        return None
    import torch  # noqa: PLC0415  # only a load that asks for a dtype needs it

    return getattr(torch, name)


def detect_variant(snapshot: Path) -> str | None:
    """The weight variant (``fp16`` in ``*.fp16.safetensors``) when every weight file has it.

    diffusers looks for ``<name>.<variant>.safetensors`` only when asked; a snapshot published
    with variant files alone would otherwise fail to load.
    """
    weights = [p.name for p in snapshot.rglob("*.safetensors")]
    if not weights:
        return None
    variants = {name.split(".")[-2] if name.count(".") >= 2 else None for name in weights}
    if len(variants) == 1:
        (only,) = variants
        return only
    return None


def object_size_bytes(obj: Any) -> int:
    """Bytes of parameters and buffers of every torch module in ``obj`` (each tensor once)."""
    torch = _torch_if_loaded()
    if torch is None:
        return 0
    modules: list[Any] = []
    if isinstance(obj, torch.nn.Module):
        modules.append(obj)
    components = getattr(obj, "components", None)
    if isinstance(components, Mapping):
        modules.extend(c for c in components.values() if isinstance(c, torch.nn.Module))
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _torch_if_loaded() -> Any:
    import sys  # noqa: PLC0415

    return sys.modules.get("torch")


def load_snapshot(
    snapshot: Path,
    target: Any,
    *,
    model_id: str,
    device: str,
    attributes: Mapping[str, Sequence[str] | str] | None = None,
    emit: Emit | None = None,
) -> Loaded:
    """Load ``snapshot`` as ``target`` and place it on ``device``; ModelLoadError on failure.

    Runs in a worker thread (loading is blocking I/O and compute).
    """
    kind = loader_kind(target, snapshot)
    loader = describe_loader(target, snapshot)
    if kind == "unsupported":
        raise ModelLoadError(
            model_id,
            loader,
            f"cannot load a model as {getattr(target, '__qualname__', target)!r}: annotate the "
            "parameter as Path, str, a diffusers pipeline, a transformers class, or a class "
            "with a from_pretrained(path) classmethod",
        )
    if kind == "path":
        return Loaded(str(snapshot) if target is str else snapshot, 0, kind, exclusive=False)
    reader = read_ahead(snapshot) if kind != "tokenizer" else None
    try:
        return _load(
            snapshot, target, kind, model_id, device=device, attributes=attributes or {}, emit=emit
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            raise  # the caller (or the ladder) decides; an OOM is not a broken snapshot
        raise ModelLoadError(model_id, loader, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if reader is not None:
            reader.join()  # pages it read are the load's anyway; bounded by the files' size


def _load(
    snapshot: Path,
    target: Any,
    kind: str,
    model_id: str,
    *,
    device: str,
    attributes: Mapping[str, Sequence[str] | str],
    emit: Emit | None,
) -> Loaded:
    if kind == "diffusers":
        return _load_diffusers(
            snapshot, target, model_id, device=device, attributes=attributes, emit=emit
        )
    if kind in ("transformers", "tokenizer"):
        return _load_transformers(snapshot, target, kind, device, attributes)
    obj = target.from_pretrained(str(snapshot))
    return Loaded(obj, object_size_bytes(obj), kind, exclusive=True)


def read_ahead(snapshot: Path) -> threading.Thread | None:
    """Read the snapshot's weight files into the page cache in a thread, while the library
    builds the model from its class (it touches the weights only afterwards).

    A snapshot on disk but not in memory (a restart) then loads in about the time its bytes
    take to read instead of that plus the build; large sequential reads also beat the small
    ones that page faults on a memory map make. Where ``os.sendfile`` is missing (not Linux)
    nothing is read ahead. Skipped when the weights would not fit in half
    the available RAM: reading them ahead would only push other pages out.
    """
    files = [p for p in snapshot.rglob("*.safetensors") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    from gen_worker.low_vram.probes import available_ram_bytes  # noqa: PLC0415

    available = available_ram_bytes()
    if not files or available is None or total > available // 2 or _in_page_cache(files):
        return None

    def read_all() -> None:
        # sendfile to /dev/null pulls the pages into the cache without copying them out:
        # ~17 ms of CPU for 500 MiB already cached, where reading them costs ~230 ms.
        with contextlib.suppress(OSError):  # a hint only: the load reads what it needs
            sink = os.open(os.devnull, os.O_WRONLY)
            try:
                for path in files:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        offset = 0
                        while (sent := os.sendfile(sink, fd, offset, _READ_AHEAD_CHUNK)) > 0:
                            offset += sent
                    finally:
                        os.close(fd)
            finally:
                os.close(sink)

    thread = threading.Thread(target=read_all, name="gen-worker-read-ahead", daemon=True)
    thread.start()
    return thread


#: Bytes per sendfile call of the read-ahead thread.
_READ_AHEAD_CHUNK = 64 << 20
#: Places per file probed for being in the page cache already.
_PROBES = 16


def _in_page_cache(files: Sequence[Path]) -> bool:
    """Whether the files look cached already: a one-byte read at evenly spaced places that
    must not wait for the disk (``RWF_NOWAIT``) succeeds everywhere. The read-ahead thread
    would then only compete with the load for the CPU (about 20% of a warm 500 MiB load).
    False where the flag is missing (not Linux) or a probe finds a page on disk."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    one = bytearray(1)
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                for i in range(_PROBES):
                    os.preadv(fd, [one], size * i // _PROBES, nowait)
                if size:
                    os.preadv(fd, [one], size - 1, nowait)
            finally:
                os.close(fd)
    except OSError:  # BlockingIOError: a page is on disk only; anything else: not known
        return False
    return True


def _is_oom(exc: BaseException) -> bool:
    from gen_worker.low_vram import is_oom_error  # noqa: PLC0415

    return is_oom_error(exc)


def _load_diffusers(
    snapshot: Path,
    target: Any,
    model_id: str,
    *,
    device: str,
    attributes: Mapping[str, Sequence[str] | str],
    emit: Emit | None,
) -> Loaded:
    diffusers = importlib.import_module("diffusers")
    if target is object or target is Any:
        target = diffusers.DiffusionPipeline
    _quiet_progress_bars()
    kwargs: dict[str, Any] = {}
    dtype = torch_dtype(attributes)
    if dtype is not None:
        # Newer diffusers name it ``dtype`` and warn about ``torch_dtype``; older ones know only
        # ``torch_dtype``. The helper that accepts both marks the newer API.
        utils = importlib.import_module("diffusers.pipelines.pipeline_utils")
        kwargs["dtype" if hasattr(utils, "_resolve_dtype") else "torch_dtype"] = dtype
    variant = detect_variant(snapshot)
    if variant is not None:
        kwargs["variant"] = variant
    pipeline = target.from_pretrained(str(snapshot), **kwargs)
    configure_bars = getattr(pipeline, "set_progress_bar_config", None)
    if callable(configure_bars):
        configure_bars(disable=True)  # one bar per denoising call, in every request's stderr
    size = object_size_bytes(pipeline)
    from gen_worker.low_vram import place_pipeline  # noqa: PLC0415

    placement = place_pipeline(pipeline, device, model_id=model_id, size_bytes=size, emit=emit)
    return Loaded(pipeline, size, "diffusers", exclusive=True, placement=placement)


def _quiet_progress_bars() -> None:
    """tqdm bars on stderr would interleave with the worker's JSON log lines."""
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError, AttributeError):
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()


def _load_transformers(
    snapshot: Path,
    target: Any,
    kind: str,
    device: str,
    attributes: Mapping[str, Sequence[str] | str],
) -> Loaded:
    _quiet_progress_bars()
    if target is object or target is Any:
        target = _auto_transformers_class(snapshot)
    if kind == "tokenizer":
        # Fast tokenizers refuse concurrent use from several threads ("Already borrowed").
        return Loaded(target.from_pretrained(str(snapshot)), 0, kind, exclusive=True)
    kwargs: dict[str, Any] = {}
    dtype = torch_dtype(attributes)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = _direct(target, snapshot, dtype)
    if model is None:
        model = target.from_pretrained(str(snapshot), **kwargs)
    # Both walk every module: skipped when from_pretrained already did it (the CPU case).
    to = getattr(model, "to", None)
    if callable(to) and str(getattr(model, "device", "")) != device:
        model = to(device)
    evaluate = getattr(model, "eval", None)
    if callable(evaluate) and getattr(model, "training", True):
        evaluate()
    return Loaded(model, object_size_bytes(model), kind, exclusive=False)


def _direct(target: Any, snapshot: Path, dtype: Any) -> Any:
    """The fast path of :mod:`.direct_load`, or None to use ``from_pretrained``.

    Anything it trips over (other than running out of memory) sends the load to
    ``from_pretrained``, which reports a broken snapshot in its own words.
    """
    from gen_worker.injection.direct_load import load_direct  # noqa: PLC0415

    try:
        return load_direct(target, snapshot, dtype)
    except Exception as exc:
        if _is_oom(exc):
            raise
        return None


def _auto_transformers_class(snapshot: Path) -> Any:
    """``AutoModel`` for a plain config; the head class the config's architectures name."""
    transformers = importlib.import_module("transformers")
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return transformers.AutoModel
    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None:
            return cls
    return transformers.AutoModel
