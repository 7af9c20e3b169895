"""Run the low-VRAM ladder for real on a CUDA device, with tiny random-weight pipelines.

    uv run --no-sync python scripts/gpu_check.py [--require-cuda] [--device cuda:0]

Checks, each with one inference: placement under every ladder step (forced through
COZY_INFERENCE_MEMORY_MODE, the way an operator would), group offload with disk offload, the
escalation chain on one live pipeline (model -> group -> sequential, then the top), an OOM
while placing (VRAM filled by a tensor) that escalates, and an OOM during inference that
with_oom_retry escalates and then succeeds. Every ladder event is printed on stdout as one
JSON line ``{"check", "event_type", "payload"}``; the last line is the summary. Takes well
under a minute on an H100 (mostly imports and building the models).

Exit codes:
    0  every check passed; or no CUDA device, after printing "no CUDA device: nothing to check"
    1  a check failed; stderr says which and why
    2  torch, diffusers, transformers or accelerate is not installed
    3  no CUDA device and --require-cuda was given
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_MISSING, EXIT_NO_CUDA = 0, 1, 2, 3
MIB = 1024**2
ENABLER = {
    "off": None,
    "vae_only": "vae_slicing",
    "model_offload": "model_cpu_offload",
    "group_offload": "group_offload",
    "sequential": "sequential_cpu_offload",
}

try:
    import torch
except ImportError:
    print("gpu_check: torch is not installed (install the torch extra)", file=sys.stderr)
    sys.exit(EXIT_MISSING)


class CheckFailed(Exception):
    """One check did not behave as the ladder promises."""


class Recorder:
    """The ladder's ``emit``: prints each event as a JSON line and keeps it."""

    def __init__(self) -> None:
        self.check = ""
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event_type: str, payload: dict[str, Any]) -> None:
        self.events.append((event_type, payload))
        line = {"check": self.check, "event_type": event_type, "payload": payload}
        print(json.dumps(line, sort_keys=True), flush=True)

    def start(self, check: str) -> None:
        self.check = check
        self.events.clear()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@contextmanager
def env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def heavy(name: str) -> Any:
    """A torch-family module, imported once CUDA is known to exist (and typed loosely: the
    diffusers constructors are untyped)."""
    return importlib.import_module(name)


def tokenizer(directory: Path) -> Any:
    transformers = heavy("transformers")

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16
    )


