"""Models and functions for benchmarks/model_load.py.

* :func:`build_sized_bert`: a transformers ``BertModel`` folder (``config.json`` and one
  ``model.safetensors`` of seeded random weights) scaled to a given size, written without ever
  building the model's weights in memory (the structure comes from a model on the meta device);
* :func:`touch_pages`: fault in every page of a set of tensors, the same way for every side of
  a comparison (safetensors and transformers both map the file; nothing is read until used);
* :func:`with_model` / :func:`without_model`: async no-op worker functions, with one FIXED
  injected pipeline and without, for the engine's per-request cost of an injected model.

torch, transformers and diffusers are needed: the benchmark is about loading real models.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import torch
from diffusers import StableDiffusionPipeline

from gen_worker import ModelRef, ModelRefSource, RequestContext, worker_function

__all__ = [
    "PIPE_KEY",
    "BertFolder",
    "In",
    "Out",
    "build_sized_bert",
    "tests_module",
    "touch_pages",
    "with_model",
    "without_model",
]

#: The [models] key the engine's no-op function injects.
PIPE_KEY = "pipe"
TESTS = Path(__file__).resolve().parents[1] / "tests"
PAGE = 4096
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def tests_module(name: str) -> Any:
    """A module of the test suite (tiny model builders, the dev-runner server helper)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


# -- a BERT of a given size ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BertFolder:
    path: Path
    weights: Path
    tensors: int
    params: int
    hidden: int
    layers: int
    vocab: int


def _config(hidden: int, layers: int, vocab: int, dtype: str) -> Any:
    from transformers import BertConfig  # noqa: PLC0415

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        dtype=str(_DTYPES[dtype]).removeprefix("torch."),
    )
    config.architectures = ["BertModel"]
    return config


def _meta_state(config: Any) -> dict[str, torch.Tensor]:
    """Names and shapes of the weights, from a model built on the meta device (no memory)."""
    from transformers import BertModel  # noqa: PLC0415

    with torch.device("meta"):
        model = BertModel(config)
    return dict(model.state_dict())


def _numel(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def build_sized_bert(folder: Path, size_bytes: int, dtype: str = "fp16") -> BertFolder:
    """A ``BertModel`` folder whose ``model.safetensors`` holds about ``size_bytes`` of weights.

    A quarter of the budget goes to the word embeddings, the rest to as many encoder layers as
    fit, then the vocabulary is sized to make up the difference: the file is within one
    embedding row of the target.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    itemsize = _DTYPES[dtype].itemsize
    target = max(size_bytes // itemsize, 1)
    hidden = next(h for h in (1024, 256, 64) if 12 * h * h * 4 <= target * 3 or h == 64)
    one_layer = _numel(_meta_state(_config(hidden, 2, 128, dtype))) - _numel(
        _meta_state(_config(hidden, 1, 128, dtype))
    )
    layers = max(1, min(24, (target * 3 // 4) // one_layer))
    rest = _numel(_meta_state(_config(hidden, layers, 128, dtype))) - 128 * hidden
    vocab = max(128, (target - rest) // hidden)
    config = _config(hidden, layers, vocab, dtype)
    state = _meta_state(config)
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: (torch.randn(meta.shape, generator=generator) * 0.02).to(_DTYPES[dtype])
        for name, meta in state.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return BertFolder(
        folder, folder / "model.safetensors", len(weights), _numel(state), hidden, layers, vocab
    )


def touch_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every page of every tensor (and its last byte): after this, all of
    their bytes are in this process's memory, however they were loaded. Returns a checksum so
    the reads cannot be skipped."""
    total = 0
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::PAGE].sum()) + int(flat[-1])
    return total


# -- no-op functions for the engine ---------------------------------------------------------------


class In(msgspec.Struct):
    x: int = 0


class Out(msgspec.Struct):
    x: int


@worker_function()
async def with_model(
    ctx: RequestContext,
    pipe: Annotated[StableDiffusionPipeline, ModelRef(ModelRefSource.FIXED, PIPE_KEY)],
    payload: In,
) -> Out:
    return Out(x=payload.x)


@worker_function()
async def without_model(ctx: RequestContext, payload: In) -> Out:
    return Out(x=payload.x)
