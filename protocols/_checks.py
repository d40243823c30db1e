"""Field checks shared by the codecs: exact types, sizes and names of decoded CBOR values.

Checks raise ``Invalid`` with a short reason; each codec turns that into
``RemoteProtocolError`` (decoding what a peer sent) or ``LocalProtocolError`` (encoding
what our own code built), so both directions apply the very same rules.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

from storage.names import InvalidName, parse_digest, parse_model_name

from ._cbor import Value

__all__ = [
    "Invalid",
    "check_digest",
    "check_keys",
    "check_model",
    "check_text",
    "get_bool",
    "get_bytes",
    "get_int",
    "get_list",
    "get_list_of",
    "get_str",
]

_Item = TypeVar("_Item", bytes, str, dict[str, Value])


class Invalid(Exception):
    """A value failed a check; ``str()`` is the one-line reason."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_keys(obj: Mapping[str, Value], required: Collection[str]) -> None:
    """``obj`` has exactly the keys in ``required``: nothing missing, nothing extra."""
    for key in required:
        if key not in obj:
            raise Invalid(f"missing field {key!r}")
    for key in obj:
        if key not in required:
            raise Invalid(f"unexpected field {_show(key)}")


def get_int(obj: Mapping[str, Value], key: str, lo: int, hi: int) -> int:
    """An int (never a bool) with ``lo <= value < hi``."""
    value = obj[key]
    # bool is an int subclass; CBOR true must not pass as 1.
    if type(value) is not int:
        raise Invalid(f"{key!r} must be an integer, not {type(value).__name__}")
    if not lo <= value < hi:
        raise Invalid(f"{key!r} = {value} is out of range [{lo}, {hi})")
    return value


def get_bool(obj: Mapping[str, Value], key: str) -> bool:
    value = obj[key]
    if type(value) is not bool:
        raise Invalid(f"{key!r} must be a boolean, not {type(value).__name__}")
    return value


def get_bytes(obj: Mapping[str, Value], key: str, min_len: int, max_len: int) -> bytes:
    value = obj[key]
    if type(value) is not bytes:
        raise Invalid(f"{key!r} must be a byte string, not {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        expected = str(min_len) if min_len == max_len else f"{min_len}..{max_len}"
        raise Invalid(f"{key!r} is {len(value)} bytes long (expected {expected})")
    return value


def get_str(obj: Mapping[str, Value], key: str, max_len: int) -> str:
    value = obj[key]
    if type(value) is not str:
        raise Invalid(f"{key!r} must be a text string, not {type(value).__name__}")
    check_text(value, key, max_len)
    return value


def get_list(obj: Mapping[str, Value], key: str, max_items: int) -> list[Value]:
    value = obj[key]
    if type(value) is not list:
        raise Invalid(f"{key!r} must be an array, not {type(value).__name__}")
    if len(value) > max_items:
        raise Invalid(f"{key!r} has {len(value)} items (the limit is {max_items})")
    return value


def get_list_of(
    obj: Mapping[str, Value], key: str, max_items: int, item_type: type[_Item]
) -> list[_Item]:
    """An array of at most ``max_items`` items, all of ``item_type``."""
    result: list[_Item] = []
    for item in get_list(obj, key, max_items):
        # bool is not a subclass of any allowed item type, so isinstance is exact here.
        if not isinstance(item, item_type):
            raise Invalid(f"{key!r} items must be {item_type.__name__}, not {type(item).__name__}")
        result.append(item)
    return result


def check_text(value: str, what: str, max_len: int) -> None:
    """At most ``max_len`` characters and no control characters (text is shown to people)."""
    if len(value) > max_len:
        raise Invalid(f"{what!r} is {len(value)} characters long (the limit is {max_len})")
    if not value.isprintable():
        raise Invalid(f"{what!r} contains control or unprintable characters")


def check_model(model: str, tag: str) -> None:
    """``model`` is a full ``host/namespace/model`` name and ``tag`` a valid tag.

    Only the canonical full form is accepted, so one model has one spelling on the wire
    and in DHT keys.
    """
    if type(model) is not str or type(tag) is not str:
        raise Invalid("model name and tag must be text strings")
    try:
        name = parse_model_name(f"{model}:{tag}")
    except InvalidName as exc:
        raise Invalid(str(exc)) from None
    if f"{name.host}/{name.namespace}/{name.model}" != model or name.tag != tag:
        raise Invalid(
            f"model {_show(model)} tag {_show(tag)} is not a full host/namespace/model name"
        )


def check_digest(digest: str) -> None:
    """``digest`` is exactly ``sha256:<64 lowercase hex>``."""
    if type(digest) is not str:
        raise Invalid(f"digest must be a text string, not {type(digest).__name__}")
    try:
        canonical = parse_digest(digest)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None
    if canonical != digest:
        raise Invalid(f"digest {_show(digest)} is not in sha256:<hex> form")
