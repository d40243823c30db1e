"""The local model store (the seed's LocalManager): an Ollama models directory plus our index.

Ollama's manifests tree is the source of truth for which models exist (a real Ollama
may add or delete some behind our back); the metadata database remembers what we
computed about blobs (their chunks) and the versions we have seen. Every operation
here is blocking and meant to run on a worker thread (``trio.to_thread``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.cas import BlobMismatchError, ContentAddressedStore, VerifyResult
from storage.chunks import (
    DEFAULT_PARAMS,
    BlobIndex,
    ChunkParams,
    Progress,
    chunk_bytes,
    index_file,
)
from storage.db import MetadataDB
from storage.download import stale_downloads
from storage.fsutil import StoreFullError
from storage.gguf import GGUFError, GGUFInfo, details, read_gguf_info
from storage.locks import is_locked
from storage.manifest import (
    CONFIG_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    Layer,
    Manifest,
)
from storage.names import ModelName, parse_digest, parse_model_name
from storage.ollama_store import BrokenManifest, OllamaLayout, StoredManifest
from storage.partial import PARTIAL_SUFFIX, PROGRESS_SUFFIX, stale_partials

# reporter(label, total_bytes) -> advance(n): how long work shows progress.
Reporter = Callable[[str, int], Progress]


def _quiet(label: str, total: int) -> Progress:
    return lambda n: None


class StoreError(RuntimeError):
    """An operation on the store failed; the store is unchanged. One line says why."""


class ModelNotFound(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: ModelName
    digest: str
    size: int
    modified: float
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class AddResult:
    name: ModelName
    digest: str
    size: int
    model_blob: str
    copied_bytes: int  # 0 when the model blob was already in the store
    changed: bool  # False when the name already pointed at this exact manifest


@dataclass(slots=True)
class ImportReport:
    models_new: list[str] = field(default_factory=list)
    models_updated: list[str] = field(default_factory=list)
    models_unchanged: list[str] = field(default_factory=list)
    blobs_linked: int = 0
    blobs_copied: int = 0
    blobs_indexed: int = 0
    bytes_indexed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.models_new or self.models_updated or self.blobs_indexed)


@dataclass(frozen=True, slots=True)
class CorruptBlob:
    result: VerifyResult
    models: tuple[str, ...]  # display names of the models it breaks


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes_checked: int = 0
    bad: list[CorruptBlob] = field(default_factory=list)
    broken_manifests: list[BrokenManifest] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.broken_manifests


@dataclass(slots=True)
class GCReport:
    removed: list[tuple[str, int]] = field(default_factory=list)  # (digest, bytes)
    temp_files: list[Path] = field(default_factory=list)
    kept_young: int = 0  # unreferenced but younger than the age limit
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


class ModelStore:
    def __init__(
        self,
        models_dir: Path,
        db_path: Path,
        packs_dir: Path,
        params: ChunkParams = DEFAULT_PARAMS,
    ) -> None:
        self.models_dir = models_dir
        self.layout = OllamaLayout(models_dir)
        self.cas = ContentAddressedStore(models_dir, packs_dir)
        self.db = MetadataDB(db_path)
        self.params = params

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        return [
            ModelEntry(m.name, m.digest, m.manifest.total_size, m.mtime, m.manifest)
            for m in self.layout.walk()
            if isinstance(m, StoredManifest)
        ]

    def broken_manifests(self) -> list[BrokenManifest]:
        return [m for m in self.layout.walk() if isinstance(m, BrokenManifest)]

    def get(self, name: str | ModelName) -> StoredManifest:
        model = parse_model_name(name) if isinstance(name, str) else name
        found = self.layout.read(model)
        if found is None:
            raise ModelNotFound(f"model {model.display} is not in {self.models_dir}")
        return found

    def model_info(self, name: str | ModelName) -> GGUFInfo | None:
        """The GGUF header of a model's weights, or None when it has no plain model layer."""
        stored = self.get(name)
        layer = stored.manifest.layer_of_type("model")
        if layer is None or self.cas.location(layer.digest) != "file":
            return None
        return read_gguf_info(self.cas.path(layer.digest))

    def text_layer(self, manifest: Manifest, kind: str) -> str | None:
        layer = manifest.layer_of_type(kind)
        if layer is None or layer.size > 1 << 20:
            return None
        try:
            return self.cas.read_range(layer.digest, 0, layer.size).decode("utf-8", "replace")
        except (FileNotFoundError, EOFError):
            return None

    def references(self) -> dict[str, list[str]]:
        """digest -> display names of the models whose manifests reference it."""
        refs: dict[str, list[str]] = {}
        for entry in self.list_models():
            for digest in entry.manifest.blob_digests():
                refs.setdefault(digest, []).append(entry.name.display)
        return refs

    # --- indexing -----------------------------------------------------------------------

    def _index_placed(self, digest: str, reporter: Reporter) -> BlobIndex | None:
        """Index a blob already under its name unless the index is current."""
        path = self.cas.path(digest)
        st = path.stat()
        row = self.db.get_blob(digest)
        if row is not None and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns:
            return None
        index = index_file(path, self.params, reporter(f"indexing {digest[7:19]}", st.st_size))
        if index.digest != digest:
            raise BlobMismatchError(
                f"blob {path.name} is corrupt: its bytes hash to {index.digest}; "
                "run `dmm verify` and pull the model again"
            )
        self.db.put_blob_index(index, st.st_mtime_ns)
        return index

    def _index_staged(self, tmp: Path, digest: str, reporter: Reporter) -> BlobIndex:
        size = tmp.stat().st_size
        index = index_file(tmp, self.params, reporter(f"indexing {digest[7:19]}", size))
        if index.digest != digest:
            raise BlobMismatchError(f"its bytes hash to {index.digest}, not {digest}")
        return index

    # --- add ----------------------------------------------------------------------------

    def add_model(
        self,
        name: str,
        model_file: Path,
        *,
        template: str | None = None,
        system: str | None = None,
        params: dict[str, Any] | None = None,
        license_text: str | None = None,
        reporter: Reporter = _quiet,
    ) -> AddResult:
        """Add a GGUF file as ``name``; the manifest is written last, after every blob."""
        model = parse_model_name(name)
        if not model_file.is_file():
            raise StoreError(f"{model_file}: no such file")
        try:
            info = read_gguf_info(model_file)
        except GGUFError as exc:
            raise StoreError(f"{model_file} is not a GGUF model: {exc}") from None
        size = model_file.stat().st_size
        # Hash first and copy only what is missing, as `ollama create` does.
        index = index_file(model_file, self.params, reporter(f"hashing {model_file.name}", size))
        created: list[str] = []
        copied = 0
        try:
            if self.cas.location(index.digest) != "file":
                self.cas.copy_in(model_file, index.digest, reporter("copying into the store", size))
                created.append(index.digest)
                copied = size
            self.db.put_blob_index(index, self.cas.path(index.digest).stat().st_mtime_ns)
            layers = [Layer(MODEL_MEDIA_TYPE, index.digest, size)]
            for media_type, text in (
                (TEMPLATE_MEDIA_TYPE, template),
                (SYSTEM_MEDIA_TYPE, system),
                (PARAMS_MEDIA_TYPE, None if params is None else json.dumps(params)),
                (LICENSE_MEDIA_TYPE, license_text),
            ):
                if text is not None:
                    layers.append(self._put_small(text.encode(), media_type, created))
            config = self._put_small(_config_json(info, layers), CONFIG_MEDIA_TYPE, created)
            manifest = Manifest(config=config, layers=tuple(layers))
            with self.cas.commit_lock():
                missing = [d for d in manifest.blob_digests() if not self.cas.has(d)]
                if missing:
                    raise StoreError(f"blob {missing[0]} vanished before the manifest was written")
                previous = self.layout.read(model)
                changed = previous is None or previous.raw != manifest.to_bytes()
                if changed:
                    self.layout.write(model, manifest)
        except BaseException:
            for digest in created:
                self.cas.delete(digest)
            raise
        self.db.upsert_model(model.full, manifest.digest, manifest.total_size)
        return AddResult(model, manifest.digest, manifest.total_size, index.digest, copied, changed)

    def _put_small(self, data: bytes, media_type: str, created: list[str]) -> Layer:
        existed = self.cas.has("sha256:" + hashlib.sha256(data).hexdigest())
        digest = self.cas.put_bytes(data)
        if not existed:
            created.append(digest)
        path = self.cas.path(digest)
        self.db.put_blob_index(
            BlobIndex(digest, len(data), tuple(chunk_bytes(data, self.params))),
            path.stat().st_mtime_ns,
        )
        return Layer(media_type, digest, len(data))

    # --- uploads, compose, copy (the Ollama API's create path) ---------------------------

    def adopt_upload(self, tmp: Path, digest: str, reporter: Reporter = _quiet) -> bool:
        """Give an uploaded temp file in the blobs directory its name, if it hashes to ``digest``.

        One pass hashes and chunks it; on a mismatch the temp file is removed and
        BlobMismatchError raised, so nothing is stored. Returns False when the blob was
        already in the store (the upload is dropped).
        """
        digest = parse_digest(digest)
        try:
            if self.cas.location(digest) == "file":
                self.cas.discard(tmp)
                return False
            index = self._index_staged(tmp, digest, reporter)
            final = self.cas.place(tmp, digest)
        except BaseException:
            self.cas.discard(tmp)
            raise
        self.db.put_blob_index(index, final.stat().st_mtime_ns)
        return True

    def put_text_layer(self, text: str, media_type: str) -> Layer:
        """A small layer (template, system, params, license, messages) stored and indexed."""
        return self._put_small(text.encode(), media_type, [])

    def config_layer(self, model_digest: str | None, layers: list[Layer]) -> Layer:
        """The image config for ``layers``, details read from the model blob's GGUF header."""
        info: GGUFInfo | None = None
        if model_digest is not None and self.cas.location(model_digest) == "file":
            try:
                info = read_gguf_info(self.cas.path(model_digest))
            except GGUFError as exc:
                raise StoreError(f"blob {model_digest} is not a GGUF model: {exc}") from None
        data = _config_json(info, layers)
        return self._put_small(data, CONFIG_MEDIA_TYPE, [])

    def write_model(self, name: str | ModelName, manifest: Manifest) -> str:
        """Write ``manifest`` as ``name`` once every blob it names is here; its digest."""
        model = parse_model_name(name) if isinstance(name, str) else name
        with self.cas.commit_lock():
            missing = [d for d in manifest.blob_digests() if not self.cas.has(d)]
            if missing:
                raise StoreError(f"blob {missing[0]} is not in the store")
            self.layout.write(model, manifest)
        self.db.upsert_model(model.full, manifest.digest, manifest.total_size)
        return manifest.digest

    def copy_model(self, source: str | ModelName, destination: str | ModelName) -> StoredManifest:
        """``destination`` becomes a second name for ``source``'s manifest (same bytes, blobs)."""
        stored = self.get(source)
        dst = parse_model_name(destination) if isinstance(destination, str) else destination
        with self.cas.commit_lock():
            self.layout.write_raw(dst, stored.raw)
        self.db.upsert_model(dst.full, stored.digest, stored.manifest.total_size)
        return stored

    # --- import -------------------------------------------------------------------------

    def import_models(
        self, from_dir: Path | None = None, reporter: Reporter = _quiet
    ) -> ImportReport:
        """Index every model of an Ollama store (ours, or another one brought in).

        Blobs from another directory are hard-linked when on the same filesystem and
        copied otherwise, and verified before they get their names. A model with a
        bad blob is reported and left out; running this twice changes nothing.
        """
        report = ImportReport()
        source = OllamaLayout(from_dir) if from_dir is not None else self.layout
        foreign = from_dir is not None and from_dir.resolve() != self.models_dir.resolve()
        for item in source.walk():
            if isinstance(item, BrokenManifest):
                report.errors.append(f"{item.path}: {item.reason}")
                continue
            try:
                self._import_one(item, from_dir if foreign else None, report, reporter)
            except (BlobMismatchError, StoreError, OSError) as exc:
                report.errors.append(f"{item.name.display}: {exc}")
        return report

    def _import_one(
        self,
        item: StoredManifest,
        from_dir: Path | None,
        report: ImportReport,
        reporter: Reporter,
    ) -> None:
        created: list[str] = []
        try:
            for layer in item.manifest.all_layers():
                digest = layer.digest
                if self.cas.location(digest) == "file":
                    index = self._index_placed(digest, reporter)
                    if index is not None:
                        report.blobs_indexed += 1
                        report.bytes_indexed += index.size
                    continue
                if self.cas.location(digest) == "pack":
                    continue
                if from_dir is None:
                    raise StoreError(f"blob {digest} is missing from the store")
                src = from_dir / "blobs" / ("sha256-" + digest[7:])
                if not src.is_file():
                    raise StoreError(f"blob {digest} is missing from {from_dir}")
                tmp, linked = self.cas.stage(src, digest)
                try:
                    index = self._index_staged(tmp, digest, reporter)
                except BaseException:
                    self.cas.discard(tmp)
                    raise
                final = self.cas.place(tmp, digest)
                created.append(digest)
                self.db.put_blob_index(index, final.stat().st_mtime_ns)
                report.blobs_indexed += 1
                report.bytes_indexed += index.size
                if linked:
                    report.blobs_linked += 1
                else:
                    report.blobs_copied += 1
            if layer_sizes_wrong := [
                lay.digest
                for lay in item.manifest.all_layers()
                if (row := self.db.get_blob(lay.digest)) is not None and row.size != lay.size
            ]:
                raise StoreError(
                    f"blob {layer_sizes_wrong[0]} has a different size than the manifest says"
                )
            ours = self.layout.read(item.name) if from_dir is not None else item
            with self.cas.commit_lock():
                if from_dir is not None and (ours is None or ours.raw != item.raw):
                    self.layout.write_raw(item.name, item.raw)
        except BaseException:
            for digest in created:
                self.cas.delete(digest)
            raise
        known = self.db.get_model(item.name.full)
        if known is None:
            report.models_new.append(item.name.display)
        elif known.manifest_digest != item.digest or (ours is not None and ours.raw != item.raw):
            report.models_updated.append(item.name.display)
        else:
            report.models_unchanged.append(item.name.display)
        self.db.upsert_model(item.name.full, item.digest, item.manifest.total_size)

    # --- remove, verify, gc -------------------------------------------------------------

    def remove(self, name: str) -> StoredManifest:
        """Delete a model's manifest; its blobs stay until GC (other models may share them)."""
        stored = self.get(name)
        with self.cas.commit_lock():
            self.layout.delete(stored.name)
        self.db.delete_model(stored.name.full)
        return stored

    def verify(self, name: str | None = None, reporter: Reporter = _quiet) -> VerifyReport:
        """Re-hash blobs: those of one model, or every blob in the store."""
        report = VerifyReport()
        refs = self.references()
        sizes: dict[str, int] = {}
        if name is not None:
            stored = self.get(name)
            targets = stored.manifest.blob_digests()
            for layer in stored.manifest.all_layers():
                sizes[layer.digest] = layer.size
        else:
            report.broken_manifests = self.broken_manifests()
            for entry in self.list_models():
                for layer in entry.manifest.all_layers():
                    sizes[layer.digest] = layer.size
            targets = sorted(set(self.cas.list_digests()) | set(refs))
        total = sum(self.cas.size(d) or 0 for d in targets)
        advance = reporter("verifying", total)
        for digest in targets:
            result = self.cas.verify(digest, sizes.get(digest), advance)
            report.checked += 1
            report.bytes_checked += self.cas.size(digest) or 0
            if result.status == "ok":
                if self.cas.location(digest) == "file":
                    # Only a cache of the last check: a full disk must not stop a verify.
                    with contextlib.suppress(StoreFullError):
                        self.db.mark_verified(digest, self.cas.path(digest).stat().st_mtime_ns)
            else:
                report.bad.append(CorruptBlob(result, tuple(refs.get(digest, ()))))
        return report

    def gc(self, older_than: float, dry_run: bool = False) -> GCReport:
        """Delete blobs no manifest references, unmodified for ``older_than`` seconds."""
        report = GCReport(dry_run=dry_run)
        with self.cas.gc_lock():
            broken = self.broken_manifests()
            if broken:
                raise StoreError(
                    f"{broken[0].path} is not a valid manifest ({broken[0].reason}); "
                    "fix or remove it before gc, so no blob it needs is deleted"
                )
            referenced = set(self.references())
            cutoff = time.time() - older_than
            for digest in self.cas.list_digests():
                if digest in referenced:
                    continue
                mtime = self.cas.mtime(digest)
                if mtime is None:
                    continue
                if mtime > cutoff:
                    report.kept_young += 1
                    continue
                size = _disk_size(self.cas, digest)
                report.removed.append((digest, size))
                if not dry_run:
                    self.cas.delete(digest)
                    self.db.delete_blob(digest)
            report.temp_files = (
                self.cas.stale_temp_files(older_than)
                + [p for p in stale_partials(self.cas, older_than) if not _in_use(p)]
                + stale_downloads(self.cas, older_than)
            )
            if not dry_run:
                for tmp in report.temp_files:
                    tmp.unlink(missing_ok=True)
        return report

    # --- packs --------------------------------------------------------------------------

    def pack_blob(self, digest: str, reporter: Reporter = _quiet) -> int:
        if self.cas.location(digest) == "file":
            self._index_placed(digest, reporter)
        chunks = self.db.blob_chunks(digest)
        row = self.db.get_blob(digest)
        if row is None:
            raise StoreError(f"blob {digest} is not in the store")
        packed = self.cas.pack(digest, chunks, reporter(f"packing {digest[7:19]}", row.size))
        self.db.set_location(digest, "pack")
        return packed

    def unpack_blob(self, digest: str, reporter: Reporter = _quiet) -> None:
        row = self.db.get_blob(digest)
        path = self.cas.unpack(
            digest, reporter(f"unpacking {digest[7:19]}", row.size if row else 0)
        )
        self.db.set_location(digest, "file")
        if row is not None:
            self.db.mark_verified(digest, path.stat().st_mtime_ns)


