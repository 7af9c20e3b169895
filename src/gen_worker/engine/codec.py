"""Strict payload decoding and output encoding, with decoders built once per function."""

from __future__ import annotations

from typing import Any

import msgspec

from gen_worker.authoring import Asset, FunctionSpec
from gen_worker.engine.request import Codec
from gen_worker.errors import GenWorkerError, ValidationError

__all__ = ["FunctionCodec", "WrongTypeError"]


class WrongTypeError(GenWorkerError):
    """The function returned or yielded something other than its declared Struct."""


def _may_hold_assets(tp: Any) -> bool:
    """Whether a value of type ``tp`` can contain an Asset anywhere (Any counts as yes)."""
    seen: set[int] = set()
    stack = [msgspec.inspect.type_info(tp)]
    while stack:
        info = stack.pop()
        if id(info) in seen:
            continue
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.AnyType):
            return True
        if isinstance(info, msgspec.inspect.StructType):
            if issubclass(info.cls, Asset):
                return True
            stack.extend(f.type for f in info.fields)
        else:
            stack.extend(_children(info))
    return False


def _children(info: msgspec.inspect.Type) -> list[msgspec.inspect.Type]:
    out: list[msgspec.inspect.Type] = []
    for name in ("item_type", "key_type", "value_type", "types", "item_types"):
        value = getattr(info, name, None)
        if isinstance(value, tuple):
            out.extend(value)
        elif value is not None:
            out.append(value)
    return out


class FunctionCodec:
    """Decoders for one function's payload and encoders for its outputs."""

    _json_encoder = msgspec.json.Encoder()
    _msgpack_encoder = msgspec.msgpack.Encoder()

    def __init__(self, spec: FunctionSpec) -> None:
        self._spec = spec
        # msgspec decoders are strict: no type coercion; unknown fields follow the Struct.
        self._json = msgspec.json.Decoder(spec.payload_type)
        self._msgpack = msgspec.msgpack.Decoder(spec.payload_type)
        # Decided once per function: walking every payload for Assets costs on each request.
        self.payload_may_hold_assets = _may_hold_assets(spec.payload_type)
        self.output_may_hold_assets = _may_hold_assets(spec.output_type)

    def decode(self, data: bytes, codec: Codec) -> msgspec.Struct:
        decoder = self._json if codec is Codec.JSON else self._msgpack
        try:
            payload: msgspec.Struct = decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"invalid payload: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ValidationError(f"payload is not valid {codec.value}: {exc}") from None
        return payload

    def encode(self, value: Any, codec: Codec, *, what: str = "returned") -> bytes:
        expected = self._spec.output_type
        if not isinstance(value, expected):
            raise WrongTypeError(
                f"worker function '{self._spec.python_name}' {what} {type(value).__qualname__}, "
                f"expected {expected.__qualname__}"
            )
        if codec is Codec.JSON:
            return self._json_encoder.encode(value)
        return self._msgpack_encoder.encode(value)
