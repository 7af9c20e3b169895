"""The calls that turn each ladder step on, for diffusers pipelines and look-alikes.

Each enabler is looked up on the object at call time: a pipeline that does not expose one is
left alone and the enabler is reported off (with the reason), never faked. Diffusers moved
VAE slicing/tiling from the pipeline to the VAE (``pipe.vae.enable_slicing()``); the VAE's
own method is preferred and the pipeline-level one is the fallback for older pipelines.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.low_vram.probes import is_cuda_device, torch_modules

__all__ = [
    "ENABLERS",
    "OFFLOAD_ENABLER",
    "EnablerResult",
    "has_group_offload",
    "install_group_offload",
    "install_model_offload",
    "install_sequential_offload",
    "make_disk_offload_dir",
    "remove_accelerate_hooks",
    "remove_group_offload",
    "vae_step",
]

#: The payload's booleans, in the order they are reported.
ENABLERS = (
    "vae_slicing",
    "vae_tiling",
    "attention_slicing",
    "model_cpu_offload",
    "group_offload",
    "sequential_cpu_offload",
    "disk_offload",
)
#: The enabler that defines each offload step.
OFFLOAD_ENABLER = {
    "model_offload": "model_cpu_offload",
    "group_offload": "group_offload",
    "sequential": "sequential_cpu_offload",
}

# diffusers' hook names for group offloading (diffusers.hooks.group_offloading); removing all
# three is what diffusers itself does before re-applying group offload.
_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


class EnablerResult(msgspec.Struct, kw_only=True):
    """What one enabler call did: on, or off with why (missing method) or what failed."""

    enabled: bool
    skipped: str | None = None
    error: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call(method: Callable[..., Any], **kwargs: Any) -> EnablerResult:
    try:
        method(**kwargs)
    except Exception as exc:  # one failing enabler must not stop the others; it is reported
        return EnablerResult(enabled=False, error=_describe(exc))
    return EnablerResult(enabled=True)


def _first_method(pipeline: Any, candidates: tuple[tuple[str | None, str], ...]) -> Any:
    for owner_name, method_name in candidates:
        owner = pipeline if owner_name is None else getattr(pipeline, owner_name, None)
        method = getattr(owner, method_name, None) if owner is not None else None
        if callable(method):
            return method
    return None


_VAE_CANDIDATES: dict[str, tuple[tuple[str | None, str], ...]] = {
    "vae_slicing": (("vae", "enable_slicing"), (None, "enable_vae_slicing")),
    "vae_tiling": (("vae", "enable_tiling"), (None, "enable_vae_tiling")),
    "attention_slicing": ((None, "enable_attention_slicing"),),
}


def vae_step(pipeline: Any, name: str) -> EnablerResult:
    """Turn on one of the ``vae_only`` enablers (``vae_slicing``, ``vae_tiling``,
    ``attention_slicing``) where the pipeline exposes it."""
    method = _first_method(pipeline, _VAE_CANDIDATES[name])
    if method is None:
        return EnablerResult(enabled=False, skipped=f"the pipeline has no {name.replace('_', ' ')}")
    return _call(method)


def install_model_offload(pipeline: Any, device: str) -> EnablerResult:
    """``enable_model_cpu_offload``: whole components move to ``device`` when they run."""
    method = getattr(pipeline, "enable_model_cpu_offload", None)
    if not callable(method):
        return EnablerResult(enabled=False, skipped="the pipeline has no enable_model_cpu_offload")
    return _call(method, device=device)


def install_sequential_offload(pipeline: Any, device: str) -> EnablerResult:
    """``enable_sequential_cpu_offload``: each leaf module moves to ``device`` when it runs."""
    method = getattr(pipeline, "enable_sequential_cpu_offload", None)
    if not callable(method):
        return EnablerResult(
            enabled=False, skipped="the pipeline has no enable_sequential_cpu_offload"
        )
    return _call(method, device=device)


def _group_offload_methods(pipeline: Any) -> list[Callable[..., Any]]:
    method = getattr(pipeline, "enable_group_offload", None)
    if callable(method):
        return [method]
    components = getattr(pipeline, "components", None)
    found = [
        getattr(component, "enable_group_offload", None)
        for component in (components.values() if isinstance(components, dict) else ())
    ]
    return [candidate for candidate in found if callable(candidate)]


def has_group_offload(pipeline: Any) -> bool:
    """Whether the pipeline, or at least one of its components, offers group offload."""
    return bool(_group_offload_methods(pipeline))


def install_group_offload(pipeline: Any, device: str, disk_dir: str | None) -> EnablerResult:
    """Leaf-level group offload onto ``device``: on the pipeline when it offers
    ``enable_group_offload``, else on each component that does. CUDA streams overlap the
    transfers with compute (they exist only on CUDA); ``disk_dir`` keeps the offloaded
    weights on disk instead of in CPU RAM."""
    methods = _group_offload_methods(pipeline)
    if not methods:
        return EnablerResult(
            enabled=False, skipped="neither the pipeline nor its components have group offload"
        )
    try:
        import torch  # noqa: PLC0415  # heavy; only offload steps need it
    except ImportError as exc:
        return EnablerResult(enabled=False, error=_describe(exc))
    options: dict[str, Any] = {
        "onload_device": torch.device(device),
        "offload_device": torch.device("cpu"),
        "offload_type": "leaf_level",
        "use_stream": is_cuda_device(device),
        "offload_to_disk_path": disk_dir,
    }
    for method in methods:
        result = _call(method, **options)
        if not result.enabled:
            return result
    return EnablerResult(enabled=True)


def remove_accelerate_hooks(pipeline: Any) -> None:
    """Undo model or sequential CPU offload (accelerate hooks) before another offload."""
    method = getattr(pipeline, "remove_all_hooks", None)
    if callable(method):
        method()


def _restore_group(group: Any) -> None:
    """Put a diffusers offload group's weights back into ordinary CPU tensors."""
    if getattr(group, "offload_to_disk_path", None):
        path = Path(group.safetensors_file_path)
        if group._is_offloaded_to_disk and path.exists():
            # On disk the tensors are empty placeholders: load the real values back.
            import safetensors.torch  # noqa: PLC0415  # heavy; disk offload only

            loaded = safetensors.torch.load_file(str(path), device="cpu")
            for key, tensor in group.key_to_tensor.items():
                tensor.data = loaded[key]
            path.unlink(missing_ok=True)
        else:
            for tensor in group.key_to_tensor.values():
                tensor.data = tensor.data.to("cpu")
        return
    group.offload_()


