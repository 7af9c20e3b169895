"""Worker runtime settings: defaults, every variable, required ones, malformed values, repr."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gen_worker.config import (
    EngineSettings,
    WorkerSettings,
    load_worker_settings,
    tls_for,
)
from gen_worker.config.parse import addresses, boolean
from gen_worker.errors import ConfigError

# Shaped like a real JWT so a leak would also be caught by anyone grepping for "eyJ".
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3LTEyMyJ9.c2lnbmF0dXJlLXNlY3JldC12YWx1ZQ"
REQUIRED = {"PUBLIC_ORCHESTRATOR_GRPC_ADDR": "scheduler:8080", "WORKER_JWT": TOKEN}

DEFAULTS: dict[str, object] = {
    "mode": "inference",
    "orchestrator_addr": "scheduler:8080",
    "scheduler_addrs": (),
    "worker_jwt": TOKEN,
    "worker_id": None,
    "jwks_url": None,
    "jwt_issuer": None,
    "jwt_audience": None,
    "use_tls": False,
    "lb_only_retries": True,
    "reconnect_delay_s": 0.1,
    "reconnect_max_delay_s": 1.0,
    "reconnect_jitter_s": 0.1,
    "max_reconnect_attempts": 0,
    "register_timeout_s": 90.0,
    "heartbeat_interval_s": 10.0,
    "drain_timeout_s": 30.0,
    "tensorhub_cache_dir": "HOME/.cache/tensorhub",
    "local_model_cache_dir": "/tmp/tensorhub/local-model-cache",
    "manifest_path": "/app/.tensorhub/endpoint.lock",
    "endpoint_root": "/app",
    "image_digest": None,
    "git_commit": None,
    "build_time": None,
    "engine": EngineSettings(),
}

# variable -> (text, field, parsed value): every variable the worker settings read.
EVERY_VARIABLE: dict[str, tuple[str, str, object]] = {
    "WORKER_MODE": ("trainer", "mode", "trainer"),
    "PUBLIC_ORCHESTRATOR_GRPC_ADDR": (
        "grpcs://s.example:443",
        "orchestrator_addr",
        "grpcs://s.example:443",
    ),
    "SCHEDULER_ADDRS": ("a:1, ,grpc://b:2,", "scheduler_addrs", ("a:1", "grpc://b:2")),
    "WORKER_JWT": (f" {TOKEN}\n", "worker_jwt", TOKEN),
    "WORKER_ID": ("worker-7", "worker_id", "worker-7"),
    "SCHEDULER_JWKS_URL": ("https://s/jwks.json", "jwks_url", "https://s/jwks.json"),
    "SCHEDULER_JWT_ISSUER": ("cozy", "jwt_issuer", "cozy"),
    "SCHEDULER_JWT_AUDIENCE": ("workers", "jwt_audience", "workers"),
    "USE_TLS": ("YES", "use_tls", True),
    "LB_ONLY_RETRIES": ("off", "lb_only_retries", False),
    "RECONNECT_DELAY": ("0", "reconnect_delay_s", 0.0),
    "RECONNECT_MAX_DELAY": ("2.5", "reconnect_max_delay_s", 2.5),
    "RECONNECT_JITTER_SECONDS": ("0.5", "reconnect_jitter_s", 0.5),
    "MAX_RECONNECT_ATTEMPTS": ("7", "max_reconnect_attempts", 7),
    "WORKER_REGISTER_TIMEOUT_S": ("12", "register_timeout_s", 12.0),
    "WORKER_HEARTBEAT_INTERVAL_S": ("3.5", "heartbeat_interval_s", 3.5),
    "WORKER_DRAIN_TIMEOUT_SECONDS": ("45", "drain_timeout_s", 45.0),
    "TENSORHUB_CACHE_DIR": ("/data/hub", "tensorhub_cache_dir", "/data/hub"),
    "WORKER_LOCAL_MODEL_CACHE_DIR": ("/nvme/cache", "local_model_cache_dir", "/nvme/cache"),
    "GEN_WORKER_MANIFEST_PATH": ("/srv/endpoint.lock", "manifest_path", "/srv/endpoint.lock"),
    "GEN_WORKER_ENDPOINT_ROOT": ("/srv", "endpoint_root", "/srv"),
    "GEN_WORKER_IMAGE_DIGEST": ("sha256:abc", "image_digest", "sha256:abc"),
    "GEN_WORKER_GIT_COMMIT": ("0123abc", "git_commit", "0123abc"),
    "GEN_WORKER_BUILD_TIME": ("2025-01-02T03:04:05Z", "build_time", "2025-01-02T03:04:05Z"),
    "WORKER_MAX_CONCURRENCY": ("3", "engine", EngineSettings(max_concurrency=3)),
}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A known HOME, so the expanded ``~/.cache/tensorhub`` default can be asserted."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def as_dict(settings: WorkerSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


def defaults(home: Path) -> dict[str, object]:
    return {**DEFAULTS, "tensorhub_cache_dir": str(home / ".cache" / "tensorhub")}


def test_defaults_with_only_the_required_variables(home: Path) -> None:
    settings = load_worker_settings(REQUIRED)
    assert as_dict(settings) == defaults(home)
    assert set(DEFAULTS) == set(WorkerSettings.__struct_fields__)


def test_every_variable_at_once(home: Path) -> None:
    env = {variable: text for variable, (text, _, _) in EVERY_VARIABLE.items()}
    expected = {field: value for _, field, value in EVERY_VARIABLE.values()}
    assert as_dict(load_worker_settings(env)) == {**defaults(home), **expected}


@pytest.mark.parametrize("variable", sorted(EVERY_VARIABLE))
def test_each_variable_alone(variable: str, home: Path) -> None:
    text, field, value = EVERY_VARIABLE[variable]
    settings = load_worker_settings({**REQUIRED, variable: text})
    assert getattr(settings, field) == value
    assert type(getattr(settings, field)) is type(value)
    others = {k: v for k, v in as_dict(settings).items() if k != field}
    assert others == {k: v for k, v in defaults(home).items() if k != field}


@pytest.mark.parametrize("variable", sorted(set(EVERY_VARIABLE) - set(REQUIRED)))
@pytest.mark.parametrize("blank", ["", "  ", "\t\n"])
def test_blank_means_unset(variable: str, blank: str, home: Path) -> None:
    assert as_dict(load_worker_settings({**REQUIRED, variable: blank})) == defaults(home)


def test_tensorhub_cache_dir_is_expanded(home: Path) -> None:
    settings = load_worker_settings({**REQUIRED, "TENSORHUB_CACHE_DIR": "~/hub"})
    assert settings.tensorhub_cache_dir == str(home / "hub")


@pytest.mark.parametrize("text", ["1.0", "1", "1.00", " 1.0 "])
def test_reconnect_max_delay_one_point_zero_parses(text: str) -> None:
    # The old worker parsed this as an int and crashed at startup.
    settings = load_worker_settings({**REQUIRED, "RECONNECT_MAX_DELAY": text})
    assert settings.reconnect_max_delay_s == 1.0
    assert type(settings.reconnect_max_delay_s) is float


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in EVERY_VARIABLE:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in {**REQUIRED, "MAX_RECONNECT_ATTEMPTS": "4"}.items():
        monkeypatch.setenv(variable, value)
    settings = load_worker_settings()
    assert settings.max_reconnect_attempts == 4
    assert settings.orchestrator_addr == "scheduler:8080"


# -- required variables ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "inference", " Inference "])
@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_in_inference_mode(missing: str, mode: str | None) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    if mode is not None:
        env["WORKER_MODE"] = mode
    with pytest.raises(ConfigError) as info:
        load_worker_settings(env)
    assert info.value.variable == missing
    assert str(info.value).startswith(f"{missing}: is required when WORKER_MODE=inference; set")
    assert TOKEN not in str(info.value)


def test_address_is_named_first_when_both_are_missing() -> None:
    with pytest.raises(ConfigError, match=r"^PUBLIC_ORCHESTRATOR_GRPC_ADDR: is required"):
        load_worker_settings({})


def test_trainer_mode_needs_neither() -> None:
    settings = load_worker_settings({"WORKER_MODE": "trainer"})
    assert settings.mode == "trainer"
    assert settings.orchestrator_addr is None
    assert settings.worker_jwt is None


# -- malformed values --------------------------------------------------------------------------

BOOL_HINT = "is not a boolean; use true/false, 1/0, yes/no or on/off"
ADDR_HINT = (
    "is not a valid address; use host:port with a port from 1 to 65535, "
    "e.g. scheduler.internal:8443"
)
JWKS_HINT = (
    "is not an http(s) URL with a host; "
    "use an http(s) URL, e.g. https://scheduler.internal/.well-known/jwks.json"
)
MALFORMED = [
    ("WORKER_MODE", "worker", "'worker' is not a worker mode; use inference or trainer"),
    ("WORKER_MODE", "inference,trainer", "'inference,trainer' is not a worker mode; use "),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", "scheduler", f"'scheduler' {ADDR_HINT}"),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", "host:0", f"'host:0' {ADDR_HINT}"),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", "host:65536", f"'host:65536' {ADDR_HINT}"),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", "http://host:80", f"'http://host:80' {ADDR_HINT}"),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", ":8080", f"':8080' {ADDR_HINT}"),
    ("PUBLIC_ORCHESTRATOR_GRPC_ADDR", "a b:1", f"'a b:1' {ADDR_HINT}"),
    ("SCHEDULER_ADDRS", "a:1,b", f"'b' {ADDR_HINT}"),
    ("SCHEDULER_ADDRS", "a:1;b:2", f"'a:1;b:2' {ADDR_HINT}"),
    ("SCHEDULER_JWKS_URL", "scheduler/jwks", JWKS_HINT),
    ("SCHEDULER_JWKS_URL", "ftp://s/jwks", JWKS_HINT),
    ("SCHEDULER_JWKS_URL", "https://", JWKS_HINT),
    ("USE_TLS", "maybe", f"'maybe' {BOOL_HINT}"),
    ("USE_TLS", "2", f"'2' {BOOL_HINT}"),
    ("LB_ONLY_RETRIES", "enabled", f"'enabled' {BOOL_HINT}"),
    ("RECONNECT_DELAY", "fast", "'fast' is not a number; use seconds >= 0, e.g. 0.1"),
    ("RECONNECT_DELAY", "-0.5", "'-0.5' is not valid; use a finite number >= 0"),
    ("RECONNECT_DELAY", "nan", "'nan' is not valid; use a finite number >= 0"),
    ("RECONNECT_MAX_DELAY", "0", "'0' is not valid; use a finite number > 0"),
    ("RECONNECT_MAX_DELAY", "inf", "'inf' is not valid; use a finite number > 0"),
    ("RECONNECT_MAX_DELAY", "1,0", "'1,0' is not a number; use seconds > 0, e.g. 30"),
    ("RECONNECT_JITTER_SECONDS", "-1", "'-1' is not valid; use a finite number >= 0"),
    ("RECONNECT_JITTER_SECONDS", "1e999", "'1e999' is not valid; use a finite number >= 0"),
    ("MAX_RECONNECT_ATTEMPTS", "-1", "-1 is not valid; use a whole number >= 0"),
    ("MAX_RECONNECT_ATTEMPTS", "2.0", "'2.0' is not an integer; use a whole number >= 0"),
    ("WORKER_REGISTER_TIMEOUT_S", "0", "'0' is not valid; use a finite number > 0"),
    ("WORKER_REGISTER_TIMEOUT_S", "90s", "'90s' is not a number; use seconds > 0, e.g. 30"),
    ("WORKER_HEARTBEAT_INTERVAL_S", "-10", "'-10' is not valid; use a finite number > 0"),
    ("WORKER_DRAIN_TIMEOUT_SECONDS", "0.0", "'0.0' is not valid; use a finite number > 0"),
    ("WORKER_DRAIN_TIMEOUT_SECONDS", "soon", "'soon' is not a number; use seconds > 0, e.g. 30"),
    ("WORKER_MAX_CONCURRENCY", "0", "0 is not valid; use a whole number >= 1"),
]


@pytest.mark.parametrize(("variable", "text", "problem"), MALFORMED)
def test_malformed_value_names_the_variable(variable: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_worker_settings({**REQUIRED, variable: text})
    err = info.value
    assert err.variable == variable
    assert str(err).startswith(f"{variable}: {problem}")
    assert TOKEN not in str(err)
    assert err.__cause__ is None


def test_every_parsed_variable_has_a_malformed_case() -> None:
    free_text = {"WORKER_JWT", "WORKER_ID", "SCHEDULER_JWT_ISSUER", "SCHEDULER_JWT_AUDIENCE"}
    free_text |= {v for v in EVERY_VARIABLE if v.startswith(("GEN_WORKER_", "TENSORHUB_"))}
    free_text.add("WORKER_LOCAL_MODEL_CACHE_DIR")
    assert {variable for variable, _, _ in MALFORMED} == set(EVERY_VARIABLE) - free_text


def test_jwks_url_error_does_not_echo_the_url() -> None:
    env = {**REQUIRED, "SCHEDULER_JWKS_URL": "ftp://user:hunter2@s/jwks?key=k3y"}
    with pytest.raises(ConfigError) as info:
        load_worker_settings(env)
    assert "hunter2" not in str(info.value)
    assert "k3y" not in str(info.value)


# -- the token never shows ---------------------------------------------------------------------


def test_repr_redacts_the_token() -> None:
    settings = load_worker_settings({**REQUIRED, "WORKER_ID": "w-1"})
    assert settings.worker_jwt == TOKEN  # the transport still gets the real one
    shown = [repr(settings), str(settings), f"{settings}", repr([settings])]
    for text in shown:
        assert TOKEN not in text
        assert "worker_jwt='[REDACTED]'" in text
        assert "worker_id='w-1'" in text
        assert "engine=EngineSettings(" in text
    rich = dict(settings.__rich_repr__())
    assert rich["worker_jwt"] == "[REDACTED]"
    assert rich["worker_id"] == "w-1"
    assert TOKEN not in repr(rich)
    for part in TOKEN.split("."):
        assert part not in repr(settings)


def test_repr_shows_an_absent_token_as_none() -> None:
    settings = load_worker_settings({"WORKER_MODE": "trainer"})
    assert "worker_jwt=None" in repr(settings)
    assert repr(settings).startswith("WorkerSettings(mode='trainer', ")


def test_settings_are_frozen() -> None:
    settings = load_worker_settings(REQUIRED)
    with pytest.raises(AttributeError):
        settings.use_tls = True  # type: ignore[misc]
    assert msgspec.structs.replace(settings, use_tls=True).use_tls is True


# -- TLS decision and parsers ------------------------------------------------------------------

TLS_TABLE = [
    ("sched:8080", False, ("sched:8080", False)),
    ("sched:8080", True, ("sched:8080", True)),
    ("sched:443", False, ("sched:443", True)),
    ("grpcs://sched:8443", False, ("sched:8443", True)),
    ("GRPCS://sched:8443", False, ("sched:8443", True)),
    ("grpc://sched:8443", True, ("sched:8443", False)),
    ("grpc://sched:443", True, ("sched:443", False)),
    ("[::1]:443", False, ("[::1]:443", True)),
    ("[::1]:50051", True, ("[::1]:50051", True)),
    ("sched:4430", False, ("sched:4430", False)),
]


@pytest.mark.parametrize(("address", "use_tls", "expected"), TLS_TABLE)
def test_tls_for(address: str, use_tls: bool, expected: tuple[str, bool]) -> None:
    assert tls_for(address, use_tls) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("true", True), ("FALSE", False), ("1", True), ("0", False), ("Yes", True)],
        *[("no", False), ("ON", True), ("Off", False), (" true\n", True)],
    ],
)
def test_boolean_spellings(text: str, expected: bool) -> None:
    assert boolean("X", text) is expected


def test_addresses_keep_prefixes_and_ipv6_and_drop_blanks() -> None:
    text = " grpcs://a.example:443 ,, [::1]:50051 , grpc://10.0.0.1:1 ,b:65535, "
    expected = ("grpcs://a.example:443", "[::1]:50051", "grpc://10.0.0.1:1", "b:65535")
    assert addresses("SCHEDULER_ADDRS", text) == expected
    assert addresses("SCHEDULER_ADDRS", " , ") == ()


@pytest.mark.parametrize(
    "text", ["[::1:80", "::1:80", "a:b:80", "host:\u0661\u0662", "user@h:1", "h:-1"]
)
def test_address_refusals(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^SCHEDULER_ADDRS: .* is not a valid address"):
        addresses("SCHEDULER_ADDRS", text)