def build_pipeline(directory: Path, *, medium: bool = False) -> Any:
    """A StableDiffusionPipeline with random weights: a few hundred KB, or (``medium``) a
    UNet of about 265 MiB so that its weights dominate what an inference needs."""
    diffusers, transformers = heavy("diffusers"), heavy("transformers")
    torch.manual_seed(0)
    tok = tokenizer(directory)
    channels, groups, heads = ((256, 512), 32, 32) if medium else ((8, 16), 4, 2)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2 if medium else 1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=heads,
        norm_num_groups=groups,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64) if medium else (8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (2 if medium else 1),
        up_block_types=("UpDecoderBlock2D",) * (2 if medium else 1),
        latent_channels=4,
        norm_num_groups=32 if medium else 4,
        sample_size=64,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tok.get_vocab()),
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
    pipeline = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=diffusers.DDIMScheduler(
            steps_offset=1, clip_sample=False, set_alpha_to_one=False
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def infer(pipeline: Any, size: int = 32) -> Any:
    generator = torch.Generator("cpu").manual_seed(7)
    out = pipeline(
        "a cat",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="pt",
        generator=generator,
    )
    images = out.images.detach().float().cpu()
    expect(bool(torch.isfinite(images).all()), "the image has NaN or infinite values")
    return images


def same_image(image: Any, reference: Any, what: str) -> None:
    difference = float((image - reference).abs().max())
    expect(difference < 1e-3, f"{what}: the image differs from the reference by {difference}")


def check_modes(work: Path, device: str, emit: Recorder, reference: Any) -> None:
    from gen_worker.low_vram import place_pipeline  # noqa: PLC0415

    for mode, enabler in ENABLER.items():
        emit.start(f"place:{mode}")
        pipe = build_pipeline(work)
        with env(COZY_INFERENCE_MEMORY_MODE=mode, COZY_INFERENCE_AUTO_DISK_OFFLOAD="0"):
            result = place_pipeline(pipe, device, model_id=f"tiny/{mode}", emit=emit)
        expect(result["applied_mode"] == mode, f"{mode}: applied {result['applied_mode']}")
        expect(enabler is None or result[enabler] is True, f"{mode}: {enabler} is off")
        expect(result["error"] is None, f"{mode}: {result['error']}")
        moved = next(pipe.unet.parameters()).device.type == "cuda"
        expect(moved == (mode in ("off", "vae_only")), f"{mode}: UNet on the GPU is {moved}")
        same_image(infer(pipe), reference, mode)


def check_disk_offload(work: Path, device: str, emit: Recorder, reference: Any) -> None:
    from gen_worker.low_vram import place_pipeline  # noqa: PLC0415

    emit.start("place:group_offload+disk")
    offload_dir = work / "offload"
    pipe = build_pipeline(work)
    with env(
        COZY_INFERENCE_MEMORY_MODE="group_offload",
        COZY_INFERENCE_AUTO_DISK_OFFLOAD="1",
        COZY_INFERENCE_DISK_OFFLOAD_RAM_GB="1000000",
        COZY_OFFLOAD_DIR=str(offload_dir),
    ):
        result = place_pipeline(pipe, device, model_id="tiny/disk", emit=emit)
    expect(result["disk_offload"] is True, f"disk offload is off: {result}")
    same_image(infer(pipe), reference, "group_offload on disk")
    files = list(offload_dir.rglob("*.safetensors"))
    expect(len(files) > 10, f"{len(files)} offload files under {offload_dir}")


def check_escalation_chain(work: Path, device: str, emit: Recorder, reference: Any) -> None:
    from gen_worker.low_vram import escalate, place_pipeline  # noqa: PLC0415

    emit.start("escalate")
    pipe = build_pipeline(work)
    with env(COZY_INFERENCE_AUTO_DISK_OFFLOAD="0"):
        place_pipeline(pipe, device, model_id="tiny/chain", emit=emit)
        for mode in ("model_offload", "group_offload", "sequential"):
            result = escalate(pipe, emit=emit)
            expect(result["applied_mode"] == mode, f"escalated to {result['applied_mode']}")
            expect(result["changed"] is True and result["error"] is None, f"{mode}: {result}")
            same_image(infer(pipe), reference, f"escalated to {mode}")
        top = escalate(pipe, emit=emit)
    expect(top["changed"] is False, f"escalating at the top changed something: {top}")


def fill_vram(device: str, leave_bytes: int) -> Any:
    """A tensor holding all free VRAM but ``leave_bytes`` (less when fragments refuse)."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = max(free - leave_bytes, 0) // (2 * MIB) * (2 * MIB)
    for _ in range(64):
        try:
            return torch.empty(size, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            size -= 32 * MIB
    raise CheckFailed("could not allocate a tensor to fill the GPU")


def check_placement_oom(work: Path, device: str, emit: Recorder) -> None:
    from gen_worker.low_vram import place_pipeline  # noqa: PLC0415

    emit.start("oom:placement")
    pipe = build_pipeline(work, medium=True)
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    total = torch.cuda.mem_get_info(torch.device(device))[1]
    hog = fill_vram(device, weights // 4)
    try:
        with env(COZY_INFERENCE_AUTO_DISK_OFFLOAD="0"):
            # The preflight is told the card is empty, so the .to() is tried and fails.
            result = place_pipeline(
                pipe,
                device,
                model_id="medium/placement",
                emit=emit,
                total_vram_bytes=total,
                free_vram_bytes=total,
            )
    finally:
        del hog
        torch.cuda.empty_cache()
    stages = [p["stage"] for t, p in emit.events if t == "low_vram_mode_applied"]
    expect("oom_escalation" in stages, f"no escalation while placing: {stages}")
    expect(result["applied_mode"] == "model_offload", f"placed as {result['applied_mode']}")
    infer(pipe, 64)


def check_inference_oom(work: Path, device: str, emit: Recorder) -> None:
    from gen_worker.low_vram import place_pipeline, with_oom_retry  # noqa: PLC0415

    emit.start("oom:inference")
    pipe = build_pipeline(work, medium=True)
    with env(COZY_INFERENCE_AUTO_DISK_OFFLOAD="0"):
        place_pipeline(pipe, device, model_id="medium/inference", emit=emit)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        infer(pipe, 256)
        activations = torch.cuda.max_memory_allocated(device) - before
        # Leave less than one inference needs: only escalation can make room (the weights).
        for leave in (activations // 2, 0):
            hog = fill_vram(device, leave)
            try:
                # Three retries: the UNet alone may not fit beside the filler under
                # model_offload; group or sequential offload then makes room.
                images = with_oom_retry(infer, pipe, 256, pipelines=[pipe], retries=3, emit=emit)
            finally:
                del hog
                torch.cuda.empty_cache()
            if any(t == "inference.oom_retry" for t, _ in emit.events):
                break
    retries = [p for t, p in emit.events if t == "inference.oom_retry"]
    expect(bool(retries), "the filled GPU never ran out of memory; the check proved nothing")
    expect(bool(torch.isfinite(images).all()), "the retried inference produced NaN")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--require-cuda", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", flush=True)
        return EXIT_NO_CUDA if args.require_cuda else EXIT_OK
    try:
        for name in ("accelerate", "diffusers", "transformers"):
            heavy(name)
    except ImportError as exc:
        print(f"gpu_check: {exc.name} is not installed", file=sys.stderr)
        return EXIT_MISSING
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    emit = Recorder()
    started = time.monotonic()
    passed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        emit.start("reference")
        from gen_worker.low_vram import place_pipeline  # noqa: PLC0415

        reference_pipe = build_pipeline(work)
        place_pipeline(reference_pipe, args.device, model_id="tiny/reference", emit=emit)
        reference = infer(reference_pipe)
        del reference_pipe
        checks: list[tuple[str, Callable[[], None]]] = [
            ("modes", lambda: check_modes(work, args.device, emit, reference)),
            ("disk", lambda: check_disk_offload(work, args.device, emit, reference)),
            ("chain", lambda: check_escalation_chain(work, args.device, emit, reference)),
            ("oom_placement", lambda: check_placement_oom(work, args.device, emit)),
            ("oom_inference", lambda: check_inference_oom(work, args.device, emit)),
        ]
        for name, check in checks:
            try:
                check()
            except Exception as exc:
                kind = "" if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: "
                print(f"gpu_check: FAILED {name} ({emit.check}): {kind}{exc}", file=sys.stderr)
                return EXIT_FAILED
            passed.append(name)
    summary = {"check": "summary", "ok": True, "passed": passed}
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
