"""``POST /api/create`` as Ollama's current API has it: a model from blobs already uploaded.

The request names GGUF blobs (``files``, ``adapters``: filename -> digest, uploaded first with
``POST /api/blobs/:digest``), an optional base model (``from``), and text layers (``template``,
``system``, ``parameters``, ``license``, ``messages``). Everything is checked before anything is
written (``plan_create``, bad input -> HTTPError); then the small layers and the config are
stored and the manifest is written last (``create_model_events``), streaming Ollama's status
lines. dmm does not convert or quantize: only GGUF files are accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from node.http import HTTPError
from storage.gguf import GGUFError, read_gguf_info
from storage.manifest import (
    LAYER_PREFIX,
    LICENSE_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Layer,
    Manifest,
)
from storage.names import InvalidName, ModelName, parse_digest, parse_model_name
from storage.store import ModelNotFound, ModelStore

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("dmm.ollama")

ADAPTER_MEDIA_TYPE = LAYER_PREFIX + "adapter"
PROJECTOR_MEDIA_TYPE = LAYER_PREFIX + "projector"
MESSAGES_MEDIA_TYPE = LAYER_PREFIX + "messages"
# Ollama's layer order in a manifest: weights first, then the small layers.
_ORDER = [
    MODEL_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    ADAPTER_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
]
MAX_TEXT = 1 << 20  # text layers are read back whole by /api/show


@dataclass(slots=True)
class CreatePlan:
    name: ModelName
    blobs: list[Layer] = field(default_factory=list)  # layers whose blobs are already here
    texts: list[tuple[str, str]] = field(default_factory=list)  # (media type, text) to store
    model_digest: str | None = None


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message)


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string")
    if len(value.encode()) > MAX_TEXT:
        raise _bad(f"{key} is larger than {MAX_TEXT} bytes")
    return value


def _gguf_layer(store: ModelStore, filename: object, digest_text: object, what: str) -> Layer:
    """The layer for one uploaded GGUF blob; its kind read from its header."""
    if not isinstance(filename, str) or not filename or filename != filename.strip():
        raise _bad(f"{what}: invalid filename {json.dumps(filename)}")
    if "/" in filename or "\\" in filename or ".." in filename or "\x00" in filename:
        raise _bad(f"{what}: invalid filename {json.dumps(filename)} (no paths)")
    if not isinstance(digest_text, str):
        raise _bad(f"{what} {filename}: the digest must be a string")
    try:
        digest = parse_digest(digest_text)
    except InvalidName as exc:
        raise _bad(f"{what} {filename}: {exc}") from None
    if store.cas.location(digest) != "file":
        raise _bad(
            f"{what} {filename}: blob {digest} not found; upload it first with "
            f"POST /api/blobs/{digest}"
        )
    path = store.cas.path(digest)
    try:
        info = read_gguf_info(path)
    except GGUFError as exc:
        raise _bad(f"{what} {filename} ({digest[:19]}) is not a GGUF file: {exc}") from None
    kind = str(info.metadata.get("general.type", ""))
    arch = str(info.metadata.get("general.architecture", ""))
    if what == "adapters" or kind == "adapter":
        media_type = ADAPTER_MEDIA_TYPE
    elif kind == "projector" or arch == "clip":
        media_type = PROJECTOR_MEDIA_TYPE
    else:
        media_type = MODEL_MEDIA_TYPE
    return Layer(media_type, digest, path.stat().st_size)


def _mapping(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise _bad(f"{key} must be an object of filename: digest")
    return value


def plan_create(store: ModelStore, name: ModelName, body: dict[str, Any]) -> CreatePlan:
    """Check a create request for ``name`` against the store; raise HTTPError saying what
    is wrong. Blocking (reads GGUF headers): run it on a worker thread."""
    if body.get("quantize"):
        raise _bad("quantize is not supported by dmm; upload an already-quantized GGUF file")
    files, adapters = _mapping(body, "files"), _mapping(body, "adapters")
    base_text = body.get("from")
    if not files and not base_text:
        raise _bad("neither 'from' or 'files' was specified")
    plan = CreatePlan(name)
    base_params: dict[str, Any] = {}
    if base_text:
        if not isinstance(base_text, str):
            raise _bad("from must be a model name")
        try:
            base = store.get(parse_model_name(base_text))
        except InvalidName as exc:
            raise _bad(f"from: {exc}") from None
        except ModelNotFound:
            raise HTTPError(404, f"model '{base_text}' not found") from None
        for layer in base.manifest.layers:
            if layer.media_type == PARAMS_MEDIA_TYPE:
                params = store.text_layer(base.manifest, "params")
                try:
                    loaded = json.loads(params or "{}")
                except ValueError:
                    loaded = {}
                base_params = loaded if isinstance(loaded, dict) else {}
            else:
                plan.blobs.append(Layer(layer.media_type, layer.digest, layer.size))
    new_blobs = [_gguf_layer(store, f, d, "files") for f, d in files.items()]
    new_blobs += [_gguf_layer(store, f, d, "adapters") for f, d in adapters.items()]
    models = [layer for layer in new_blobs if layer.media_type == MODEL_MEDIA_TYPE]
    if len(models) > 1:
        raise _bad("files holds more than one model GGUF; dmm takes one model file (and adapters)")
    texts: dict[str, str] = {}
    for key, media_type in (("template", TEMPLATE_MEDIA_TYPE), ("system", SYSTEM_MEDIA_TYPE)):
        if (value := _text(body, key)) is not None:
            texts[media_type] = value
    licenses = body.get("license")
    if isinstance(licenses, str):
        licenses = [licenses]
    if licenses is not None and (
        not isinstance(licenses, list) or not all(isinstance(x, str) for x in licenses)
    ):
        raise _bad("license must be a string or a list of strings")
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _bad("parameters must be an object")
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content", ""), str)
            for m in messages
        ):
            raise _bad("messages must be a list of {role, content} objects")
        texts[MESSAGES_MEDIA_TYPE] = json.dumps(
            [{"role": m["role"], "content": m.get("content", "")} for m in messages]
        )
    if params or base_params:
        merged = {**base_params, **(params or {})}
        texts[PARAMS_MEDIA_TYPE] = json.dumps(merged, separators=(",", ":"))
    # What the request brings replaces the base model's layer of the same kind.
    replaced = {layer.media_type for layer in new_blobs} | set(texts)
    if licenses:
        replaced.add(LICENSE_MEDIA_TYPE)
    plan.blobs = [b for b in plan.blobs if b.media_type not in replaced] + new_blobs
    plan.texts = list(texts.items()) + [(LICENSE_MEDIA_TYPE, text) for text in licenses or []]
    model_layers = [b for b in plan.blobs if b.media_type == MODEL_MEDIA_TYPE]
    plan.model_digest = model_layers[0].digest if model_layers else None
    return plan


def _store_texts(store: ModelStore, plan: CreatePlan) -> list[tuple[Layer, bool]]:
    out = []
    for media_type, text in plan.texts:
        existed = store.cas.has("sha256:" + hashlib.sha256(text.encode()).hexdigest())
        out.append((store.put_text_layer(text, media_type), existed))
    return out


def _write(store: ModelStore, plan: CreatePlan, layers: list[Layer]) -> str:
    ordered = sorted(
        layers, key=lambda x: _ORDER.index(x.media_type) if x.media_type in _ORDER else 99
    )
    config = store.config_layer(plan.model_digest, ordered)
    return store.write_model(plan.name, Manifest(config=config, layers=tuple(ordered)))


async def create_model_events(node: Node, plan: CreatePlan) -> AsyncIterator[dict[str, Any]]:
    """Store the new layers, write the manifest last, announce; Ollama's status lines."""
    if plan.model_digest is not None:
        yield {"status": "parsing GGUF"}
    for layer in plan.blobs:
        yield {"status": f"using existing layer {layer.digest}"}
    stored = await trio.to_thread.run_sync(_store_texts, node.store, plan)
    for layer, existed in stored:
        verb = "using existing" if existed else "creating new"
        yield {"status": f"{verb} layer {layer.digest}"}
    yield {"status": "writing manifest"}
    try:
        digest = await trio.to_thread.run_sync(
            _write, node.store, plan, [*plan.blobs, *(layer for layer, _ in stored)]
        )
    except Exception as exc:  # e.g. a blob removed by gc since the request was checked
        raise HTTPError(500, f"model {plan.name.display} not created: {exc}") from None
    log.info("model %s created (%s)", plan.name.display, digest[:19])
    await node.refresh()
    yield {"status": "success"}


__all__ = ["CreatePlan", "create_model_events", "plan_create"]
