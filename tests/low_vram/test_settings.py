"""The COZY_INFERENCE_* settings, auto selection and the disk-offload rule."""

from __future__ import annotations

import pytest

from gen_worker.errors import ConfigError
from gen_worker.low_vram import (
    LowVramSettings,
    disk_offload_wanted,
    load_low_vram_settings,
    select_mode,
)

GIB = 1024**3


def test_defaults_are_the_seed_readme_values() -> None:
    settings = load_low_vram_settings({})
    assert settings == LowVramSettings(
        memory_mode="auto",
        vram_safety_margin_gb=2.0,
        vae_slice_vram_gb=10.0,
        model_offload_vram_gb=8.0,
        group_offload_vram_gb=6.0,
        auto_disk_offload=True,
        disk_offload_ram_gb=16.0,
        offload_dir="/tmp/cozy-offload",
    )
    assert settings.vram_safety_margin_bytes == 2 * GIB


def test_every_variable_is_read() -> None:
    settings = load_low_vram_settings(
        {
            "COZY_INFERENCE_MEMORY_MODE": " Group_Offload ",
            "COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB": "1.5",
            "COZY_INFERENCE_VAE_SLICE_VRAM_GB": "20",
            "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB": "12",
            "COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB": "4",
            "COZY_INFERENCE_AUTO_DISK_OFFLOAD": "off",
            "COZY_INFERENCE_DISK_OFFLOAD_RAM_GB": "0",
            "COZY_OFFLOAD_DIR": "~/offload",
            "COZY_INFERENCE_UNRELATED": "ignored",
        }
    )
    assert settings.memory_mode == "group_offload"
    assert settings.vram_safety_margin_gb == 1.5
    assert settings.vae_slice_vram_gb == 20.0
    assert settings.model_offload_vram_gb == 12.0
    assert settings.group_offload_vram_gb == 4.0
    assert settings.auto_disk_offload is False
    assert settings.disk_offload_ram_gb == 0.0
    assert not settings.offload_dir.startswith("~")
    assert settings.offload_dir.endswith("/offload")


def test_blank_values_mean_the_default() -> None:
    settings = load_low_vram_settings({"COZY_INFERENCE_MEMORY_MODE": " ", "COZY_OFFLOAD_DIR": ""})
    assert settings.memory_mode == "auto"
    assert settings.offload_dir == "/tmp/cozy-offload"


