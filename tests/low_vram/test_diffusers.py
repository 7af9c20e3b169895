"""The ladder on a real (tiny, random-weight) diffusers StableDiffusionPipeline, on CPU.

The offload transitions run with the CPU as the "accelerator": the public API refuses to
offload without CUDA, so those tests drive the ladder's transition step directly. They check
that every step keeps the pipeline producing the same image, and that leaving group offload
(including disk offload) restores every weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gen_worker import apply_low_vram_config
from gen_worker.low_vram import estimate_pipeline_bytes, place_pipeline
from gen_worker.low_vram.ladder import _offload, _State
from gen_worker.low_vram.settings import load_low_vram_settings

from .fakes import VAE_ON, Events, payload

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

GIB = 1024**3


def _tokenizer(tmp: Path) -> Any:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16
    )


@pytest.fixture
def pipe(tmp_path: Path) -> Any:
    """A StableDiffusionPipeline of a few hundred KB with random weights."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(tmp_path)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipeline = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _image(pipeline: Any) -> Any:
    generator = torch.Generator("cpu").manual_seed(7)
    out = pipeline(
        "a cat",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=generator,
    )
    return out.images


def test_the_size_estimate_counts_every_weight_and_buffer(pipe: Any) -> None:
    expected = sum(
        t.numel() * t.element_size()
        for module in (pipe.unet, pipe.vae, pipe.text_encoder)
        for t in (*module.parameters(), *module.buffers())
    )
    assert 100_000 < expected < 2_000_000  # "a few hundred KB"
    assert estimate_pipeline_bytes(pipe) == expected


def test_cpu_placement_then_vae_only_really_enables_slicing_and_tiling(pipe: Any) -> None:
    events = Events()
    before = _image(pipe)
    placed = place_pipeline(pipe, "cpu", model_id="tiny/sd", emit=events)
    assert placed == payload(model_id="tiny/sd")
    assert pipe.device.type == "cpu"
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (False, False)

    result = apply_low_vram_config(pipe, mode="vae_only", emit=events)
    assert result == payload(
        model_id="tiny/sd",
        requested_mode="vae_only",
        selected_mode="vae_only",
        applied_mode="vae_only",
        changed=True,
        **VAE_ON,
    )
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (True, True)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    assert events.types == ["low_vram_mode_applied"] * 2
    # Slicing changes how the work is split, not the image.
    assert torch.allclose(torch.from_numpy(_image(pipe)), torch.from_numpy(before), atol=1e-5)


def test_offload_transitions_keep_the_image_and_restore_every_weight(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COZY_INFERENCE_AUTO_DISK_OFFLOAD", "1")
    monkeypatch.setenv("COZY_OFFLOAD_DIR", str(tmp_path / "offload"))
    settings = load_low_vram_settings()
    reference = torch.from_numpy(_image(pipe))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state = _State(device="cpu", model_id="tiny/sd")
    # accelerate's sequential offload cannot use the CPU as its accelerator (it fails inside
    # accelerate), so the last step records the call; gpu_check.py runs it for real on CUDA.
    sequential_calls: list[Any] = []
    pipe.enable_sequential_cpu_offload = lambda device=None: sequential_calls.append(device)

    for target, enabler in (
        ("model_offload", "model_cpu_offload"),
        ("group_offload", "group_offload"),
        ("sequential", "sequential_cpu_offload"),
    ):
        result = _offload(pipe, state, target, settings, ram=GIB)
        assert result.enabled, (target, result)
        state.enablers[enabler] = True
        state.step = target
        assert torch.allclose(torch.from_numpy(_image(pipe)), reference, atol=1e-5), target
        if target == "group_offload":
            assert state.enablers["model_cpu_offload"] is False
            assert state.enablers["disk_offload"] is True
            [directory] = list((tmp_path / "offload").iterdir())
            assert directory.name.startswith("tiny-sd-")
            assert len(list(directory.glob("*.safetensors"))) > 10

    assert sequential_calls == ["cpu"]
    assert state.enablers == {
        "vae_slicing": False,
        "vae_tiling": False,
        "attention_slicing": False,
        "model_cpu_offload": False,
        "group_offload": False,
        "sequential_cpu_offload": True,
        "disk_offload": False,
    }
    # Group offload is gone: no diffusers group hook is left on any module...
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            assert registry is None or registry.get_hook("group_offloading") is None
            assert not hasattr(sub, "_hf_hook")
    # ...its files were read back and removed, and the weights are the original ones, as
    # ordinary parameters on the CPU.
    assert list((tmp_path / "offload").rglob("*.safetensors")) == []
    restored = dict(pipe.unet.named_parameters())
    assert restored.keys() <= weights.keys()
    for key, value in restored.items():
        assert type(value) is torch.nn.Parameter, key
        assert value.device.type == "cpu", key
        assert torch.equal(value.detach(), weights[key]), key
