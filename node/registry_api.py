"""OCI distribution, read-only, under ``/v2/``: ``ollama pull --insecure host:port/ns/model``.

What the Ollama client does, and what answers it here:

1. ``GET /v2/<ns>/<model>/manifests/<tag>`` — the manifest bytes as stored (by tag or by
   digest), with ``Docker-Content-Digest`` and the manifest's own media type. A model
   not in the store is looked up in the swarm (holders, newest version, manifest, as
   ``node/pull.py`` does) and served from there — or, when no peer has it, from the
   upstream registry (``node/upstream.py``); its blobs are fetched as the client asks
   for them.
2. ``HEAD /v2/<ns>/<model>/blobs/<digest>`` — the size, as ``Content-Length``.
3. ``GET`` of the blob without ``Range`` — a 307 to ``?direct=1`` (the client takes the
   redirect's ``Location`` as the URL to download from). ``GET ?direct=1`` without
   ``Range`` answers at once with the size and a ``Location`` (older clients follow the
   redirect and want one there), then sends the whole blob.
4. Ranged ``GET``s (``Range: bytes=a-b``) in parallel — 206 with ``Content-Range``, read
   from the file a piece at a time in a worker thread, never the whole blob in memory.
   A blob not here yet is fetched (swarm or upstream) first: every request for it waits on
   one shared fetch, run in the node's nursery so a client that hangs up does not
   cancel it. Once every blob of a manifest served from the swarm is here, the manifest
   is written and the node publishes the model.

Errors are OCI's JSON (``{"errors": [{"code", "message", "detail"}]}``); names and
digests are validated before any path is built; writes are refused (UNSUPPORTED).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from node import upstream
from node.http import ClientGone, Handler, Request, Response, Router
from node.pull import (
    PullError,
    fetch_layer,
    fetch_manifest,
    find_holders,
    newest_record,
    plain_pull_errors,
    write_manifest,
)
from storage.chunks import MiB
from storage.manifest import Layer, Manifest
from storage.names import InvalidName, ModelName, parse_digest, parse_model_name
from storage.partial import PartialBusy

if TYPE_CHECKING:
    from node.daemon import Node

__all__ = ["OCIError", "RegistryApi", "add_routes", "parse_range"]

log = logging.getLogger("dmm.registry")

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
PIECE = 1 * MiB  # read from disk and handed to the server at a time
MAX_PENDING = 256  # manifests served from the swarm whose blobs are not all here yet
BUSY_POLL = 0.5  # seconds between looks at a blob another pull is fetching
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class OCIError(Exception):
    """Answered as OCI's error JSON with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []

    def response(self) -> Response:
        body = {"errors": [{"code": self.code, "message": self.message, "detail": None}]}
        return Response(
            self.status,
            json.dumps(body, separators=(",", ":")).encode(),
            headers=[API_VERSION, *self.headers],
        )


