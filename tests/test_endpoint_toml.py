"""endpoint.toml parsing and validation (SPEC section 2)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gen_worker.discovery.endpoint_toml import (
    ENDPOINT_TOML,
    EndpointConfig,
    EndpointResources,
    FunctionConfig,
    HostRequirements,
    ModelEntry,
    load_endpoint_toml,
    parse_endpoint_toml,
)
from gen_worker.errors import DefinitionError, EndpointConfigError, InvalidModelRefError
from gen_worker.refs import parse_cozy_ref

FIXTURES = Path(__file__).parent / "fixtures" / "endpoint_toml"

HEADER = 'schema_version = 1\nname = "my-worker"\nmain = "my_pkg.main"\n'

DTYPES: dict[str, tuple[str, ...]] = {"dtype": ("fp16", "bf16")}

# The README's example, verbatim.
SEED_README = (FIXTURES / "seed_readme.toml").read_text(encoding="utf-8")


def _error(text: str, path: str = "cfg/endpoint.toml") -> EndpointConfigError:
    with pytest.raises(EndpointConfigError) as info:
        parse_endpoint_toml(text, path=path)
    return info.value


# --- valid files -----------------------------------------------------------------------------


def test_spec_example_parses_to_typed_structs() -> None:
    path = FIXTURES / "spec_example.toml"
    config = load_endpoint_toml(path)
    assert config == EndpointConfig(
        path=str(path),
        schema_version=1,
        name="my-worker",
        main="my_pkg.main",
        functions={"generate": FunctionConfig(name="generate", batch_dimension="items")},
        models={
            "sdxl": ModelEntry(
                key="sdxl", ref="stabilityai/stable-diffusion-xl-base-1.0:latest", attributes=DTYPES
            ),
            "tiny": ModelEntry(key="tiny", ref="acme/tiny-model:latest", attributes={}),
        },
        models_by_function={
            "generate": {
                "dreamshaper": ModelEntry(
                    key="dreamshaper", ref="lykon/dreamshaper-xl-v2-turbo:latest", attributes=DTYPES
                )
            }
        },
        resources=EndpointResources(max_inflight_requests=1),
        host_requirements=HostRequirements(cuda="12.8", compute_capabilities=("8.0", "8.6")),
    )
    assert config.host_requirements.requires_gpu
    # The preference order of attribute lists is kept.
    assert config.models["sdxl"].attributes["dtype"] == ("fp16", "bf16")


def test_seed_readme_example() -> None:
    config = parse_endpoint_toml(SEED_README)
    assert config.path == ENDPOINT_TOML == "endpoint.toml"
    assert config.functions == {
        "generate": FunctionConfig(name="generate", batch_dimension="items")
    }
    assert config.models == {
        "sdxl": ModelEntry(
            key="sdxl", ref="stabilityai/stable-diffusion-xl-base-1.0:latest", attributes=DTYPES
        )
    }
    assert list(config.models_by_function) == ["generate"]
    assert config.models_by_function["generate"]["dreamshaper"].ref == (
        "lykon/dreamshaper-xl-v2-turbo:latest"
    )
    assert config.resources == EndpointResources(max_inflight_requests=1)
    assert config.host_requirements == HostRequirements()
    assert not config.host_requirements.requires_gpu


def test_minimal_file_has_empty_sections() -> None:
    config = parse_endpoint_toml(HEADER)
    assert (config.functions, config.models, config.models_by_function) == ({}, {}, {})
    assert config.resources == EndpointResources()
    assert config.host_requirements == HostRequirements()


def test_structs_are_frozen() -> None:
    config = parse_endpoint_toml(SEED_README)
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.models["sdxl"].ref = "a/b:latest"  # type: ignore[misc]


def test_refs_are_canonicalised_and_single_attribute_becomes_a_tuple() -> None:
    digest = "ab" * 32
    config = parse_endpoint_toml(
        HEADER
        + "[models]\n"
        + 'a = "acme/m:v2#int8"\n'
        + f'b = "acme/m@blake3:{digest}"\n'
        + 'c = { ref = "acme/m", attributes = { dtype = "fp16", "x-custom" = ["1", "2"] } }\n'
    )
    assert config.models["a"].ref == "acme/m:v2#int8"
    assert config.models["b"].ref == f"acme/m@blake3:{digest}"
    assert config.models["c"] == ModelEntry(
        key="c", ref="acme/m:latest", attributes={"dtype": ("fp16",), "x-custom": ("1", "2")}
    )


def test_function_resource_hints_are_validated_and_kept() -> None:
    config = parse_endpoint_toml(
        HEADER
        + "[functions.generate_image.resources]\n"
        + "batch_size_min = 1\nbatch_size_target = 4\nbatch_size_max = 4\n"
        + "max_wait_ms = 0\nprefetch_depth = 0\nmemory_hint_mb = 512\n"
        + 'kind = "conversion"\nrequires_gpu = true\nmin_vram_gb = 8\nvram_multiplier = 1.5\n'
        + 'compute_capability_min = "8.0"\nsupported_precisions = ["fp16", "bf16"]\n'
        + 'supported_conversion_profiles = ["sdxl-to-gguf"]\n'
        + '[functions."generate-video"]\n'
    )
    assert config.functions["generate_image"].resources == {
        "batch_size_min": 1,
        "batch_size_target": 4,
        "batch_size_max": 4,
        "max_wait_ms": 0,
        "prefetch_depth": 0,
        "memory_hint_mb": 512,
        "kind": "conversion",
        "requires_gpu": True,
        "min_vram_gb": 8.0,
        "vram_multiplier": 1.5,
        "compute_capability_min": "8.0",
        "supported_precisions": ["fp16", "bf16"],
        "supported_conversion_profiles": ["sdxl-to-gguf"],
    }
    assert isinstance(config.functions["generate_image"].resources["min_vram_gb"], float)
    assert config.functions["generate-video"] == FunctionConfig(name="generate-video")


def test_endpoint_resources_accept_ints_and_floats() -> None:
    config = parse_endpoint_toml(
        HEADER + "[resources]\nvram_gb = 24\nram_gb = 15.5\ncpu_cores = 0.5\ndisk_gb = 100\n"
    )
    assert config.resources == EndpointResources(
        vram_gb=24.0, ram_gb=15.5, cpu_cores=0.5, disk_gb=100.0
    )
    assert isinstance(config.resources.vram_gb, float)


@pytest.mark.parametrize(
    ("host", "requires_gpu"),
    [
        (HostRequirements(), False),
        (HostRequirements(cuda="12"), True),
        (HostRequirements(compute_capabilities=("9.0",)), True),
    ],
)
def test_requires_gpu(host: HostRequirements, requires_gpu: bool) -> None:
    assert host.requires_gpu is requires_gpu


def test_compute_capabilities_alone_require_a_gpu() -> None:
    config = parse_endpoint_toml(HEADER + '[host.requirements]\ncompute_capabilities = ["9.0"]\n')
    assert config.host_requirements == HostRequirements(compute_capabilities=("9.0",))
    assert config.host_requirements.requires_gpu


def test_config_round_trips_through_msgspec() -> None:
    config = parse_endpoint_toml(SEED_README)
    encoded = msgspec.json.encode(config)
    assert msgspec.json.decode(encoded, type=EndpointConfig) == config


# --- reading the file ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.toml"
    with pytest.raises(EndpointConfigError) as info:
        load_endpoint_toml(path)
    err = info.value
    assert (err.path, err.key) == (str(path), "")
    assert "file not found" in err.problem
    assert str(err).startswith(f"{path}: file not found")
    assert isinstance(err, DefinitionError)


def test_unreadable_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(EndpointConfigError) as info:
        load_endpoint_toml(tmp_path)  # a directory
    assert (info.value.path, info.value.key) == (str(tmp_path), "")
    assert "cannot read the file" in info.value.problem


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(EndpointConfigError) as info:
        load_endpoint_toml(path)
    assert info.value.path == str(path)
    assert "UTF-8" in info.value.problem


def test_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.toml"
    path.write_text('schema_version = 1\nname = "unterminated\n', encoding="utf-8")
    with pytest.raises(EndpointConfigError) as info:
        load_endpoint_toml(path)
    err = info.value
    assert (err.path, err.key) == (str(path), "")
    assert "invalid TOML" in err.problem
    assert "line 2, column" in err.problem


def test_load_records_the_path(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.toml"
    path.write_text(SEED_README, encoding="utf-8")
    assert load_endpoint_toml(str(path)) == parse_endpoint_toml(SEED_README, path=str(path))


# --- every error path ------------------------------------------------------------------------

NO_SCHEMA = 'name = "w"\nmain = "m"\n'
NO_NAME = 'schema_version = 1\nmain = "m"\n'
NO_MAIN = 'schema_version = 1\nname = "w"\n'


def _top(schema: str = "1", name: str = '"w"', main: str = '"m"') -> str:
    return f"schema_version = {schema}\nname = {name}\nmain = {main}\n"


def _fn(body: str, name: str = "generate") -> str:
    return HEADER + f"[functions.{name}]\n{body}\n"


def _hint(body: str) -> str:
    return HEADER + f"[functions.generate.resources]\n{body}\n"


def _models(body: str) -> str:
    return HEADER + f"[models]\n{body}\n"


def _keyspace(body: str, name: str = "generate") -> str:
    return HEADER + f"[models.{name}]\n{body}\n"


def _res(body: str) -> str:
    return HEADER + f"[resources]\n{body}\n"


def _req(body: str) -> str:
    return HEADER + f"[host.requirements]\n{body}\n"


HINTS = "functions.generate.resources"
ATTRS = "models.sdxl.attributes"

ERROR_CASES: list[tuple[str, str, str, str]] = [
    # (id, toml text, key path, message fragment)
    ("unknown-top-level", HEADER + "[modles]\n", "modles", "allowed in the top level: schema_"),
    ("unknown-top-scalar", HEADER + "version = 2\n", "version", "models, resources, host"),
    ("schema-missing", NO_SCHEMA, "schema_version", "missing; required: schema_version = 1"),
    ("schema-bool", _top(schema="true"), "schema_version", "got boolean true"),
    ("schema-2", _top(schema="2"), "schema_version", "expected schema_version = 1"),
    ("schema-float", _top(schema="1.0"), "schema_version", "got float 1.0"),
    ("schema-string", _top(schema='"1"'), "schema_version", "got string '1'"),
    ("name-missing", NO_NAME, "name", 'missing; required: the endpoint name, e.g. name = "my-'),
    ("name-empty", _top(name='""'), "name", "expected a non-empty string"),
    ("name-int", _top(name="3"), "name", "got integer 3"),
    ("name-no-slug", _top(name='"___"'), "name", "slug would be empty"),
    ("name-no-slug-dots", _top(name='"-.-"'), "name", 'use a name like "my-worker"'),
    ("main-missing", NO_MAIN, "main", "missing; required: main = a dotted Python module path"),
    ("main-dash", _top(main='"my-pkg.main"'), "main", "expected a dotted Python module path"),
    ("main-empty-part", _top(main='"pkg..main"'), "main", "got string 'pkg..main'"),
    ("main-keyword", _top(main='"pkg.class"'), "main", 'e.g. "my_pkg.main"'),
    ("main-colon", _top(main='"pkg.main:app"'), "main", "dotted Python module path"),
    ("main-empty", _top(main='""'), "main", "; got string ''"),
    ("main-array", _top(main='["m"]'), "main", "got an array"),
    ("functions-not-table", HEADER + "functions = 3\n", "functions", "expected a table"),
    ("function-not-table", HEADER + "functions.generate = 3\n", "functions.generate", "table"),
    ("function-name-space", _fn("", name='"Bad Name"'), 'functions."Bad Name"', "not a function"),
    ("function-name-dash", _fn("", name='"-gen"'), "functions.-gen", "generate-image"),
    ("function-name-upper", _fn("", name="Gen-X"), "functions.Gen-X", "Python name"),
    (
        "function-unknown-key",
        _fn("batch_size = 4"),
        "functions.generate.batch_size",
        "allowed in [functions.generate]: batch_dimension, resources",
    ),
    (
        "batch-dimension-empty",
        _fn('batch_dimension = ""'),
        "functions.generate.batch_dimension",
        "a list-typed payload field",
    ),
    (
        "batch-dimension-int",
        _fn("batch_dimension = 3"),
        "functions.generate.batch_dimension",
        "got integer 3",
    ),
    (
        "batch-dimension-dash",
        _fn('batch_dimension = "my-items"'),
        "functions.generate.batch_dimension",
        "a Python identifier, e.g. items",
    ),
    (
        "batch-dimension-quoted-function",
        _fn("batch_dimension = 1", name='"gen.v2"'),
        'functions."gen.v2".batch_dimension',
        "got integer 1",
    ),
    ("hints-not-table", _fn("resources = 3"), HINTS, "expected a table; got integer 3"),
    ("hint-unknown", _hint("gpus = 1"), f"{HINTS}.gpus", "batch_size_min, batch_size_target"),
    ("hint-min-zero", _hint("batch_size_min = 0"), f"{HINTS}.batch_size_min", "integer >= 1"),
    ("hint-target-bool", _hint("batch_size_target = true"), f"{HINTS}.batch_size_target", "boo"),
    ("hint-max-float", _hint("batch_size_max = 1.5"), f"{HINTS}.batch_size_max", "float 1.5"),
    ("hint-wait-negative", _hint("max_wait_ms = -1"), f"{HINTS}.max_wait_ms", "integer >= 0"),
    ("hint-prefetch-neg", _hint("prefetch_depth = -1"), f"{HINTS}.prefetch_depth", ">= 0"),
    ("hint-prefetch-str", _hint('prefetch_depth = "2"'), f"{HINTS}.prefetch_depth", "string"),
    ("hint-memory-zero", _hint("memory_hint_mb = 0"), f"{HINTS}.memory_hint_mb", ">= 1"),
    ("hint-kind", _hint('kind = "serving"'), f"{HINTS}.kind", "one of inference, conversion, tr"),
    ("hint-kind-int", _hint("kind = 1"), f"{HINTS}.kind", "got integer 1"),
    ("hint-requires-gpu", _hint('requires_gpu = "yes"'), f"{HINTS}.requires_gpu", "true or false"),
    ("hint-vram-zero", _hint("min_vram_gb = 0"), f"{HINTS}.min_vram_gb", "a number > 0"),
    ("hint-vram-bool", _hint("min_vram_gb = true"), f"{HINTS}.min_vram_gb", "got boolean true"),
    ("hint-mult-neg", _hint("vram_multiplier = -1.0"), f"{HINTS}.vram_multiplier", "number > 0"),
    ("hint-mult-str", _hint('vram_multiplier = "2"'), f"{HINTS}.vram_multiplier", "string '2'"),
    (
        "hint-cc-no-dot",
        _hint('compute_capability_min = "8"'),
        f"{HINTS}.compute_capability_min",
        'a compute capability like "8.0"',
    ),
    (
        "hint-cc-float",
        _hint("compute_capability_min = 8.0"),
        f"{HINTS}.compute_capability_min",
        "got float 8.0",
    ),
    (
        "hint-precisions-str",
        _hint('supported_precisions = "fp16"'),
        f"{HINTS}.supported_precisions",
        "expected an array of non-empty strings",
    ),
    (
        "hint-precisions-int-item",
        _hint('supported_precisions = ["fp16", 1]'),
        f"{HINTS}.supported_precisions[1]",
        "got integer 1",
    ),
    (
        "hint-profiles-empty-item",
        _hint('supported_conversion_profiles = [""]'),
        f"{HINTS}.supported_conversion_profiles[0]",
        "non-empty string",
    ),
    (
        "hint-min-above-max",
        _hint("batch_size_min = 8\nbatch_size_max = 2"),
        f"{HINTS}.batch_size_min",
        "batch_size_min (8) is greater than batch_size_max (2)",
    ),
    (
        "hint-min-above-target",
        _hint("batch_size_min = 4\nbatch_size_target = 2\nbatch_size_max = 8"),
        f"{HINTS}.batch_size_min",
        "batch_size_min <= batch_size_target <= batch_size_max",
    ),
    (
        "hint-target-above-max",
        _hint("batch_size_target = 16\nbatch_size_max = 8"),
        f"{HINTS}.batch_size_target",
        "batch_size_target (16) is greater than batch_size_max (8)",
    ),
    ("models-not-table", HEADER + "models = 3\n", "models", "expected a table"),
    ("fixed-model-int", _models("sdxl = 3"), "models.sdxl", "got integer 3"),
    ("fixed-model-bool", _models("sdxl = true"), "models.sdxl", "a function keyspace table"),
    ("fixed-model-array", _models('sdxl = ["a/b"]'), "models.sdxl", 'model ref string ("owner'),
    (
        "entry-unknown-key",
        _models('sdxl = { ref = "a/b", dtype = "fp16" }'),
        "models.sdxl.dtype",
        "allowed in [models.sdxl]: ref, attributes",
    ),
    ("entry-ref-int", _models("sdxl = { ref = 3 }"), "models.sdxl.ref", "model ref string like"),
    ("attributes-not-table", _models('sdxl = { ref = "a/b", attributes = 3 }'), ATTRS, "table"),
    (
        "attribute-int",
        _models('sdxl = { ref = "a/b", attributes = { dtype = 1 } }'),
        f"{ATTRS}.dtype",
        "expected a non-empty string or a non-empty array of non-empty strings",
    ),
    (
        "attribute-empty-list",
        _models('sdxl = { ref = "a/b", attributes = { dtype = [] } }'),
        f"{ATTRS}.dtype",
        "got an array",
    ),
    (
        "attribute-empty-string",
        _models('sdxl = { ref = "a/b", attributes = { dtype = "" } }'),
        f"{ATTRS}.dtype",
        "got string ''",
    ),
    (
        "attribute-list-with-int",
        _models('sdxl = { ref = "a/b", attributes = { dtype = ["fp16", 2] } }'),
        f"{ATTRS}.dtype[1]",
        "got integer 2",
    ),
    (
        "attribute-quoted-key",
        _models('sdxl = { ref = "a/b", attributes = { "my key" = 1 } }'),
        f'{ATTRS}."my key"',
        "non-empty array",
    ),
    ("ref-upper-case", _models('sdxl = "Acme/Model"'), "models.sdxl", "lower-case"),
    ("ref-upper-case-table", _models('s = { ref = "acme/Model" }'), "models.s.ref", "lower-case"),
    ("ref-hf-prefix", _models('sdxl = "hf:acme/model"'), "models.sdxl", "provider prefix (hf:)"),
    ("ref-hf-upper", _models('sdxl = "HF:Acme/Model"'), "models.sdxl", "provider prefix"),
    ("ref-other-provider", _models('sdxl = "civitai:a/b"'), "models.sdxl", "provider prefix"),
    ("ref-three-parts", _models('sdxl = "a/b/c"'), "models.sdxl", "invalid model ref 'a/b/c'"),
    ("ref-two-tags", _models('sdxl = "o/r:t:u"'), "models.sdxl", "owner/repo[:tag]"),
    ("ref-no-slash", _models('sdxl = "sdxl:latest"'), "models.sdxl", "invalid model ref"),
    ("ref-empty", _models('sdxl = ""'), "models.sdxl", "invalid model ref"),
    ("ref-bad-digest", _models('sdxl = "a/b@blake3:xyz"'), "models.sdxl", "blake3"),
    ("keyspace-empty", HEADER + "[models.generate]\n", "models.generate", "empty function keys"),
    (
        "keyspace-nested-table",
        _keyspace('[models.generate.sub]\nx = "a/b"'),
        "models.generate.sub",
        "entries of [models.generate] must be a model ref string or a table with a ref",
    ),
    (
        "keyspace-inline-table-without-ref",
        _keyspace('d = { attributes = { dtype = "fp16" } }'),
        "models.generate.d",
        "got a table without ref",
    ),
    ("keyspace-entry-int", _keyspace("d = 3"), "models.generate.d", "got integer 3"),
    (
        "keyspace-bad-name",
        _keyspace('d = "a/b"', name='"Bad Name"'),
        'models."Bad Name"',
        "not a function name",
    ),
    (
        "keyspace-entry-bad-ref",
        _keyspace('dreamshaper = { ref = "a/b/c" }'),
        "models.generate.dreamshaper.ref",
        "invalid model ref 'a/b/c'",
    ),
    (
        "keyspace-entry-unknown-key",
        _keyspace('d = { ref = "a/b", tag = "x" }'),
        "models.generate.d.tag",
        "allowed in [models.generate.d]: ref, attributes",
    ),
    ("resources-not-table", HEADER + "resources = 3\n", "resources", "expected a table"),
    ("resources-vram-zero", _res("vram_gb = 0"), "resources.vram_gb", "a number > 0"),
    ("resources-ram-negative", _res("ram_gb = -1"), "resources.ram_gb", "got integer -1"),
    ("resources-cpu-bool", _res("cpu_cores = true"), "resources.cpu_cores", "got boolean true"),
    ("resources-disk-string", _res('disk_gb = "10"'), "resources.disk_gb", "got string '10'"),
    ("resources-vram-inf", _res("vram_gb = inf"), "resources.vram_gb", "got float inf"),
    ("resources-vram-nan", _res("vram_gb = nan"), "resources.vram_gb", "got float nan"),
    (
        "resources-inflight-zero",
        _res("max_inflight_requests = 0"),
        "resources.max_inflight_requests",
        "an integer >= 1; got integer 0",
    ),
    (
        "resources-inflight-negative",
        _res("max_inflight_requests = -1"),
        "resources.max_inflight_requests",
        "got integer -1",
    ),
    (
        "resources-inflight-float",
        _res("max_inflight_requests = 2.0"),
        "resources.max_inflight_requests",
        "got float 2.0",
    ),
    (
        "resources-inflight-bool",
        _res("max_inflight_requests = true"),
        "resources.max_inflight_requests",
        "got boolean true",
    ),
    (
        "resources-inflight-string",
        _res('max_inflight_requests = "1"'),
        "resources.max_inflight_requests",
        "got string '1'",
    ),
    (
        "resources-unknown-key",
        _res("gpus = 1"),
        "resources.gpus",
        "allowed in [resources]: vram_gb, ram_gb, cpu_cores, disk_gb, max_inflight_requests",
    ),
    ("host-not-table", HEADER + "host = 3\n", "host", "expected a table"),
    ("host-unknown-key", HEADER + "[host.require]\n", "host.require", "in [host]: requirements"),
    ("host-requirements-int", HEADER + "[host]\nrequirements = 1\n", "host.requirements", "tab"),
    (
        "host-requirements-unknown",
        _req("gpu = true"),
        "host.requirements.gpu",
        "allowed in [host.requirements]: cuda, compute_capabilities",
    ),
    ("cuda-letters", _req('cuda = "12.x"'), "host.requirements.cuda", 'like "12.8"'),
    ("cuda-float", _req("cuda = 12.8"), "host.requirements.cuda", "got float 12.8"),
    ("cuda-four-parts", _req('cuda = "1.2.3.4"'), "host.requirements.cuda", "'1.2.3.4'"),
    ("cuda-empty", _req('cuda = ""'), "host.requirements.cuda", "a CUDA version"),
    (
        "capabilities-string",
        _req('compute_capabilities = "8.0"'),
        "host.requirements.compute_capabilities",
        "expected an array of compute capabilities",
    ),
    (
        "capabilities-no-dot",
        _req('compute_capabilities = ["8.0", "9"]'),
        "host.requirements.compute_capabilities[1]",
        "got string '9'",
    ),
    (
        "capabilities-float",
        _req("compute_capabilities = [8.0]"),
        "host.requirements.compute_capabilities[0]",
        'compute capabilities like "8.0"; got float 8.0',
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [pytest.param(text, key, fragment, id=case_id) for case_id, text, key, fragment in ERROR_CASES],
)
def test_error_names_file_key_and_fix(text: str, key: str, fragment: str) -> None:
    err = _error(text)
    assert err.path == "cfg/endpoint.toml"
    assert err.key == key
    assert fragment in err.problem
    prefix = f"cfg/endpoint.toml: {key}: " if key else "cfg/endpoint.toml: "
    assert str(err) == prefix + err.problem


def test_error_case_ids_are_unique() -> None:
    ids = [case[0] for case in ERROR_CASES]
    assert len(ids) == len(set(ids))


def test_default_path_in_errors() -> None:
    with pytest.raises(EndpointConfigError) as info:
        parse_endpoint_toml(NO_SCHEMA)
    assert str(info.value).startswith("endpoint.toml: schema_version: missing")


def test_syntax_error_from_text() -> None:
    err = _error("schema_version = = 1\n")
    assert err.key == ""
    assert "invalid TOML" in err.problem
    assert "line 1, column" in err.problem


@pytest.mark.parametrize("ref", ["a/b/c", "Acme/Model", "o/r:t:u", "a/b@sha256:00"])
def test_ref_errors_carry_the_ref_rule(ref: str) -> None:
    with pytest.raises(InvalidModelRefError) as ref_info:
        parse_cozy_ref(ref)
    err = _error(_models(f'm = "{ref}"'))
    assert err.key == "models.m"
    assert ref_info.value.rule in err.problem
    assert isinstance(err.__cause__, InvalidModelRefError)


def test_first_unknown_key_wins_and_is_checked_before_schema_version() -> None:
    # A typo of a required key is reported as the typo, not as the key being missing.
    err = _error('schema_versoin = 1\nname = "w"\nmain = "m"\n')
    assert err.key == "schema_versoin"


def test_long_values_are_shortened_in_messages() -> None:
    err = _error(_top(name='"' + "_" * 5000 + '"'))
    assert err.key == "name"
    assert len(str(err)) < 400


def test_schema_version_is_checked_before_the_sections() -> None:
    err = _error(_top(schema="2") + '[models]\nsdxl = "Bad/Ref"\n')
    assert err.key == "schema_version"
