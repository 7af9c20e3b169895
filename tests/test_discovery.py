"""Discovery of scenario projects (tests/fixtures/projects/<scenario>): in-process and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gen_worker.discovery import EndpointLock, decode_lock, discover, encode_lock
from gen_worker.errors import DefinitionError, EndpointConfigError

PROJECTS = Path(__file__).parent / "fixtures" / "projects"


def lock_of(scenario: str) -> EndpointLock:
    return discover(PROJECTS / scenario, isolated=True).lock


def fail(scenario: str) -> str:
    with pytest.raises(DefinitionError) as info:
        discover(PROJECTS / scenario, isolated=True)
    return str(info.value)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gen_worker.discover", *args],
        capture_output=True,
        cwd=cwd,
        check=False,
        timeout=60,
    )


# -- the valid scenario -------------------------------------------------------------------


def test_valid_project_lock_contents() -> None:
    lock = lock_of("valid")
    assert (lock.schema_version, lock.endpoint_name, lock.main) == (1, "valid", "scn_valid")
    assert [f.name for f in lock.functions] == ["embed-texts", "generate"]
    embed, generate = lock.functions
    assert embed.python_name == "scn_valid:embed"
    assert (embed.streaming, embed.is_async) == (True, True)
    assert embed.batch_dimension == "texts"
    # endpoint.toml's per-function hints override the decorator's
    assert embed.resources == {"batch_size_max": 32}
    assert (
        embed.delta_schema == embed.output_schema
        and embed.delta_schema_sha256 == embed.output_schema_sha256
    )
    assert [(i.param, i.type, i.source, i.key) for i in embed.injections] == [
        ("encoder", "builtins.str", "fixed", "encoder")
    ]
    assert (generate.streaming, generate.is_async, generate.timeout_s) == (False, False, 30.0)
    assert generate.resources == {"min_vram_gb": 8, "batch_size_max": 8}
    assert generate.delta_schema is None
    assert generate.injections[0].source == "payload"
    assert lock.models["encoder"].ref == "acme/encoder:v2"
    assert lock.models["encoder"].attributes == {"dtype": ["fp16", "bf16"]}
    assert set(lock.models_by_function) == {"generate"}
    keyspace = lock.models_by_function["generate"]
    assert keyspace["fast"].ref == "acme/fast-gen:latest"
    assert keyspace["good"].ref == "acme/good-gen@blake3:" + "0123456789abcdef" * 4 + "#fp8"
    assert lock.resources == {"vram_gb": 24, "max_inflight_requests": 2}
    assert lock.host_requirements == {"cuda": "12.8", "compute_capabilities": ["8.0", "9.0"]}


def test_lock_is_deterministic_and_round_trips() -> None:
    first = encode_lock(lock_of("valid"))
    second = encode_lock(lock_of("valid"))
    assert first == second
    assert b"null" not in first
    lock = decode_lock(first)
    assert lock == lock_of("valid")
    assert encode_lock(lock) == first


def test_schema_hashes_match_the_canonical_schema_text() -> None:
    import hashlib

    for fn in lock_of("valid").functions:
        assert hashlib.sha256(fn.input_schema.encode()).hexdigest() == fn.input_schema_sha256
        assert hashlib.sha256(fn.output_schema.encode()).hexdigest() == fn.output_schema_sha256
        schema = json.loads(fn.input_schema)
        assert json.dumps(schema, sort_keys=True, separators=(",", ":")) == fn.input_schema


def test_schemas_cover_nested_optional_lists_enums_literals_and_defaults() -> None:
    (render,) = lock_of("schemas").functions
    schema = json.loads(render.input_schema)
    rich = schema["$defs"]["Rich"]
    props = rich["properties"]
    assert schema["$ref"] == "#/$defs/Rich"
    assert rich["required"] == ["prompt", "size"]
    assert props["size"] == {"$ref": "#/$defs/Size"}
    assert schema["$defs"]["Size"]["properties"]["height"] == {"type": "integer", "default": 512}
    assert props["negative"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert props["steps"] == {"type": "integer", "default": 20}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert schema["$defs"]["Color"]["enum"] == ["blue", "red"]
    assert props["color"] == {"$ref": "#/$defs/Color", "default": "red"}
    assert props["sampler"] == {"enum": ["ddim", "euler"], "default": "euler"}
    assert {"$ref": "#/$defs/Asset"} in props["image"]["anyOf"]
    assert json.loads(render.output_schema)["$ref"] == "#/$defs/Size"


def test_src_layout_bare_decorator_and_endpoint_slug() -> None:
    lock = lock_of("src_layout")
    assert lock.endpoint_name == "src-layout"
    assert [f.name for f in lock.functions] == ["echo"]
    assert lock.functions[0].python_name == "scn_src_layout_pkg.main:echo"


def test_isolated_discovery_leaves_no_imports_behind() -> None:
    before = set(sys.modules)
    path = list(sys.path)
    lock_of("valid")
    assert "scn_valid" not in sys.modules
    assert set(sys.modules) - before == set()
    assert sys.path == path


# -- every failing scenario -----------------------------------------------------------------

FAILURES: list[tuple[str, type[DefinitionError], list[str]]] = [
    (
        "import_error",
        DefinitionError,
        [
            "importing 'scn_import_error' failed",
            "scn_import_error.py:1",
            "RuntimeError: boom while importing",
        ],
    ),
    (
        "missing_dependency",
        DefinitionError,
        [
            "importing 'scn_missing_dependency' failed",
            "definitely_not_installed_package",
            "is a dependency missing?",
        ],
    ),
    (
        "missing_main",
        DefinitionError,
        ["module 'scn_missing_main_absent' (endpoint.toml `main`) was not found", "check `main`"],
    ),
    ("no_functions", DefinitionError, ["module 'scn_no_functions' defines no @worker_function"]),
    (
        "bad_signature",
        DefinitionError,
        [
            "importing 'scn_bad_signature' failed",
            "worker function 'scn_bad_signature.broken' returns int",
        ],
    ),
    (
        "duplicate_slug",
        DefinitionError,
        [
            "'scn_duplicate_slug:make_image' and 'scn_duplicate_slug:other' both have the slug",
            "slug 'make-image'",
            "name=...",
        ],
    ),
    (
        "unknown_fixed_key",
        EndpointConfigError,
        [
            "endpoint.toml: models.flux:",
            "parameter 'pipe' uses ModelRef(FIXED, 'flux')",
            "declared: ['sdxl']",
        ],
    ),
    (
        "payload_field_not_str",
        DefinitionError,
        [
            "parameter 'pipe' selects its model with payload field 'model', which is typed int",
            "must be a `str`",
        ],
    ),
    (
        "missing_keyspace",
        EndpointConfigError,
        ["endpoint.toml: models.paint:", "needs a [models.paint] table"],
    ),
    (
        "selector_default_not_in_keyspace",
        EndpointConfigError,
        [
            "models.paint:",
            "In.model",
            "allows 'b', which is not a key of this table",
            "valid keys: ['a']",
        ],
    ),
    (
        "keyspace_unknown_function",
        EndpointConfigError,
        ["endpoint.toml: models.pant: names no worker function", "'paint'"],
    ),
    (
        "batch_dimension_not_list",
        EndpointConfigError,
        [
            "functions.paint.batch_dimension: 'x' is not a list field of In",
            "list fields: ['items']",
        ],
    ),
    (
        "function_table_unknown",
        EndpointConfigError,
        ["functions.pain: names no worker function", "['paint']"],
    ),
    (
        "resources_conflict",
        EndpointConfigError,
        ["functions.paint.resources:", "batch_size_min=16 is larger than batch_size_max=8"],
    ),
]


@pytest.mark.parametrize(("scenario", "cls", "fragments"), FAILURES, ids=[f[0] for f in FAILURES])
def test_failing_scenarios(scenario: str, cls: type[DefinitionError], fragments: list[str]) -> None:
    with pytest.raises(cls) as info:
        discover(PROJECTS / scenario, isolated=True)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_endpoint_toml(tmp_path: Path) -> None:
    with pytest.raises(
        EndpointConfigError, match=r"endpoint\.toml: file not found; create endpoint\.toml"
    ):
        discover(tmp_path, isolated=True)


# -- the command line ---------------------------------------------------------------------


def test_cli_prints_the_lock_on_stdout() -> None:
    result = run_cli("--project", str(PROJECTS / "valid"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout == encode_lock(lock_of("valid"))


def test_cli_defaults_to_the_current_folder() -> None:
    result = run_cli(cwd=PROJECTS / "src_layout")
    assert result.returncode == 0, result.stderr
    assert decode_lock(result.stdout).endpoint_name == "src-layout"


@pytest.mark.parametrize(
    "scenario", ["import_error", "missing_main", "unknown_fixed_key", "bad_signature"]
)
def test_cli_error_is_one_line_on_stderr_and_nothing_on_stdout(scenario: str) -> None:
    result = run_cli("--project", str(PROJECTS / scenario))
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_gen_worker_discover_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gen_worker.cli", "discover", "--project", str(PROJECTS / "valid")],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == encode_lock(lock_of("valid"))


def test_discovery_does_not_import_torch_or_grpc() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from gen_worker.discover import main
        code = main(["--project", {str(PROJECTS / "valid")!r}])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "grpc", "google"))
        sys.stderr.write(repr(loaded))
        sys.exit(code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=False, timeout=60
    )
    assert result.returncode == 0
    assert result.stderr == b"[]"


# -- the seed README's Quick Start function, verbatim ----------------------------------------

SEED_QUICK_START = """import msgspec
from gen_worker import RequestContext, worker_function