def test_settings_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_low_vram_settings().memory_mode == "auto"
    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", "sequential")
    assert load_low_vram_settings().memory_mode == "sequential"
    assert select_mode(80 * GIB) == "sequential"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "COZY_INFERENCE_MEMORY_MODE",
            "turbo",
            "COZY_INFERENCE_MEMORY_MODE: 'turbo' is not a mode; use one of auto, off, vae_only, "
            "model_offload, group_offload, sequential",
        ),
        (
            "COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB",
            "2GB",
            "COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB: '2GB' is not a number; "
            "use a number of GB >= 0, e.g. 20 or 3.5",
        ),
        (
            "COZY_INFERENCE_VAE_SLICE_VRAM_GB",
            "-1",
            "COZY_INFERENCE_VAE_SLICE_VRAM_GB: '-1' is not valid; use a finite number of GB >= 0",
        ),
        (
            "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB",
            "nan",
            "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB: 'nan' is not valid; "
            "use a finite number of GB >= 0",
        ),
        (
            "COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB",
            "inf",
            "COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB: 'inf' is not valid; "
            "use a finite number of GB >= 0",
        ),
        (
            "COZY_INFERENCE_AUTO_DISK_OFFLOAD",
            "maybe",
            "COZY_INFERENCE_AUTO_DISK_OFFLOAD: 'maybe' is not a boolean; "
            "use true/false, 1/0, yes/no or on/off",
        ),
        (
            "COZY_INFERENCE_DISK_OFFLOAD_RAM_GB",
            "sixteen",
            "COZY_INFERENCE_DISK_OFFLOAD_RAM_GB: 'sixteen' is not a number; "
            "use a number of GB >= 0, e.g. 20 or 3.5",
        ),
    ],
)
def test_malformed_values_name_the_variable_and_what_is_valid(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_low_vram_settings({variable: value})
    assert str(caught.value) == message
    assert caught.value.variable == variable


def test_a_malformed_env_value_fails_apply_low_vram_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gen_worker import apply_low_vram_config

    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", "fast")
    with pytest.raises(ConfigError, match="COZY_INFERENCE_MEMORY_MODE: 'fast' is not a mode"):
        apply_low_vram_config(object())


DEFAULTS = LowVramSettings()


@pytest.mark.parametrize(
    ("total_gib", "expected"),
    [
        (0, "off"),  # no CUDA device
        (1, "group_offload"),
        (5.99, "group_offload"),
        (6, "model_offload"),  # thresholds are "below": 6 GiB is not below 6
        (7.99, "model_offload"),
        (8, "vae_only"),
        (9.99, "vae_only"),
        (10, "off"),
        (80, "off"),
    ],
)
def test_auto_picks_the_least_aggressive_step_for_total_vram(
    total_gib: float, expected: str
) -> None:
    assert select_mode(int(total_gib * GIB), None, DEFAULTS) == expected


@pytest.mark.parametrize(
    ("env", "total_gib", "expected"),
    [
        ({"COZY_INFERENCE_VAE_SLICE_VRAM_GB": "24"}, 23.9, "vae_only"),
        ({"COZY_INFERENCE_VAE_SLICE_VRAM_GB": "24"}, 24, "off"),
        ({"COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB": "16"}, 15.9, "model_offload"),
        ({"COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB": "16"}, 16, "off"),
        (
            {
                "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB": "16",
                "COZY_INFERENCE_VAE_SLICE_VRAM_GB": "20",
            },
            16,
            "vae_only",
        ),
        ({"COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB": "7"}, 6.9, "group_offload"),
        ({"COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB": "7"}, 7, "model_offload"),
        ({"COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB": "0"}, 0.5, "model_offload"),
        ({"COZY_INFERENCE_VAE_SLICE_VRAM_GB": "0"}, 9, "off"),
    ],
)
def test_thresholds_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], total_gib: float, expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert select_mode(int(total_gib * GIB)) == expected


@pytest.mark.parametrize(
    ("size_gib", "expected"),
    [
        (None, "off"),
        (22, "off"),  # 24 GiB card - 2 GiB margin = 22 GiB usable: fits exactly
        (22.01, "model_offload"),
        (100, "model_offload"),
    ],
)
def test_a_pipeline_that_does_not_fit_gets_at_least_model_offload(
    size_gib: float | None, expected: str
) -> None:
    size = None if size_gib is None else int(size_gib * GIB)
    assert select_mode(24 * GIB, size, DEFAULTS) == expected


def test_the_size_rule_never_lowers_a_step() -> None:
    assert select_mode(5 * GIB, 100 * GIB, DEFAULTS) == "group_offload"


def test_the_margin_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB", "4")
    assert select_mode(24 * GIB, 20 * GIB) == "off"
    assert select_mode(24 * GIB, 20 * GIB + 1) == "model_offload"


@pytest.mark.parametrize(
    "mode", ["off", "vae_only", "model_offload", "group_offload", "sequential"]
)
def test_the_env_mode_overrides_auto_whatever_the_card(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", mode)
    for total in (0, 4 * GIB, 80 * GIB):
        assert select_mode(total, 100 * GIB) == mode


@pytest.mark.parametrize(
    ("env", "ram_gib", "expected"),
    [
        ({}, 15.99, True),
        ({}, 16, False),  # "below" the threshold
        ({}, None, False),  # unknown RAM: keep weights in RAM
        ({"COZY_INFERENCE_AUTO_DISK_OFFLOAD": "0"}, 1, False),
        ({"COZY_INFERENCE_DISK_OFFLOAD_RAM_GB": "64"}, 63, True),
        ({"COZY_INFERENCE_DISK_OFFLOAD_RAM_GB": "0"}, 0, False),
    ],
)
def test_disk_offload_when_available_ram_is_below_the_threshold(
    env: dict[str, str], ram_gib: float | None, expected: bool
) -> None:
    settings = load_low_vram_settings(env)
    ram = None if ram_gib is None else int(ram_gib * GIB)
    assert disk_offload_wanted(settings, ram) is expected
