"""Ollama's manifests tree: ``manifests/<host>/<namespace>/<model>/<tag>``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.fsutil import atomic_write_bytes, remove_empty_parents
from storage.manifest import Manifest, ManifestError, parse_manifest
from storage.names import InvalidName, ModelName, parse_model_name


@dataclass(frozen=True, slots=True)
class StoredManifest:
    name: ModelName
    manifest: Manifest
    raw: bytes
    mtime: float

    @property
    def digest(self) -> str:
        # Ollama reports the digest of the bytes on disk, which may differ from our
        # re-serialisation (key order, spacing) if another tool wrote the file.
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True, slots=True)
class BrokenManifest:
    """A file under manifests/ that is not a valid manifest of a valid name."""

    path: Path
    reason: str


class OllamaLayout:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.manifests_dir = models_dir / "manifests"
        # Called (from whatever thread wrote) after a manifest is written or deleted.
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def manifest_path(self, name: ModelName) -> Path:
        return self.models_dir / name.manifest_relpath()

    def read(self, name: ModelName) -> StoredManifest | None:
        path = self.manifest_path(name)
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return StoredManifest(name, parse_manifest(raw), raw, mtime)

    def write(self, name: ModelName, manifest: Manifest) -> bytes:
        raw = manifest.to_bytes()
        atomic_write_bytes(self.manifest_path(name), raw)
        self._changed()
        return raw

    def write_raw(self, name: ModelName, raw: bytes) -> None:
        """Write manifest bytes exactly as given (imports keep the digest Ollama shows)."""
        parse_manifest(raw)
        atomic_write_bytes(self.manifest_path(name), raw)
        self._changed()

    def delete(self, name: ModelName) -> bool:
        path = self.manifest_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        remove_empty_parents(path.parent, self.manifests_dir)
        self._changed()
        return True

    def walk(self) -> Iterator[StoredManifest | BrokenManifest]:
        """Every manifest file, parsed; broken ones are reported, not skipped silently."""
        if not self.manifests_dir.is_dir():
            return
        for root, dirs, files in os.walk(self.manifests_dir):
            dirs.sort()
            rel = Path(root).relative_to(self.manifests_dir)
            if len(rel.parts) != 3:
                continue
            for tag in sorted(files):
                path = Path(root, tag)
                if tag.startswith("."):
                    continue  # our own temp files
                host, namespace, model = rel.parts
                try:
                    name = parse_model_name(f"{host}/{namespace}/{model}:{tag}")
                    raw = path.read_bytes()
                    yield StoredManifest(name, parse_manifest(raw), raw, path.stat().st_mtime)
                except (InvalidName, ManifestError, OSError) as exc:
                    yield BrokenManifest(path, str(exc))
