"""Strict payload decoding and output encoding, with decoders built once per function."""

from __future__ import annotations

from typing import Any

import msgspec

from gen_worker.authoring import FunctionSpec
from gen_worker.engine.request import Codec
from gen_worker.errors import GenWorkerError, ValidationError

__all__ = ["FunctionCodec", "WrongTypeError"]


class WrongTypeError(GenWorkerError):
    """The function returned or yielded something other than its declared Struct."""


class FunctionCodec:
    """Decoders for one function's payload and encoders for its outputs."""

    _json_encoder = msgspec.json.Encoder()
    _msgpack_encoder = msgspec.msgpack.Encoder()

    def __init__(self, spec: FunctionSpec) -> None:
        self._spec = spec
        # msgspec decoders are strict: no type coercion; unknown fields follow the Struct.
        self._json = msgspec.json.Decoder(spec.payload_type)
        self._msgpack = msgspec.msgpack.Decoder(spec.payload_type)

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
