"""Canonical CBOR for dmm messages: cbor2 encodes, a strict decoder here reads.

Why not ``cbor2.loads``: it ignores trailing bytes, decodes semantic tags into datetimes,
decimals, regexes and self-referencing structures, and accepts non-canonical encodings.
dmm messages use only a small subset, so the decoder accepts exactly that subset in its
canonical form (RFC 7049 §3.9, what ``cbor2.dumps(canonical=True)`` writes): unsigned and
negative integers up to 64 bits in their shortest form, byte and text strings, arrays,
maps with text keys in canonical order without duplicates, ``true``, ``false`` and
``null``; definite lengths only, no tags, no floats. Anything else is a
``RemoteProtocolError``. Accepting only canonical input means ``dumps(loads(b)) == b``,
so a signed record has exactly one encoding.
"""

from __future__ import annotations

from typing import TypeAlias

import cbor2

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Value", "dumps", "loads"]

Value: TypeAlias = "int | bytes | str | bool | list[Value] | dict[str, Value] | None"

# Our deepest message is a map of arrays of maps; anything nested deeper is refused
# before it can cost stack or time.
DEFAULT_MAX_DEPTH = 4

_MAJOR_UINT = 0
_MAJOR_NEGINT = 1
_MAJOR_BYTES = 2
_MAJOR_TEXT = 3
_MAJOR_ARRAY = 4
_MAJOR_MAP = 5
_MAJOR_TAG = 6
_MAJOR_SIMPLE = 7

_SIMPLE_VALUES: dict[int, bool | None] = {20: False, 21: True, 22: None}
# Additional-info value -> (argument byte count, smallest value that needs that many bytes).
_ARG_WIDTH = {24: (1, 24), 25: (2, 1 << 8), 26: (4, 1 << 16), 27: (8, 1 << 32)}


def dumps(value: object) -> bytes:
    """Canonical CBOR of ``value`` (ints, bytes, str, bool, None, lists/tuples, str-keyed dicts)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(value).__name__} as CBOR: {exc}") from exc


def loads(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Value:
    """Decode exactly one canonical CBOR item filling all of ``data``."""
    value, pos = _Decoder(data, max_depth).item(0, 0)
    if pos != len(data):
        raise RemoteProtocolError(f"{len(data) - pos} trailing bytes after the CBOR item")
    return value


class _Decoder:
    __slots__ = ("data", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.max_depth = max_depth

    def head(self, pos: int) -> tuple[int, int, int, int]:
        """(major type, additional info, argument, position after the head)."""
        data = self.data
        if pos >= len(data):
            raise RemoteProtocolError("CBOR item truncated")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            return major, info, info, pos
        if info == 31:
            raise RemoteProtocolError("indefinite-length CBOR items are not accepted")
        if major == _MAJOR_SIMPLE:
            # Floats (25-27) and the 1-byte simple values (24) are not used by dmm.
            raise RemoteProtocolError("CBOR floats and extended simple values are not accepted")
        if info not in _ARG_WIDTH:
            raise RemoteProtocolError(f"reserved CBOR additional information {info}")
        width, smallest = _ARG_WIDTH[info]
        end = pos + width
        if end > len(data):
            raise RemoteProtocolError("CBOR item truncated")
        arg = int.from_bytes(data[pos:end], "big")
        if arg < smallest:
            raise RemoteProtocolError("non-canonical CBOR integer encoding")
        return major, info, arg, end

    def item(self, pos: int, depth: int) -> tuple[Value, int]:
        major, info, arg, pos = self.head(pos)
        if major == _MAJOR_UINT:
            return arg, pos
        if major == _MAJOR_NEGINT:
            return -1 - arg, pos
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            end = pos + arg
            if end > len(self.data):
                raise RemoteProtocolError("CBOR string truncated")
            raw = self.data[pos:end]
            if major == _MAJOR_BYTES:
                return bytes(raw), end
            try:
                return raw.decode("utf-8"), end
            except UnicodeDecodeError:
                raise RemoteProtocolError("CBOR text string is not valid UTF-8") from None
        if major == _MAJOR_ARRAY:
            return self.array(pos, arg, depth)
        if major == _MAJOR_MAP:
            return self.map(pos, arg, depth)
        if major == _MAJOR_TAG:
            raise RemoteProtocolError("CBOR tags are not accepted")
        if info in _SIMPLE_VALUES:
            return _SIMPLE_VALUES[info], pos
        raise RemoteProtocolError(f"CBOR simple value {info} is not accepted")

    def array(self, pos: int, count: int, depth: int) -> tuple[Value, int]:
        self.enter(depth, count, pos)
        items: list[Value] = []
        for _ in range(count):
            value, pos = self.item(pos, depth + 1)
            items.append(value)
        return items, pos

    def map(self, pos: int, count: int, depth: int) -> tuple[Value, int]:
        self.enter(depth, 2 * count, pos)
        result: dict[str, Value] = {}
        previous: bytes | None = None
        for _ in range(count):
            key_start = pos
            key, pos = self.item(pos, depth + 1)
            if not isinstance(key, str):
                raise RemoteProtocolError("CBOR map key is not a text string")
            encoded = self.data[key_start:pos]
            # Canonical order: shorter encoded keys first, then bytewise; strictly
            # increasing, which also rules out duplicate keys.
            if previous is not None and (len(encoded), encoded) <= (len(previous), previous):
                raise RemoteProtocolError("CBOR map keys are duplicated or not in canonical order")
            previous = encoded
            result[key], pos = self.item(pos, depth + 1)
        return result, pos

    def enter(self, depth: int, min_items: int, pos: int) -> None:
        if depth >= self.max_depth:
            raise RemoteProtocolError(f"CBOR nesting deeper than {self.max_depth}")
        # Every item takes at least one byte: a count larger than what is left is a lie,
        # refused before looping over it.
        if min_items > len(self.data) - pos:
            raise RemoteProtocolError("CBOR container longer than the message")
