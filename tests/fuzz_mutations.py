"""Hypothesis strategies that mutate valid encodings: the "mutated valid input" half of
the fuzz targets (``tests/fuzz_targets.py``, ``tests/fuzz_http.py``).

Byte-level edits reach the framing and CBOR layers; retyping (decode, change one field's
type or value, re-encode) yields well-formed CBOR that only the message checks can refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cbor2
from hypothesis import strategies as st

# Arbitrary inputs are at most this long: big enough for any control message.
MAX_INPUT = 4096

# Values that a CBOR field could wrongly hold: every major type, edge integers, bad text.
_ODD_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([0, 1, -1, 2**32, 2**63, 2**64 - 1, -(2**64), True, False, None]),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "sha256:" + "0" * 64, "../x", "a" * 300, "\u202e"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def _retyped(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one field, list item or key replaced, added or removed."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        action = draw(st.sampled_from(["replace", "recurse", "drop", "add"]))
        if action == "replace":
            out[key] = draw(_ODD_VALUES)
        elif action == "recurse":
            out[key] = draw(_retyped(value[key]))
        elif action == "drop":
            del out[key]
        else:
            out[draw(st.text(max_size=3))] = draw(_ODD_VALUES)
        return out
    if isinstance(value, list) and value and draw(st.integers(0, 3)):
        index = draw(st.integers(0, len(value) - 1))
        out_list = list(value)
        out_list[index] = draw(st.one_of(_ODD_VALUES, _retyped(value[index])))
        return out_list
    return draw(_ODD_VALUES)


@st.composite
def retyped_cbor(draw: st.DrawFn, encoded: bytes) -> bytes:
    """A valid CBOR message with one field's type or value changed, still valid CBOR."""
    value = _retyped(cbor2.loads(encoded))
    return cbor2.dumps(draw(value), canonical=draw(st.booleans()))


@st.composite
def byte_mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after one to four byte-level edits: flip, set, insert, delete, truncate."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if action == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and out:
            # CBOR heads the decoder must refuse or bound: long arguments, indefinite
            # lengths, tags, floats, the break byte.
            out[at] = draw(
                st.one_of(
                    st.integers(0, 255),
                    st.sampled_from([0x18, 0x1B, 0x5B, 0x9F, 0xBF, 0xC0, 0xF9, 0xFF]),
                )
            )
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and out:
            del out[at : at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del out[at:]
        elif action == "dup" and out:
            end = min(len(out), at + draw(st.integers(1, 16)))
            out[end:end] = out[at:end]
    return bytes(out)


def mutated(valid: Sequence[bytes], *, cbor: bool = True) -> st.SearchStrategy[bytes]:
    """Each of ``valid`` as it is, byte-mutated or (if CBOR) retyped; arbitrary bytes."""
    base = st.sampled_from(list(valid))
    parts: list[st.SearchStrategy[bytes]] = [
        base,
        st.binary(max_size=MAX_INPUT),
        base.flatmap(byte_mutated),
    ]
    if cbor:
        parts.append(base.flatmap(retyped_cbor))
        parts.append(base.flatmap(retyped_cbor).flatmap(byte_mutated))
    return st.one_of(parts)


@st.composite
def mutated_stream(
    draw: st.DrawFn, frames: Sequence[bytes], framer: Callable[[bytes], bytes], cbor: bool
) -> bytes:
    """A stream of framed messages, some retyped before framing, then byte-mutated."""
    if draw(st.integers(0, 3)) == 0:
        chosen = list(frames)  # the whole valid conversation, in order
    else:
        chosen = draw(st.lists(st.sampled_from(list(frames)), min_size=1, max_size=6))
    out = []
    for payload in chosen:
        if cbor and draw(st.integers(0, 3)) == 0:
            payload = draw(retyped_cbor(payload))
        out.append(framer(payload))
    stream = b"".join(out)
    return draw(byte_mutated(stream)) if draw(st.booleans()) else stream


def whole_stream(frames: Sequence[bytes], framer: Callable[[bytes], bytes]) -> tuple[bytes, int]:
    """The valid conversation, unmutated, as one ``stream_strategy`` value."""
    return b"".join(framer(payload) for payload in frames), 4096


def stream_strategy(
    frames: Sequence[bytes], framer: Callable[[bytes], bytes], *, cbor: bool = True
) -> Any:
    data = st.one_of(st.binary(max_size=MAX_INPUT), mutated_stream(frames, framer, cbor))
    # How the bytes are cut into reads matters to a buffering decoder.
    return st.tuples(data, st.integers(1, 4096))
