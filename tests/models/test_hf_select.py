"""The pure selection rules of gen_worker.models.hf_select, on realistic repo listings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_worker.errors import ValidationError
from gen_worker.models.hf_select import PICKLE_SUFFIXES, RepoFile, select_files, weight_variants

PICKLE = "pickle format (.bin) is never downloaded"
CLUTTER = "documentation or repo metadata; a load does not read it"
SINGLE_FILE = "single-file checkpoint; a diffusers load reads the component folders"


def listing(paths: str) -> list[RepoFile]:
    """One path a line; weights-like files get an LFS sha256 as on the Hub."""
    files = []
    for path in paths.split():
        lfs = PurePosixPath(path).suffix in {".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx"}
        sha = hashlib.sha256(path.encode()).hexdigest() if lfs else None
        files.append(RepoFile(path, 1000 + len(path), sha))
    return files


@dataclass
class Case:
    listing: str
    selected: str
    reasons: dict[str, str] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)


SD_LIKE = Case(
    listing="""
        .gitattributes README.md model_index.json v1-inference.yaml
        v1-5-pruned.ckpt v1-5-pruned.safetensors v1-5-pruned-emaonly.safetensors
        feature_extractor/preprocessor_config.json
        safety_checker/config.json safety_checker/model.safetensors
        safety_checker/model.fp16.safetensors safety_checker/pytorch_model.bin
        safety_checker/pytorch_model.fp16.bin
        scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
        text_encoder/pytorch_model.bin text_encoder/flax_model.msgpack
        tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
        tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.safetensors
        unet/diffusion_pytorch_model.fp16.safetensors
        unet/diffusion_pytorch_model.non_ema.safetensors
        unet/diffusion_pytorch_model.bin unet/diffusion_flax_model.msgpack
        vae/config.json vae/diffusion_pytorch_model.safetensors
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.bin
        onnx/unet/model.onnx onnx/text_encoder/model.onnx onnx/vae_decoder/config.json
        samples/cat.png
    """,
    selected="""
        model_index.json feature_extractor/preprocessor_config.json
        safety_checker/config.json safety_checker/model.fp16.safetensors
        scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.fp16.safetensors
        tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
        tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.fp16.safetensors
        vae/config.json vae/diffusion_pytorch_model.fp16.safetensors
    """,
    reasons={
        ".gitattributes": CLUTTER,
        "README.md": CLUTTER,
        "v1-inference.yaml": "a diffusers load reads only model_index.json at the repo root",
        "v1-5-pruned.ckpt": "pickle format (.ckpt) is never downloaded",
        "v1-5-pruned.safetensors": SINGLE_FILE,
        "unet/diffusion_pytorch_model.bin": PICKLE,
        "safety_checker/pytorch_model.fp16.bin": PICKLE,
        "unet/diffusion_pytorch_model.safetensors": (
            "the default precision not needed; variant 'fp16' is selected"
        ),
        "unet/diffusion_pytorch_model.non_ema.safetensors": (
            "variant 'non_ema' is not loaded (only fp16, bf16 or the default precision); "
            "variant 'fp16' is selected"
        ),
        "unet/diffusion_flax_model.msgpack": (
            "flax weights (.msgpack); only torch safetensors are loaded"
        ),
        "onnx/unet/model.onnx": (
            "onnx/ holds an export for another runtime; only torch safetensors are loaded"
        ),
        "onnx/vae_decoder/config.json": (
            "onnx/ holds an export for another runtime; only torch safetensors are loaded"
        ),
        "samples/cat.png": (
            "samples/ is not a diffusers component (no config or tokenizer file in it)"
        ),
    },
    variants={"safety_checker": "fp16", "text_encoder": "fp16", "unet": "fp16", "vae": "fp16"},
)

SHARDED_DIFFUSERS = Case(
    listing="""
        model_index.json flux1-dev.safetensors ae.safetensors
        scheduler/scheduler_config.json
        transformer/config.json transformer/diffusion_pytorch_model.safetensors.index.json
        transformer/diffusion_pytorch_model-00001-of-00003.safetensors
        transformer/diffusion_pytorch_model-00002-of-00003.safetensors
        transformer/diffusion_pytorch_model-00003-of-00003.safetensors
        text_encoder_3/config.json
        text_encoder_3/model.safetensors.index.json
        text_encoder_3/model-00001-of-00002.safetensors
        text_encoder_3/model-00002-of-00002.safetensors
        text_encoder_3/model.safetensors.index.fp16.json
        text_encoder_3/model.fp16-00001-of-00002.safetensors
        text_encoder_3/model.fp16-00002-of-00002.safetensors
        vae/config.json vae/diffusion_pytorch_model.safetensors
        vae/diffusion_pytorch_model.fp16.safetensors
        vae/extra/notes.json
    """,
    selected="""
        model_index.json scheduler/scheduler_config.json
        transformer/config.json transformer/diffusion_pytorch_model.safetensors.index.json
        transformer/diffusion_pytorch_model-00001-of-00003.safetensors
        transformer/diffusion_pytorch_model-00002-of-00003.safetensors
        transformer/diffusion_pytorch_model-00003-of-00003.safetensors
        text_encoder_3/config.json text_encoder_3/model.safetensors.index.fp16.json
        text_encoder_3/model.fp16-00001-of-00002.safetensors
        text_encoder_3/model.fp16-00002-of-00002.safetensors
        vae/config.json vae/diffusion_pytorch_model.fp16.safetensors
    """,
    reasons={
        "flux1-dev.safetensors": SINGLE_FILE,
        "ae.safetensors": SINGLE_FILE,
        "text_encoder_3/model.safetensors.index.json": (
            "the default precision not needed; variant 'fp16' is selected"
        ),
        "text_encoder_3/model-00002-of-00002.safetensors": (
            "the default precision not needed; variant 'fp16' is selected"
        ),
        "vae/extra/notes.json": "nested below vae/; a load reads only the top level of vae/",
    },
    variants={"text_encoder_3": "fp16", "vae": "fp16"},
)

INCOMPLETE_FP16_SHARDS = Case(
    listing="""
        config.json model.safetensors.index.json
        model-00001-of-00002.safetensors model-00002-of-00002.safetensors
        model.safetensors.index.fp16.json model.fp16-00001-of-00002.safetensors
        model.bf16-00001-of-00002.safetensors model.bf16-00002-of-00002.safetensors
    """,
    selected="""
        config.json model.safetensors.index.json
        model-00001-of-00002.safetensors model-00002-of-00002.safetensors
    """,
    reasons={
        "model.fp16-00001-of-00002.safetensors": (
            "variant 'fp16': incomplete shard set: shard(s) [2] of 2 missing; "
            "the default precision is selected"
        ),
        "model.bf16-00002-of-00002.safetensors": (
            "variant 'bf16': incomplete shard set: its .safetensors.index.json is missing; "
            "the default precision is selected"
        ),
    },
)

SHARDED_TRANSFORMERS = Case(
    listing="""
        .gitattributes LICENSE README.md USE_POLICY.md config.json generation_config.json
        model-00001-of-00004.safetensors model-00002-of-00004.safetensors
        model-00003-of-00004.safetensors model-00004-of-00004.safetensors
        model.safetensors.index.json
        pytorch_model-00001-of-00002.bin pytorch_model-00002-of-00002.bin
        pytorch_model.bin.index.json consolidated.safetensors
        tokenizer.json tokenizer.model tokenizer_config.json special_tokens_map.json
        chat_template.jinja modeling_custom.py
        original/consolidated.00.pth original/params.json original/tokenizer.model
    """,
    selected="""
        config.json generation_config.json
        model-00001-of-00004.safetensors model-00002-of-00004.safetensors
        model-00003-of-00004.safetensors model-00004-of-00004.safetensors
        model.safetensors.index.json
        tokenizer.json tokenizer.model tokenizer_config.json special_tokens_map.json
        chat_template.jinja
    """,
    reasons={
        "LICENSE": CLUTTER,
        "USE_POLICY.md": CLUTTER,
        "pytorch_model-00002-of-00002.bin": PICKLE,
        "pytorch_model.bin.index.json": "index of .bin shards, which are never downloaded",
        "consolidated.safetensors": (
            "not a weights name a load reads (those are: adapter_model, "
            "diffusion_pytorch_model, model, pytorch_lora_weights)"
        ),
        "modeling_custom.py": "custom code; remote code is never run",
        "original/params.json": "original/ is not read by a transformers load from the repo root",
    },
)

BF16_SINGLE_OVER_SHARDS = Case(
    listing="""
        config.json model.safetensors model.bf16.safetensors
        model.bf16-00001-of-00002.safetensors model.bf16-00002-of-00002.safetensors
        model.safetensors.index.bf16.json
    """,
    selected="config.json model.bf16.safetensors",
    reasons={
        "model.bf16-00001-of-00002.safetensors": (
            "the single file model.bf16.safetensors of the same precision is selected"
        ),
        "model.safetensors.index.bf16.json": (
            "the single file model.bf16.safetensors of the same precision is selected"
        ),
        "model.safetensors": "the default precision not needed; variant 'bf16' is selected",
    },
    variants={"": "bf16"},
)

SENTENCE_TRANSFORMERS = Case(
    listing="""
        .gitattributes README.md 1_Pooling/config.json 2_Dense/config.json
        2_Dense/model.safetensors 2_Dense/pytorch_model.bin
        config.json config_sentence_transformers.json data_config.json model.safetensors
        modules.json pytorch_model.bin rust_model.ot sentence_bert_config.json
        special_tokens_map.json tf_model.h5 tokenizer.json tokenizer_config.json
        train_script.py vocab.txt onnx/model.onnx onnx/model_O1.onnx
        openvino/openvino_model.xml openvino/openvino_model.bin
    """,
    selected="""
        1_Pooling/config.json 2_Dense/config.json 2_Dense/model.safetensors
        config.json config_sentence_transformers.json data_config.json model.safetensors
        modules.json sentence_bert_config.json special_tokens_map.json tokenizer.json
        tokenizer_config.json vocab.txt
    """,
    reasons={
        "rust_model.ot": "rust-bert weights (.ot); only torch safetensors are loaded",
        "tf_model.h5": "tensorflow weights (.h5); only torch safetensors are loaded",
        "2_Dense/pytorch_model.bin": PICKLE,
        "openvino/openvino_model.bin": (
            "openvino/ holds an export for another runtime; only torch safetensors are loaded"
        ),
    },
)

STANDALONE_DIFFUSERS_MODEL = Case(
    listing="""
        config.json diffusion_pytorch_model.safetensors
        diffusion_pytorch_model.fp16.safetensors diffusion_pytorch_model.bin images/canny.png
    """,
    selected="config.json diffusion_pytorch_model.fp16.safetensors",
    reasons={"images/canny.png": "images/ is not read by a transformers load from the repo root"},
    variants={"": "fp16"},
)

TOKENIZER_FOLDER_WITHOUT_CONFIG = Case(
    listing="""
        model_index.json tokenizer/vocab.json tokenizer/merges.txt tokenizer_2/spiece.model
        unet/config.json unet/diffusion_pytorch_model.safetensors checkpoints/x.safetensors
    """,
    selected="""
        model_index.json tokenizer/vocab.json tokenizer/merges.txt tokenizer_2/spiece.model
        unet/config.json unet/diffusion_pytorch_model.safetensors
    """,
    reasons={
        "checkpoints/x.safetensors": (
            "checkpoints/ is not a diffusers component (no config or tokenizer file in it)"
        )
    },
)

TOKENIZER_ONLY = Case(
    listing="README.md tokenizer.json tokenizer_config.json special_tokens_map.json",
    selected="tokenizer.json tokenizer_config.json special_tokens_map.json",
)

PEFT_ADAPTER = Case(
    listing="adapter_config.json adapter_model.safetensors adapter_model.bin README.md",
    selected="adapter_config.json adapter_model.safetensors",
)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(SD_LIKE, id="sd-like-diffusers"),
        pytest.param(SHARDED_DIFFUSERS, id="sharded-diffusers"),
        pytest.param(INCOMPLETE_FP16_SHARDS, id="incomplete-fp16-shards"),
        pytest.param(SHARDED_TRANSFORMERS, id="sharded-transformers"),
        pytest.param(BF16_SINGLE_OVER_SHARDS, id="bf16-single-over-shards"),
        pytest.param(SENTENCE_TRANSFORMERS, id="sentence-transformers"),
        pytest.param(STANDALONE_DIFFUSERS_MODEL, id="standalone-diffusers-model"),
        pytest.param(TOKENIZER_FOLDER_WITHOUT_CONFIG, id="tokenizer-folder-without-config"),
        pytest.param(TOKENIZER_ONLY, id="tokenizer-only"),
        pytest.param(PEFT_ADAPTER, id="peft-adapter"),
    ],
)
def test_selection(case: Case) -> None:
    files = listing(case.listing)
    selected, skipped = select_files(files)

    assert [f.path for f in selected] == sorted(case.selected.split())
    # Selected files keep what the listing said about them.
    by_path = {f.path: f for f in files}
    assert all(by_path[f.path] == f for f in selected)
    # Every other file is skipped exactly once, with a reason.
    assert [p for p, _ in skipped] == sorted(set(by_path) - set(case.selected.split()))
    reasons = dict(skipped)
    assert all(reasons.values())
    for path, reason in case.reasons.items():
        assert reasons[path] == reason, path
    assert weight_variants(selected) == case.variants


@pytest.mark.parametrize(
    ("paths", "where", "found"),
    [
        pytest.param(
            "config.json pytorch_model.bin README.md",
            "the repo root",
            "pytorch_model.bin",
            id="pickle-only-transformers",
        ),
        pytest.param(
            "model_index.json scheduler/scheduler_config.json unet/config.json "
            "unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin "
            "vae/config.json vae/diffusion_pytorch_model.safetensors",
            "component 'unet/'",
            "diffusion_pytorch_model.bin, diffusion_pytorch_model.fp16.bin",
            id="pickle-only-diffusers-component",
        ),
        pytest.param(
            "modules.json config.json model.safetensors 2_Dense/config.json "
            "2_Dense/pytorch_model.bin",
            "module folder '2_Dense/'",
            "pytorch_model.bin",
            id="pickle-only-sentence-transformers-module",
        ),
    ],
)
def test_pickle_only_folder_is_an_error(paths: str, where: str, found: str) -> None:
    with pytest.raises(ValidationError) as info:
        select_files(listing(paths))
    message = str(info.value)
    assert message.startswith(f"{where} has no loadable weights (found {found}): pickle files")
    assert "are never downloaded" in message
    assert "use a revision that ships them" in message


@pytest.mark.parametrize(
    ("paths", "found"),
    [
        pytest.param("config.json flax_model.msgpack tf_model.h5", "flax_model.msgpack", id="flax"),
        pytest.param("config.json consolidated.safetensors", "consolidated.safetensors", id="name"),
        pytest.param(
            "config.json model.non_ema.safetensors", "model.non_ema.safetensors", id="variant"
        ),
        pytest.param(
            "config.json model.safetensors.index.json model-00001-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            id="incomplete-shards",
        ),
    ],
)
def test_no_loadable_safetensors_is_an_error(paths: str, found: str) -> None:
    with pytest.raises(ValidationError) as info:
        select_files(listing(paths))
    message = str(info.value)
    assert message.startswith("the repo root has no loadable weights (found ")
    assert found in message
    assert "pickle" not in message


def test_error_lists_at_most_six_files() -> None:
    paths = " ".join(f"pytorch_model-0000{i}-of-00008.bin" for i in range(1, 9))
    with pytest.raises(ValidationError, match=r"-00006-of-00008\.bin and 2 more\)"):
        select_files(listing(f"config.json {paths}"))


# -- invariants over arbitrary mixes of realistic files -------------------------------------

VOCABULARY = sorted(
    set(SD_LIKE.listing.split())
    | set(SHARDED_DIFFUSERS.listing.split())
    | set(SHARDED_TRANSFORMERS.listing.split())
    | set(SENTENCE_TRANSFORMERS.listing.split())
    | set(INCOMPLETE_FP16_SHARDS.listing.split())
)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(VOCABULARY), max_size=40))
def test_every_file_is_accounted_for_and_pickle_never_selected(paths: set[str]) -> None:
    files = listing(" ".join(sorted(paths)))
    try:
        selected, skipped = select_files(files)
    except ValidationError as exc:
        assert "has no loadable weights" in str(exc)
        return
    chosen = [f.path for f in selected]
    assert sorted(chosen + [p for p, _ in skipped]) == sorted(paths)
    assert not any(PurePosixPath(p).suffix in PICKLE_SUFFIXES for p in chosen)
    assert all(
        PurePosixPath(p).suffix in {".json", ".safetensors", ".txt", ".model", ".jinja"}
        for p in chosen
    )
    # One precision per weights group and folder.
    for folder in {f.folder for f in selected}:
        names = [f.name for f in selected if f.folder == folder and f.name.endswith("tensors")]
        groups = {n.split("-")[0].split(".")[0] for n in names}
        variants = {n.split("-")[0].removesuffix(".safetensors") for n in names}
        assert len(variants) == len(groups), names