class Input(msgspec.Struct):
    prompt: str

class Output(msgspec.Struct):
    text: str

@worker_function()
def generate(ctx: RequestContext, payload: Input) -> Output:
    return Output(text=f"Hello, {payload.prompt}!")
"""


def test_seed_quick_start_discovers(tmp_path: Path) -> None:
    package = tmp_path / "src" / "seed_quick_start_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(SEED_QUICK_START)
    (tmp_path / "endpoint.toml").write_text(
        'schema_version = 1\nname = "my-worker"\nmain = "seed_quick_start_pkg.main"\n'
    )
    result = run_cli("--project", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lock = decode_lock(result.stdout)
    assert lock.endpoint_name == "my-worker"
    (fn,) = lock.functions
    assert (fn.name, fn.python_name, fn.streaming, fn.is_async) == (
        "generate",
        "seed_quick_start_pkg.main:generate",
        False,
        False,
    )
    assert json.loads(fn.input_schema)["$defs"]["Input"]["required"] == ["prompt"]
    assert json.loads(fn.output_schema)["$defs"]["Output"]["properties"] == {
        "text": {"type": "string"}
    }


def test_decode_lock_rejects_garbage() -> None:
    with pytest.raises(DefinitionError, match=r"is not a valid endpoint\.lock"):
        decode_lock(b"schema_version = 'x'")
