"""Settings from the environment: defaults, parsing, and the messages of malformed values."""

from __future__ import annotations

import pytest

from gen_worker.config import (
    EngineSettings,
    RunnerSettings,
    load_engine_settings,
    load_runner_settings,
)
from gen_worker.errors import ConfigError, FatalError

MIB = 1024 * 1024

INT_VARIABLES = {
    "WORKER_MAX_CONCURRENCY": "max_concurrency",
    "WORKER_MAX_INPUT_BYTES": "max_input_bytes",
    "WORKER_MAX_OUTPUT_BYTES": "max_output_bytes",
    "WORKER_MAX_UPLOAD_BYTES": "max_upload_bytes",
    "WORKER_MAX_INPUT_FILE_BYTES": "max_input_file_bytes",
}
FLOAT_VARIABLES = {
    "WORKER_WARN_MODEL_RESOLVE_S": "warn_model_resolve_s",
    "WORKER_WARN_MODEL_LOAD_S": "warn_model_load_s",
    "WORKER_WARN_INFERENCE_S": "warn_inference_s",
}
RUNNER_VARIABLES = {
    "GEN_WORKER_HTTP_LISTEN": "listen",
    "GEN_WORKER_MANIFEST_PATH": "manifest_path",
    "GEN_WORKER_ENDPOINT_ROOT": "endpoint_root",
    "GEN_WORKER_OUTPUT_DIR": "output_dir",
}
ENGINE_DEFAULTS = {
    "max_concurrency": None,
    "max_input_bytes": None,
    "max_output_bytes": None,
    "max_upload_bytes": None,
    "max_input_file_bytes": 200 * MIB,
    "warn_model_resolve_s": 30.0,
    "warn_model_load_s": 60.0,
    "warn_inference_s": 60.0,
}
RUNNER_DEFAULTS = {
    "listen": "127.0.0.1:8081",
    "manifest_path": "/app/.tensorhub/endpoint.lock",
    "endpoint_root": "/app",
    "output_dir": "/outputs",
}


