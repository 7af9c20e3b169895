"""The tiny test models: built offline, saved as safetensors only, loadable and runnable on CPU."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fixtures.tiny_models import BERT_HIDDEN_SIZE, SD_IMAGE_SIZE, build_tiny_bert, loopback_only

torch = pytest.importorskip("torch")

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".pkl"}


def weight_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_tiny_sd_is_a_small_safetensors_pipeline(tiny_sd_dir: Path) -> None:
    assert weight_files(tiny_sd_dir) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert folder_bytes(tiny_sd_dir) < 10 << 20
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_tiny_sd_loads_and_renders_on_cpu(tiny_sd_dir: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    with loopback_only():
        pipeline = diffusers.DiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.device.type == "cpu"
    pipeline.set_progress_bar_config(disable=True)

    def render() -> object:
        return pipeline(
            "a photo of a cat",
            num_inference_steps=2,
            height=SD_IMAGE_SIZE,
            width=SD_IMAGE_SIZE,
            output_type="np",
            generator=torch.Generator().manual_seed(7),
        ).images

    with loopback_only():
        images = render()
    assert images.shape == (1, SD_IMAGE_SIZE, SD_IMAGE_SIZE, 3)
    assert images.dtype.name == "float32"
    assert 0.0 <= images.min() <= images.max() <= 1.0
    # Seeded generation is reproducible: the same image, bit for bit.
    assert (render() == images).all()


def test_tiny_clip_tokenizer_knows_its_words(tiny_sd_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    ids = tokenizer("a photo of a cat").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                      "<|endoftext|>"]  # fmt: skip
    # Unknown words fall back to bytes rather than failing.
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra").input_ids)[1:-1] == [
        "z", "e", "b", "r", "a</w>"
    ]  # fmt: skip


def test_tiny_bert_loads_and_embeds_on_cpu(tiny_bert_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    assert weight_files(tiny_bert_dir) == {"model.safetensors"}
    assert folder_bytes(tiny_bert_dir) < 1 << 20
    with loopback_only():
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
        model = transformers.AutoModel.from_pretrained(tiny_bert_dir)
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(["the cat sat on the mat", "hello world"], padding=True, return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[1].tolist()) == [
        "[CLS]", "hello", "world", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"
    ]  # fmt: skip
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, 8, BERT_HIDDEN_SIZE)
    assert torch.isfinite(hidden).all()


def test_builds_are_deterministic_and_leave_the_global_rng_alone(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    state = torch.random.get_rng_state()
    again = build_tiny_bert(tmp_path / "again")
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (tiny_bert_dir / weights).read_bytes()


def test_loopback_only_refuses_and_reports_the_network() -> None:
    with pytest.raises(AssertionError) as failed, loopback_only() as attempts:
        with pytest.raises(ConnectionRefusedError, match=r"lookup of '192\.0\.2\.1' refused"):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
        sock = socket.socket()
        with sock, pytest.raises(ConnectionRefusedError, match=r"connect to \('192\.0\.2\.1'"):
            sock.connect(("192.0.2.1", 80))
        with pytest.raises(ConnectionRefusedError, match=r"lookup of 'example\.invalid'"):
            socket.getaddrinfo("example.invalid", 443)
    assert str(failed.value) == (
        "an offline step tried the network: lookup of '192.0.2.1', "
        "connect to ('192.0.2.1', 80), lookup of 'example.invalid'"
    )
    assert len(attempts) == 3
    # Loopback still works inside the block, and the real functions are back after it.
    assert socket.socket.connect.__qualname__ == "socket.connect"
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        loopback_only() as attempts,
        socket.create_connection(server.getsockname(), timeout=5),
    ):
        assert attempts == []
    assert attempts == []
