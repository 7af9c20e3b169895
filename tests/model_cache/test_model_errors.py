"""The two errors of the model cache and the loaders: wire meaning, attributes, messages."""

from __future__ import annotations

from gen_worker import errors
from gen_worker.errors import FatalError, ModelInUseError, ModelLoadError, RetryableError


def test_model_in_use_is_a_refusal_to_try_again_later() -> None:
    err = ModelInUseError("acme/sd:latest", 3)
    assert isinstance(err, RetryableError)
    assert (err.error_type, err.retryable) == ("retryable", True)
    assert (err.model_id, err.uses) == ("acme/sd:latest", 3)
    assert err.safe_message == (
        "model acme/sd:latest is in use by 3 running request(s); wait for them to finish "
        "(or cancel them) and unload it again"
    )


def test_model_load_error_names_the_ref_the_loader_and_the_cause() -> None:
    err = ModelLoadError("acme/sd:latest", "diffusers.StableDiffusionPipeline", "OSError: no unet")
    assert isinstance(err, FatalError)
    assert (err.error_type, err.retryable) == ("fatal", False)
    assert (err.ref, err.loader, err.cause) == (
        "acme/sd:latest",
        "diffusers.StableDiffusionPipeline",
        "OSError: no unet",
    )
    assert str(err) == (
        "could not load acme/sd:latest with diffusers.StableDiffusionPipeline: OSError: no unet"
    )


def test_both_are_public_and_in_the_documented_tree() -> None:
    doc = errors.__doc__ or ""
    for name in ("ModelInUseError", "ModelLoadError"):
        assert name in errors.__all__
        assert name in doc
