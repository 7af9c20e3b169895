"""The transformers fast path (gen_worker.injection.direct_load) against from_pretrained.

Each model here is built from random weights at test time and saved with ``save_pretrained``;
the fast path must give the model ``from_pretrained`` gives (same tensors, buffers, dtype,
outputs), and must step aside (return None, nothing built) wherever it would not.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from gen_worker.injection import direct_load  # noqa: E402
from gen_worker.injection.direct_load import load_direct, weight_files  # noqa: E402
from gen_worker.injection.loaders import load_snapshot  # noqa: E402


def _tiny_config(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "max_position_embeddings": 32,
    }
    values.update(overrides)
    return transformers.BertConfig(**values)


def _save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def _same_model(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    assert not ours.training
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    for key, tensor in their_state.items():
        assert ours_state[key].dtype == tensor.dtype, key
        assert torch.equal(ours_state[key], tensor), key
    ours_buffers, their_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert ours_buffers.keys() == their_buffers.keys()
    for key, buffer in their_buffers.items():
        assert torch.equal(ours_buffers[key], buffer), key
    assert ours.config.dtype == theirs.config.dtype
    assert ours.config._attn_implementation == theirs.config._attn_implementation
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_fast_path_gives_the_model_from_pretrained_gives(tmp_path: Path, dtype: Any) -> None:
    torch.manual_seed(0)
    saved = _save(transformers.BertModel(_tiny_config()).to(dtype), tmp_path / "bert")
    ours = load_direct(transformers.BertModel, saved, None)
    assert ours is not None
    _same_model(ours, transformers.BertModel.from_pretrained(saved))
    assert ours.config.name_or_path == str(saved)
    # An Auto class is resolved to the class the config names; the dtype asked for matches.
    auto = load_direct(transformers.AutoModel, saved, dtype)
    assert type(auto) is transformers.BertModel


def test_sharded_checkpoints_are_read_from_their_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = _save(transformers.BertModel(_tiny_config()), tmp_path / "bert", max_shard_size="20KB")
    files = weight_files(saved)
    assert files is not None and len(files) > 1
    assert all(f.name.startswith("model-") for f in files)
    ours = load_direct(transformers.BertModel, saved, None)
    assert ours is not None
    _same_model(ours, transformers.BertModel.from_pretrained(saved))


def test_an_index_naming_a_file_outside_the_snapshot_is_not_followed(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    index = {"weight_map": {"a.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(folder) is None
    (folder / "model.safetensors.index.json").write_text("{not json")
    assert weight_files(folder) is None
    assert weight_files(tmp_path) is None  # no weights at all


def _refusals(tmp_path: Path) -> dict[str, tuple[Any, Path, Any]]:
    torch.manual_seed(0)
    bert = _save(transformers.BertModel(_tiny_config()), tmp_path / "bert")
    # A checkpoint of another head: its keys carry the "bert." prefix and a tied decoder.
    head = _save(transformers.BertForMaskedLM(_tiny_config()), tmp_path / "masked")
    # Weights saved in fp16 under a config that says float32: from_pretrained casts.
    mixed = _save(transformers.BertModel(_tiny_config()), tmp_path / "mixed")
    config = json.loads((mixed / "config.json").read_text())
    state = transformers.BertModel.from_pretrained(mixed).half().state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(mixed / "model.safetensors"))
    config["dtype"] = "float32"
    (mixed / "config.json").write_text(json.dumps(config))
    quantized = _save(transformers.BertModel(_tiny_config()), tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    # Only a pickled checkpoint (an old snapshot): never read by the fast path.
    pickled = _save(transformers.BertModel(_tiny_config()), tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    generative = _save(transformers.GPT2LMHeadModel(gpt2), tmp_path / "gpt2")
    return {
        "another head's checkpoint": (transformers.BertModel, head, None),
        "a dtype other than the file's": (transformers.BertModel, bert, torch.bfloat16),
        "a config dtype other than the file's": (transformers.BertModel, mixed, None),
        "a quantized config": (transformers.BertModel, quantized, None),
        "pickled weights": (transformers.BertModel, pickled, None),
        "a model that generates": (transformers.GPT2LMHeadModel, generative, None),
        "a class that is not a model": (transformers.BertTokenizerFast, bert, None),
    }


def test_the_fast_path_steps_aside_where_it_would_not_match_from_pretrained(
    tmp_path: Path,
) -> None:
    for case, (target, snapshot, dtype) in _refusals(tmp_path).items():
        assert load_direct(target, snapshot, dtype) is None, case


def test_random_initialisation_is_skipped_only_in_the_loading_thread() -> None:
    inside = torch.zeros(1000)
    elsewhere = torch.zeros(1000)
    started, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.wait(10)
        torch.nn.init.normal_(elsewhere)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with direct_load._skipping_random_init():
        started.set()
        assert done.wait(10)
        torch.nn.init.normal_(inside)
        inside.uniform_()
        torch.nn.init.kaiming_uniform_(inside.view(10, 100))
        torch.nn.init.ones_(inside[:10])  # not random: applied
    thread.join(10)
    assert float(elsewhere.std()) > 0.5  # initialised for real
    assert inside[:10].eq(1).all() and inside[10:].eq(0).all()
    torch.nn.init.normal_(inside)  # the mode is gone once the load is done
    assert float(inside.std()) > 0.5


def test_the_loader_uses_the_fast_path_and_falls_back_when_it_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    saved = _save(transformers.BertModel(_tiny_config()), tmp_path / "bert")
    reference = transformers.BertModel.from_pretrained(saved)

    def no_from_pretrained(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained was called")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.BertModel, "from_pretrained", no_from_pretrained)
        loaded = load_snapshot(saved, transformers.BertModel, model_id="acme/bert", device="cpu")
    _same_model(loaded.obj, reference)
    assert loaded.kind == "transformers" and not loaded.exclusive
    tensors = [*reference.parameters(), *reference.buffers()]
    assert loaded.size_bytes == sum(t.numel() * t.element_size() for t in tensors)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the fast path tripped")

    monkeypatch.setattr(direct_load, "load_direct", broken)
    fallback = load_snapshot(saved, transformers.BertModel, model_id="acme/bert", device="cpu")
    _same_model(fallback.obj, reference)
