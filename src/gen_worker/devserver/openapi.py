"""The OpenAPI document of the dev runner, generated from the functions' msgspec types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gen_worker.authoring import FunctionSpec

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _invoke_response_schema(output_ref: dict[str, Any], streaming: bool) -> dict[str, Any]:
    output = {"type": "null"} if streaming else {"anyOf": [output_ref, {"type": "null"}]}
    return {
        "type": "object",
        "required": ["request_id", "success"],
        "properties": {
            "request_id": {"type": "string"},
            "success": {"type": "boolean"},
            "output": output,
            "error_type": {"type": ["string", "null"]},
            "safe_message": {"type": ["string", "null"]},
            "error_message": {"type": ["string", "null"]},
            "events": {"type": "array", "items": {"type": "object"}},
            "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    }


def _operation(
    spec: FunctionSpec, payload_ref: dict[str, Any], output_ref: dict[str, Any]
) -> dict[str, Any]:
    ok: dict[str, Any] = {
        "application/json": {"schema": _invoke_response_schema(output_ref, spec.is_streaming)}
    }
    if spec.is_streaming:
        ok = {"text/event-stream": {"schema": {"type": "string"}}}
        description = "Server-sent events: progress, delta, event, then result or error."
    else:
        description = "The function's output, with its events and timings."
    errors = {
        str(code): {"description": text}
        for code, text in [
            (400, "validation: the payload is wrong"),
            (404, "unknown function"),
            (409, "canceled"),
            (413, "input or output too large"),
            (429, "busy: the queue is full"),
            (500, "internal or fatal failure"),
            (503, "retryable or resource failure"),
            (504, "timeout"),
        ]
    }
    return {
        "operationId": f"invoke_{spec.name}",
        "summary": (spec.func.__doc__ or spec.name).strip().splitlines()[0],
        "requestBody": {"required": True, "content": {"application/json": {"schema": payload_ref}}},
        "responses": {"200": {"description": description, "content": ok}, **errors},
    }


def openapi_document(title: str, version: str, functions: Sequence[FunctionSpec]) -> dict[str, Any]:
    types: list[Any] = []
    for spec in functions:
        types += [spec.payload_type, spec.output_type]
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, Any] = {}
    for index, spec in enumerate(functions):
        operation = _operation(spec, refs[2 * index], refs[2 * index + 1])
        paths[f"/v1/request/{spec.name}"] = {"post": operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
