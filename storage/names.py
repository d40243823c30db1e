"""Model names and blob digests, validated before they touch a path.

Names follow Ollama's rules (``[host/][namespace/]model[:tag]``, defaults
``registry.ollama.ai``, ``library``, ``latest``). Every part is checked against a
strict character set, so a parsed name can never escape the models directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

# Ollama's limits (types/model/name.go): parts start with an alphanumeric
# (tags may start with "_"), hosts may carry a port.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,349}(:[0-9]{1,5})?")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})")


class InvalidName(ValueError):
    """A model name or digest that is malformed; the message says why in one line."""


@dataclass(frozen=True, slots=True, order=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return self.display

    @property
    def display(self) -> str:
        """The short form people type: ``llama3:latest`` for library models."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def repository(self) -> str:
        """``namespace/model`` as used in OCI registry paths."""
        return f"{self.namespace}/{self.model}"

    def manifest_relpath(self) -> Path:
        return Path("manifests", self.host, self.namespace, self.model, self.tag)

    def with_tag(self, tag: str) -> ModelName:
        return parse_model_name(f"{self.host}/{self.namespace}/{self.model}:{tag}")


def parse_model_name(text: str) -> ModelName:
    """Parse and validate a model name; raise InvalidName with the reason."""
    if not isinstance(text, str):
        raise InvalidName(f"model name must be a string, not {type(text).__name__}")
    if not text:
        raise InvalidName("model name is empty")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidName(f"model name is {len(text)} characters long (the limit is 255)")
    if "\x00" in text:
        raise InvalidName("model name contains a NUL byte")
    if ".." in text:
        raise InvalidName(f"model name {text!r} contains '..'")
    if "\\" in text:
        raise InvalidName(f"model name {text!r} contains a backslash")
    rest, tag = text, DEFAULT_TAG
    # The tag is after the last ':' that follows the last '/', so a host port
    # ("localhost:5000/ns/m") is not mistaken for a tag.
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    parts = rest.split("/")
    if len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, namespace, model = DEFAULT_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        raise InvalidName(
            f"model name {text!r} has too many '/' parts (use [host/][namespace/]model[:tag])"
        )
    for label, value, pattern in (
        ("host", host, _HOST_RE),
        ("namespace", namespace, _NAMESPACE_RE),
        ("model", model, _MODEL_RE),
        ("tag", tag, _TAG_RE),
    ):
        if not value:
            raise InvalidName(f"model name {text!r} has an empty {label}")
        if not pattern.fullmatch(value):
            raise InvalidName(f"model name {text!r} has an invalid {label} {value!r}")
    return ModelName(host, namespace, model, tag)


def parse_digest(text: str) -> str:
    """Normalise ``sha256:<hex>`` or ``sha256-<hex>`` to ``sha256:<hex>``."""
    if not isinstance(text, str):
        raise InvalidName(f"digest must be a string, not {type(text).__name__}")
    m = _DIGEST_RE.fullmatch(text)
    if m is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidName(f"invalid digest {shown!r} (expected sha256:<64 lowercase hex>)")
    return f"sha256:{m.group(1)}"


def digest_hex(digest: str) -> str:
    return parse_digest(digest)[7:]


def blob_filename(digest: str) -> str:
    """The file name Ollama uses for a blob: ``sha256-<hex>``."""
    return "sha256-" + digest_hex(digest)