def as_dict(settings: EngineSettings | RunnerSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


# -- engine settings ---------------------------------------------------------------------------


def test_engine_defaults_when_nothing_is_set() -> None:
    settings = load_engine_settings({})
    assert isinstance(settings, EngineSettings)
    assert as_dict(settings) == ENGINE_DEFAULTS
    assert settings == EngineSettings()


def test_unrelated_variables_are_ignored() -> None:
    env = {"PATH": "/usr/bin", "WORKER_MAX_SOMETHING_ELSE": "abc", "worker_max_concurrency": "x"}
    assert as_dict(load_engine_settings(env)) == ENGINE_DEFAULTS


def test_every_engine_variable_is_parsed() -> None:
    env = {
        "WORKER_MAX_CONCURRENCY": "4",
        "WORKER_MAX_INPUT_BYTES": "1000",
        "WORKER_MAX_OUTPUT_BYTES": "2000",
        "WORKER_MAX_UPLOAD_BYTES": "3000",
        "WORKER_MAX_INPUT_FILE_BYTES": "4000",
        "WORKER_WARN_MODEL_RESOLVE_S": "1.5",
        "WORKER_WARN_MODEL_LOAD_S": "2",
        "WORKER_WARN_INFERENCE_S": "0.25",
    }
    assert as_dict(load_engine_settings(env)) == {
        "max_concurrency": 4,
        "max_input_bytes": 1000,
        "max_output_bytes": 2000,
        "max_upload_bytes": 3000,
        "max_input_file_bytes": 4000,
        "warn_model_resolve_s": 1.5,
        "warn_model_load_s": 2.0,
        "warn_inference_s": 0.25,
    }


@pytest.mark.parametrize(("variable", "field"), sorted(INT_VARIABLES.items()))
def test_each_int_variable_alone(variable: str, field: str) -> None:
    settings = load_engine_settings({variable: "17"})
    value = getattr(settings, field)
    assert value == 17
    assert type(value) is int
    others = {k: v for k, v in as_dict(settings).items() if k != field}
    assert others == {k: v for k, v in ENGINE_DEFAULTS.items() if k != field}


@pytest.mark.parametrize(("variable", "field"), sorted(FLOAT_VARIABLES.items()))
def test_each_float_variable_alone(variable: str, field: str) -> None:
    settings = load_engine_settings({variable: "7"})
    value = getattr(settings, field)
    assert value == 7.0
    assert type(value) is float
    others = {k: v for k, v in as_dict(settings).items() if k != field}
    assert others == {k: v for k, v in ENGINE_DEFAULTS.items() if k != field}


def test_values_with_surrounding_whitespace_are_parsed() -> None:
    settings = load_engine_settings(
        {"WORKER_MAX_CONCURRENCY": "  3\n", "WORKER_WARN_INFERENCE_S": "\t12.5 "}
    )
    assert settings.max_concurrency == 3
    assert settings.warn_inference_s == 12.5


def test_one_is_the_smallest_valid_int_and_small_floats_are_valid() -> None:
    settings = load_engine_settings(
        {"WORKER_MAX_CONCURRENCY": "1", "WORKER_WARN_MODEL_LOAD_S": "0.001"}
    )
    assert settings.max_concurrency == 1
    assert settings.warn_model_load_s == 0.001


@pytest.mark.parametrize("blank", ["", " ", "\t", "\n  \t"])
@pytest.mark.parametrize("variable", sorted([*INT_VARIABLES, *FLOAT_VARIABLES]))
def test_empty_or_whitespace_means_unset(variable: str, blank: str) -> None:
    assert as_dict(load_engine_settings({variable: blank})) == ENGINE_DEFAULTS


INT_PROBLEMS = [
    ("abc", "'abc' is not an integer; use a whole number >= 1"),
    ("1.5", "'1.5' is not an integer; use a whole number >= 1"),
    ("0", "0 is not valid; use a whole number >= 1"),
    ("-3", "-3 is not valid; use a whole number >= 1"),
]


@pytest.mark.parametrize(("text", "problem"), INT_PROBLEMS)
@pytest.mark.parametrize("variable", sorted(INT_VARIABLES))
def test_malformed_int_raises_config_error(variable: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_settings({variable: text})
    err = info.value
    assert str(err) == f"{variable}: {problem}"
    assert str(err).startswith(variable)
    assert err.variable == variable
    assert err.safe_message == str(err)
    assert isinstance(err, FatalError)
    assert err.error_type == "fatal"
    assert err.retryable is False
    assert err.__cause__ is None  # raised ``from None``: no int() traceback chained


FLOAT_PROBLEMS = [
    ("x", "'x' is not a number; use seconds > 0, e.g. 30"),
    ("0", "'0' is not valid; use a finite number > 0"),
    ("-1", "'-1' is not valid; use a finite number > 0"),
    ("inf", "'inf' is not valid; use a finite number > 0"),
    ("nan", "'nan' is not valid; use a finite number > 0"),
    ("-inf", "'-inf' is not valid; use a finite number > 0"),
    ("1e400", "'1e400' is not valid; use a finite number > 0"),
]


@pytest.mark.parametrize(("text", "problem"), FLOAT_PROBLEMS)
@pytest.mark.parametrize("variable", sorted(FLOAT_VARIABLES))
def test_malformed_float_raises_config_error(variable: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_settings({variable: text})
    err = info.value
    assert str(err) == f"{variable}: {problem}"
    assert str(err).startswith(variable)
    assert err.variable == variable
    assert err.error_type == "fatal"


def test_the_first_malformed_variable_is_named_even_when_others_are_valid() -> None:
    env = {"WORKER_MAX_CONCURRENCY": "2", "WORKER_MAX_OUTPUT_BYTES": "lots"}
    with pytest.raises(ConfigError, match=r"^WORKER_MAX_OUTPUT_BYTES: 'lots' is not an integer"):
        load_engine_settings(env)


def test_engine_settings_read_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [*INT_VARIABLES, *FLOAT_VARIABLES]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORKER_MAX_CONCURRENCY", "9")
    monkeypatch.setenv("WORKER_WARN_INFERENCE_S", "5")
    settings = load_engine_settings()
    assert settings.max_concurrency == 9
    assert settings.warn_inference_s == 5.0
    assert settings.max_input_file_bytes == 200 * MIB


def test_engine_settings_are_frozen() -> None:
    settings = load_engine_settings({})
    with pytest.raises(AttributeError):
        settings.max_concurrency = 3  # type: ignore[misc]


# -- runner settings ---------------------------------------------------------------------------


def test_runner_defaults_when_nothing_is_set() -> None:
    settings = load_runner_settings({})
    assert isinstance(settings, RunnerSettings)
    assert as_dict(settings) == RUNNER_DEFAULTS


def test_every_runner_variable_is_read() -> None:
    env = {
        "GEN_WORKER_HTTP_LISTEN": "0.0.0.0:9000",
        "GEN_WORKER_MANIFEST_PATH": "/srv/endpoint.lock",
        "GEN_WORKER_ENDPOINT_ROOT": "/srv/app",
        "GEN_WORKER_OUTPUT_DIR": "/tmp/out",
    }
    assert as_dict(load_runner_settings(env)) == {
        "listen": "0.0.0.0:9000",
        "manifest_path": "/srv/endpoint.lock",
        "endpoint_root": "/srv/app",
        "output_dir": "/tmp/out",
    }


@pytest.mark.parametrize(("variable", "field"), sorted(RUNNER_VARIABLES.items()))
def test_each_runner_variable_alone(variable: str, field: str) -> None:
    settings = load_runner_settings({variable: "/custom"})
    assert getattr(settings, field) == "/custom"
    others = {k: v for k, v in as_dict(settings).items() if k != field}
    assert others == {k: v for k, v in RUNNER_DEFAULTS.items() if k != field}


@pytest.mark.parametrize("blank", ["", "  ", "\t\n"])
@pytest.mark.parametrize("variable", sorted(RUNNER_VARIABLES))
def test_blank_runner_variable_keeps_the_default(variable: str, blank: str) -> None:
    assert as_dict(load_runner_settings({variable: blank})) == RUNNER_DEFAULTS


def test_runner_settings_read_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in RUNNER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("GEN_WORKER_OUTPUT_DIR", "/var/outputs")
    settings = load_runner_settings()
    assert settings.output_dir == "/var/outputs"
    assert settings.listen == "127.0.0.1:8081"


def test_engine_variables_do_not_affect_runner_settings() -> None:
    env = {"WORKER_MAX_CONCURRENCY": "not a number", "GEN_WORKER_HTTP_LISTEN": "[::1]:1"}
    assert load_runner_settings(env).listen == "[::1]:1"
