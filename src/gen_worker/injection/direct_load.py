"""The fast path for transformers models stored as safetensors: build, then adopt the weights.

``PreTrainedModel.from_pretrained`` builds the model on the meta device (running every
module's random initialisation there: about 20 ms of Python for a 15-layer BERT), then copies
each tensor out of the file through a thread pool, then re-creates the buffers. For a model
whose files are plain, this module does the same job with less: the model is built on the
CPU with random initialisation skipped (its untouched weight memory costs nothing until
used), and ``load_state_dict(assign=True)`` adopts the tensors safetensors maps from the file,
so no weight byte is copied on the CPU. A 500 MiB BERT loads in about half the time
``from_pretrained`` takes (``benchmarks/model_load.py``, section a).

It applies only where the result is the same model ``from_pretrained`` would return; in every
other case :func:`load_direct` returns None before anything is built and the caller uses
``from_pretrained``:

* the class is a concrete ``PreTrainedModel`` subclass (not an ``Auto*`` class) that does not
  generate (no generation config to load) and keeps no module in fp32;
* the weights are ``model.safetensors`` or the shards its index lists, with one floating dtype,
  equal to the dtype asked for (or to the config's own, when neither asks);
* the config carries no quantization;
* the checkpoint's keys are exactly the model's state-dict keys (a checkpoint saved from
  another head, with tied weights left out, or with renamed keys needs transformers' key
  mapping);
* no buffer left out of the state dict is floating point (transformers builds those in the
  load's dtype; integer ones, such as position ids, come out identical).

Skipping random initialisation uses a ``TorchFunctionMode``, which torch keeps per thread: a
request running in another thread while a model loads initialises its own tensors normally.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["load_direct", "weight_files"]

#: Random initialisers (``torch.nn.init.*`` and the in-place tensor methods they use): every
#: weight they would fill is replaced by the checkpoint's right after the build.
_RANDOM_INITS = frozenset(
    {
        "uniform_",
        "normal_",
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
        "sparse_",
    }
)
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def weight_files(snapshot: Path) -> list[Path] | None:
    """The safetensors files of a transformers snapshot, or None when it has another layout."""
    single = snapshot / _SINGLE
    if single.is_file():
        return [single]
    index = snapshot / _INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    files = [snapshot / name for name in names]
    # A shard named outside the snapshot, or missing, is for from_pretrained to report.
    if not files or any(
        Path(name).name != name or not f.is_file() for name, f in zip(names, files, strict=True)
    ):
        return None
    return files


@functools.cache
def _skip_random_init_mode() -> type:
    """The TorchFunctionMode class (built on first use: torch is imported only when needed)."""
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415

    class SkipRandomInit(TorchFunctionMode):
        def __torch_function__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in _RANDOM_INITS:
                # The tensor being filled: positional, or ``tensor=`` / ``self=`` by keyword.
                return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            return func(*args, **kwargs)

    return SkipRandomInit


@contextlib.contextmanager
def _skipping_random_init() -> Iterator[None]:
    with _skip_random_init_mode()():
        yield


def _config_dtype(config: Any, torch: Any) -> Any:
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _applies_to_class(target: Any, transformers: Any) -> bool:
    if not isinstance(target, type) or not issubclass(target, transformers.PreTrainedModel):
        return False
    if getattr(target, "_keep_in_fp32_modules", None) or getattr(
        target, "_keep_in_fp32_modules_strict", None
    ):
        return False
    can_generate = getattr(target, "can_generate", None)
    try:
        return not (callable(can_generate) and can_generate())
    except Exception:  # a class that cannot answer is left to from_pretrained
        return False


def _non_persistent_buffers(model: Any) -> Iterator[Any]:
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buffer = module._buffers.get(name)
            if buffer is not None:
                yield buffer


def _concrete_class(target: Any, snapshot: Path, transformers: Any) -> Any:
    """The model class an ``Auto*`` class would pick for the snapshot's config; else target."""
    mapping = getattr(target, "_model_mapping", None)
    if mapping is None or (
        isinstance(target, type) and issubclass(target, transformers.PreTrainedModel)
    ):
        return target
    try:
        config = transformers.AutoConfig.from_pretrained(str(snapshot))
        return mapping[type(config)]
    except Exception:  # no mapping for it: from_pretrained says why
        return None


def _checkpoint(
    target: Any, snapshot: Path, dtype: Any | None
) -> tuple[Any, dict[str, Any]] | None:
    """The config and the mapped tensors, or None when the files rule the fast path out."""
    files = weight_files(snapshot)
    if files is None:
        return None
    torch = importlib.import_module("torch")
    load_file = importlib.import_module("safetensors.torch").load_file
    config = target.config_class.from_pretrained(str(snapshot))
    if getattr(config, "quantization_config", None) is not None:
        return None
    state: dict[str, Any] = {}
    for path in files:
        state.update(load_file(str(path)))
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    wanted = dtype if dtype is not None else _config_dtype(config, torch)
    if len(floats) > 1 or (wanted is not None and floats and floats != {wanted}):
        return None
    if floats:
        (config.dtype,) = floats  # what from_pretrained records for the dtype it loaded
    return config, state


def load_direct(target: Any, snapshot: Path, dtype: Any | None) -> Any | None:
    """``target`` built from ``snapshot`` with the file's tensors adopted, in eval mode, on the
    CPU; None when the fast path does not apply (see the module docstring)."""
    transformers = importlib.import_module("transformers")
    target = _concrete_class(target, snapshot, transformers)
    if not _applies_to_class(target, transformers):
        return None
    checkpoint = _checkpoint(target, snapshot, dtype)
    if checkpoint is None:
        return None
    config, state = checkpoint
    with _skipping_random_init():
        model = target(config)
    same_keys = set(model.state_dict()) == set(state)
    if not same_keys or any(b.is_floating_point() for b in _non_persistent_buffers(model)):
        return None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:  # a shape that does not match the config: from_pretrained explains
        return None
    config._name_or_path = str(snapshot)
    model.eval()
    return model