def remove_group_offload(pipeline: Any) -> None:
    """Undo diffusers group offload, leaving every weight as a real CPU tensor.

    Diffusers has no public "disable group offload"; this restores each group (from its
    CPU copy, or from its file for disk offload) and removes the hooks the way diffusers
    does before re-applying group offload.
    """
    for _, module in torch_modules(pipeline):
        groups: dict[int, Any] = {}
        for submodule in module.modules():
            registry = getattr(submodule, "_diffusers_hook", None)
            hook = registry.get_hook(_GROUP_HOOKS[0]) if registry is not None else None
            group = getattr(hook, "group", None)
            if group is not None:
                groups[id(group)] = group
        if not groups:
            continue
        for group in groups.values():
            _restore_group(group)
        from diffusers.hooks.hooks import HookRegistry  # noqa: PLC0415  # heavy; only here

        registry = HookRegistry.check_if_exists_or_initialize(module)
        for hook_name in _GROUP_HOOKS:
            registry.remove_hook(hook_name, recurse=True)


def make_disk_offload_dir(pipeline: Any, root: str, model_id: str | None) -> str:
    """A fresh directory under ``root`` for one pipeline's offloaded weights.

    Diffusers names the files after module names, and reuses a file that already exists, so
    two pipelines (or a previous process) sharing a directory would load each other's
    weights: every pipeline gets its own, removed when the pipeline is collected.
    """
    Path(root).mkdir(parents=True, exist_ok=True)
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in (model_id or "pipeline"))
    path = tempfile.mkdtemp(prefix=f"{label[:64]}-", dir=root)
    # An object that is not weak-referenceable leaves its directory for the operator.
    with contextlib.suppress(TypeError):
        weakref.finalize(pipeline, shutil.rmtree, path, True)
    return path