class BadRange(ValueError):
    """A Range header this blob cannot satisfy."""


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``[start, end)`` of one ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` range."""
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None or not (m[1] or m[2]):
        raise BadRange(f"unsupported Range {header[:80]!r} (one bytes=a-b range only)")
    if m[1]:
        start = int(m[1])
        end = int(m[2]) + 1 if m[2] else size
        if end <= start:
            raise BadRange(f"Range {header[:80]!r} ends before it starts")
        end = min(end, size)
    else:
        suffix = int(m[2])
        if suffix == 0:
            raise BadRange("Range bytes=-0 asks for nothing")
        start, end = max(0, size - suffix), size
    if start >= size:
        raise BadRange(f"Range {header[:80]!r} starts beyond the {size}-byte blob")
    return start, end


@dataclass(slots=True)
class _Pending:
    """A manifest served from elsewhere; written locally once all its blobs are here.

    Its blobs come from ``serving`` peers, or from the upstream ``registry`` when no
    peer had the model.
    """

    name: ModelName
    raw: bytes
    manifest: Manifest
    serving: list[str]
    registry: str | None = None


@dataclass(slots=True)
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


@dataclass(eq=False, slots=True)
class _Watcher:
    """Notes when a response's client hangs up; cancelled when the response ends."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: bool = False

    async def run(self, request: Request) -> None:
        with self.scope:
            await request.wait_disconnected()
            self.gone = True


class RegistryApi:
    """The ``/v2/`` handlers of one node, and the swarm fetches they share."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # manifest digest -> what it came with; oldest dropped past MAX_PENDING.
        self._pending: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._fetches: dict[str, _Fetch] = {}

    # --- names ----------------------------------------------------------------------

    @staticmethod
    def _name(repo: str, tag: str = "latest") -> ModelName:
        if repo.count("/") > 1:
            raise OCIError(400, "NAME_INVALID", f"repository {repo[:120]!r} is not namespace/model")
        try:
            return parse_model_name(f"{repo}:{tag}")
        except InvalidName as exc:
            raise OCIError(400, "NAME_INVALID", str(exc)) from None

    @staticmethod
    def _digest(text: str) -> str:
        try:
            return parse_digest(text)
        except InvalidName as exc:
            raise OCIError(400, "DIGEST_INVALID", str(exc)) from None

    # --- manifests ------------------------------------------------------------------

    async def manifest(self, request: Request) -> Response:
        repo, reference = request.params["repo"], request.params["reference"]
        if ":" in reference:  # a digest; tags cannot hold a colon
            name = self._name(repo)
            digest = self._digest(reference)
            raw, manifest = await self._manifest_by_digest(name, digest)
        else:
            name = self._name(repo, reference)
            raw, manifest = await self._manifest_by_tag(name)
        return Response(
            200,
            raw,
            manifest.media_type,
            headers=[API_VERSION, ("Docker-Content-Digest", _sha256(raw))],
        )

    async def _manifest_by_tag(self, name: ModelName) -> tuple[bytes, Manifest]:
        store = self.node.store
        local = await trio.to_thread.run_sync(store.layout.read, name)
        if local is not None and all(store.cas.has(d) for d in local.manifest.blob_digests()):
            return local.raw, local.manifest
        pending = await self._from_swarm(name)
        return pending.raw, pending.manifest

    async def _manifest_by_digest(self, name: ModelName, digest: str) -> tuple[bytes, Manifest]:
        entries = await trio.to_thread.run_sync(self.node.store.list_models)
        for entry in entries:
            if entry.name.repository == name.repository and entry.digest == digest:
                local = await trio.to_thread.run_sync(self.node.store.layout.read, entry.name)
                if local is not None and local.digest == digest:
                    return local.raw, local.manifest
        pending = self._pending.get(digest)
        if pending is not None and pending.name.repository == name.repository:
            return pending.raw, pending.manifest
        raise OCIError(404, "MANIFEST_UNKNOWN", f"{name.repository} has no manifest {digest}")

    async def _from_swarm(self, name: ModelName) -> _Pending:
        holders = await find_holders(self.node, name)
        try:
            record, serving = await newest_record(self.node, name, holders)
        except PullError as exc:
            return self._remember(await self._from_upstream(name, str(exc)))
        try:
            raw, manifest = await fetch_manifest(self.node, record.manifest_digest, serving)
        except PullError as exc:
            raise OCIError(502, "MANIFEST_UNKNOWN", str(exc)) from None
        if _sha256(raw) != record.manifest_digest:
            raise OCIError(
                502,
                "MANIFEST_UNKNOWN",
                f"peers sent a manifest hashing to {_sha256(raw)}, not {record.manifest_digest}",
            )
        return self._remember(_Pending(name, raw, manifest, serving))

    async def _from_upstream(self, name: ModelName, no_peer: str) -> _Pending:
        base = upstream.registry_url(self.node, name)
        if base is None:
            raise OCIError(404, "MANIFEST_UNKNOWN", f"{name.display} is not here: {no_peer}")
        try:
            async with upstream.open_client() as client:
                raw, manifest = await upstream.fetch_manifest(client, base, name)
        except PullError as exc:
            raise OCIError(404, "MANIFEST_UNKNOWN", str(exc)) from None
        return _Pending(name, raw, manifest, [], registry=base)

    def _remember(self, pending: _Pending) -> _Pending:
        digest = _sha256(pending.raw)
        self._pending[digest] = pending
        self._pending.move_to_end(digest)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        log.info(
            "registry: %s served from %s (%s)",
            pending.name.display,
            pending.registry or f"the swarm ({len(pending.serving)} holder(s))",
            digest[:19],
        )
        return pending

    # --- blobs ----------------------------------------------------------------------

    def _pending_layer(self, digest: str) -> tuple[_Pending, Layer] | None:
        for pending in reversed(self._pending.values()):
            for layer in pending.manifest.all_layers():
                if layer.digest == digest:
                    return pending, layer
        return None

    async def _size(self, repo: str, digest: str) -> int:
        size = await trio.to_thread.run_sync(self.node.store.cas.size, digest)
        if size is not None:
            return size
        found = self._pending_layer(digest)
        if found is None:
            raise OCIError(404, "BLOB_UNKNOWN", f"{repo} has no blob {digest}")
        return found[1].size

    async def blob(self, request: Request) -> Response:
        repo = request.params["repo"]
        self._name(repo)
        digest = self._digest(request.params["digest"])
        size = await self._size(repo, digest)
        headers = [API_VERSION, ("Docker-Content-Digest", digest), ("Accept-Ranges", "bytes")]
        octets = "application/octet-stream"
        if request.method == "HEAD":
            return Response(200, content_type=octets, headers=[*headers, _length(size)])
        range_header = request.headers.get("range")
        if range_header is None:
            here = f"/v2/{repo}/blobs/{digest}?direct=1"
            if request.arg("direct") is None:
                # Where to download from: the Ollama client takes this redirect's Location.
                return Response(307, headers=[*headers, ("Location", here)])
            # Answer at once (the client waits 30 s at most for this) and send the bytes
            # when they are here.
            return Response(
                200,
                content_type=octets,
                headers=[*headers, ("Location", here), _length(size)],
                stream=self._body(request, digest, 0, size, wait=True),
            )
        try:
            start, end = parse_range(range_header, size)
        except BadRange as exc:
            unsatisfied = [("Content-Range", f"bytes */{size}")]
            raise OCIError(416, "SIZE_INVALID", str(exc), unsatisfied) from None
        await self._ensure(digest)
        return Response(
            206,
            content_type=octets,
            headers=[
                *headers,
                ("Content-Range", f"bytes {start}-{end - 1}/{size}"),
                _length(end - start),
            ],
            stream=self._body(request, digest, start, end, wait=False),
        )

    async def _body(
        self, request: Request, digest: str, start: int, end: int, *, wait: bool
    ) -> AsyncIterator[bytes]:
        # The server goes on taking pieces after the client hung up (the Ollama client
        # hangs up on the whole-blob GET at once): stop reading the disk when it has.
        watcher = _Watcher()
        self.node.start_soon(watcher.run, request)
        try:
            if wait:
                try:
                    await self._ensure(digest)
                except OCIError as exc:
                    # The headers are sent: all that is left is to cut the body short.
                    log.warning("registry: blob %s not sent: %s", digest, exc.message)
                    raise ClientGone from None
            read = self.node.store.cas.read_range
            offset = start
            while offset < end:
                if watcher.gone:
                    log.info(
                        "registry: client left blob %s after %d of %d bytes",
                        digest,
                        offset - start,
                        end - start,
                    )
                    raise ClientGone
                n = min(PIECE, end - offset)
                yield await trio.to_thread.run_sync(read, digest, offset, n)
                offset += n
        finally:
            watcher.scope.cancel()

    async def _ensure(self, digest: str) -> None:
        """Return once ``digest`` is in the store, starting or joining its swarm fetch."""
        if self.node.store.cas.has(digest):
            return
        fetch = self._fetches.get(digest)
        if fetch is None:
            found = self._pending_layer(digest)
            if found is None:
                raise OCIError(404, "BLOB_UNKNOWN", f"no blob {digest}")
            fetch = self._fetches[digest] = _Fetch()
            self.node.start_soon(self._run_fetch, digest, fetch, *found)
        await fetch.done.wait()
        if fetch.error is not None:
            raise OCIError(502, "BLOB_UNKNOWN", fetch.error)

    async def _run_fetch(self, digest: str, fetch: _Fetch, pending: _Pending, layer: Layer) -> None:
        async def quiet(event: dict[str, Any]) -> None:
            pass

        waited = False
        try:
            while not self.node.store.cas.has(digest):
                try:
                    with plain_pull_errors():
                        if pending.registry is not None:
                            async with upstream.open_client() as client:
                                await upstream.download_blob(
                                    self.node, client, pending.registry, pending.name, layer, quiet
                                )
                        else:
                            await fetch_layer(
                                self.node, pending.name, layer, pending.serving, quiet
                            )
                except BaseExceptionGroup as group:
                    if group.split(PartialBusy)[1] is not None:
                        raise
                    # Another pull (/api/pull) is fetching it: wait for its result.
                    if not waited:
                        log.info("registry: blob %s is being fetched by another pull", digest)
                        waited = True
                    await trio.sleep(BUSY_POLL)
        except (PullError, OSError) as exc:
            fetch.error = f"blob {digest} could not be fetched: {exc}"
        except Exception as exc:
            # This runs in the node's nursery: whatever goes wrong must not end the node.
            log.exception("registry: fetch of blob %s failed", digest)
            fetch.error = f"blob {digest} could not be fetched: internal error {exc!r}"
        finally:
            del self._fetches[digest]
            fetch.done.set()
        if fetch.error is not None:
            log.warning("registry: %s (model %s)", fetch.error, pending.name.display)
            return
        log.info(
            "registry: blob %s of %s fetched from %s",
            digest,
            pending.name.display,
            pending.registry or "the swarm",
        )
        try:
            await self._write_complete_manifests()
        except (PullError, OSError) as exc:
            log.warning("registry: manifest of %s not written: %s", pending.name.display, exc)

    async def _write_complete_manifests(self) -> None:
        cas = self.node.store.cas
        complete = [
            (digest, p)
            for digest, p in self._pending.items()
            if all(cas.location(d) == "file" for d in p.manifest.blob_digests())
        ]
        for digest, _ in complete:  # before any await, so no other task writes them too
            self._pending.pop(digest, None)
        for _, pending in complete:
            await trio.to_thread.run_sync(
                write_manifest, self.node, pending.name, pending.raw, pending.manifest
            )
            log.info(
                "registry: %s pulled through /v2/ from %s",
                pending.name.display,
                pending.registry or "the swarm",
            )
        if complete:
            await self.node.refresh()

    # --- the rest -------------------------------------------------------------------

    async def base(self, request: Request) -> Response:
        return Response(200, b"{}", headers=[API_VERSION])

    async def unknown(self, request: Request) -> Response:
        raise OCIError(404, "NAME_UNKNOWN", f"no such registry endpoint: {request.path[:200]}")

    async def read_only(self, request: Request) -> Response:
        raise OCIError(405, "UNSUPPORTED", "this registry is read-only; publish with dmm add")


def _sha256(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _length(n: int) -> tuple[str, str]:
    return ("Content-Length", str(n))


def _oci(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OCIError as exc:
            return exc.response()

    return wrapped


def add_routes(router: Router, node: Node) -> RegistryApi:
    """Register the ``/v2/`` routes on ``router``; returns the handlers' owner."""
    api = RegistryApi(node)
    for path in ("/v2", "/v2/"):
        router.add("GET", path, _oci(api.base))
    router.add("GET", "/v2/{repo:path}/manifests/{reference}", _oci(api.manifest))
    router.add("GET", "/v2/{repo:path}/blobs/{digest}", _oci(api.blob))
    router.add("GET", "/v2/{rest:path}", _oci(api.unknown))
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        router.add(method, "/v2/{rest:path}", _oci(api.read_only))
    return api
