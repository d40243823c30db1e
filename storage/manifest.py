"""Ollama image manifests: parse, validate, and serialise byte-for-byte as Ollama does."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from storage.names import InvalidName, parse_digest

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_PREFIX = "application/vnd.ollama.image."
MODEL_MEDIA_TYPE = LAYER_PREFIX + "model"
TEMPLATE_MEDIA_TYPE = LAYER_PREFIX + "template"
PARAMS_MEDIA_TYPE = LAYER_PREFIX + "params"
SYSTEM_MEDIA_TYPE = LAYER_PREFIX + "system"
LICENSE_MEDIA_TYPE = LAYER_PREFIX + "license"
KNOWN_LAYER_TYPES = frozenset(
    LAYER_PREFIX + kind
    for kind in (
        "model",
        "template",
        "params",
        "system",
        "license",
        "projector",
        "adapter",
        "messages",
        "embed",
    )
)
# A manifest is a few hundred bytes; anything this large is not one.
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 1024


class ManifestError(ValueError):
    """A manifest that is not valid JSON or not a valid Ollama manifest."""


@dataclass(frozen=True, slots=True)
class Layer:
    media_type: str
    digest: str
    size: int
    source: str = ""  # Ollama's optional "from" field

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.source:
            out["from"] = self.source
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]
    schema_version: int = 2
    media_type: str = MANIFEST_MEDIA_TYPE

    def to_bytes(self) -> bytes:
        """Compact JSON in Ollama's field order (Go's encoding/json output)."""
        obj = {
            "schemaVersion": self.schema_version,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        return json.dumps(obj, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def total_size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)

    def all_layers(self) -> tuple[Layer, ...]:
        return (self.config, *self.layers)

    def blob_digests(self) -> list[str]:
        """Every blob the manifest references, config first, without repeats."""
        return list(dict.fromkeys(layer.digest for layer in self.all_layers()))

    def layer_of_type(self, kind: str) -> Layer | None:
        media_type = kind if "/" in kind else LAYER_PREFIX + kind
        for layer in self.layers:
            if layer.media_type == media_type:
                return layer
        return None


def _parse_layer(obj: object, where: str) -> Layer:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} is not an object")
    media_type = obj.get("mediaType")
    digest = obj.get("digest")
    size = obj.get("size")
    source = obj.get("from", "")
    if not isinstance(media_type, str) or not media_type or len(media_type) > 256:
        raise ManifestError(f"{where}.mediaType is missing or not a string")
    if not isinstance(digest, str):
        raise ManifestError(f"{where}.digest is missing or not a string")
    try:
        digest = parse_digest(digest)
    except InvalidName as exc:
        raise ManifestError(f"{where}.digest: {exc}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > 1 << 50:
        raise ManifestError(f"{where}.size is missing or not a non-negative integer")
    if not isinstance(source, str):
        raise ManifestError(f"{where}.from is not a string")
    return Layer(media_type, digest, size, source)


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise ManifestError naming the bad field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes (the limit is {MAX_MANIFEST_BYTES})")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        # A peer chooses the manifest it publishes: "[[[[..." must not crash the pull.
        raise ManifestError("manifest is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ManifestError("manifest is not a JSON object")
    if obj.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported schemaVersion {obj.get('schemaVersion')!r} (expected 2)")
    media_type = obj.get("mediaType", MANIFEST_MEDIA_TYPE)
    if not isinstance(media_type, str):
        raise ManifestError("mediaType is not a string")
    config = _parse_layer(obj.get("config"), "config")
    layers_obj = obj.get("layers")
    if not isinstance(layers_obj, list):
        raise ManifestError("layers is missing or not a list")
    if len(layers_obj) > MAX_LAYERS:
        raise ManifestError(f"manifest has {len(layers_obj)} layers (the limit is {MAX_LAYERS})")
    layers = tuple(_parse_layer(item, f"layers[{i}]") for i, item in enumerate(layers_obj))
    return Manifest(config=config, layers=layers, media_type=media_type)