def _in_use(path: Path) -> bool:
    """Whether a fetch holds this partial (its flock); sidecars follow their data file."""
    data = (
        path
        if path.name.endswith(PARTIAL_SUFFIX)
        else path.with_name(path.name.split(PROGRESS_SUFFIX)[0] + PARTIAL_SUFFIX)
    )
    return is_locked(data)


def _disk_size(cas: ContentAddressedStore, digest: str) -> int:
    for p in (cas.path(digest), cas.pack_path(digest)):
        with contextlib.suppress(FileNotFoundError):
            return p.stat().st_size
    return 0


def _config_json(info: GGUFInfo | None, layers: list[Layer]) -> bytes:
    """The image config Ollama writes next to a manifest (its ConfigV2)."""
    d = details(info) if info is not None else {}
    config = {
        "model_format": d.get("format", "gguf"),
        "model_family": d.get("family", ""),
        "model_families": d.get("families") or [],
        "model_type": d.get("parameter_size", ""),
        "file_type": d.get("quantization_level", ""),
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    return json.dumps(config, separators=(",", ":")).encode()


__all__ = [
    "AddResult",
    "GCReport",
    "ImportReport",
    "ModelEntry",
    "ModelNotFound",
    "ModelStore",
    "Reporter",
    "StoreError",
    "VerifyReport",
]
