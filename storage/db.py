"""The metadata database: blobs, their chunk index, models and versions, in one SQLite file.

WAL mode, so the CLI and a running node may share it. The schema version lives in
``PRAGMA user_version``; MIGRATIONS[i] takes a database from version i to i + 1, in
one transaction. A database newer than this code is refused, never downgraded.
Writes happen when a blob is indexed or a model changes, never per chunk on the
transfer path.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.chunks import BlobIndex, ChunkRef
from storage.fsutil import StoreFullError

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1
    """
    CREATE TABLE blobs (
        digest      TEXT PRIMARY KEY,          -- sha256:<hex>
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,          -- of the file when indexed
        indexed_at  REAL NOT NULL,
        verified_at REAL,                      -- last full re-hash that matched
        location    TEXT NOT NULL DEFAULT 'file' CHECK (location IN ('file', 'pack'))
    );
    CREATE TABLE chunks (
        blob     TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
        idx      INTEGER NOT NULL,
        offset   INTEGER NOT NULL,
        length   INTEGER NOT NULL,
        chunk_id BLOB NOT NULL,                -- raw sha256 of the chunk
        PRIMARY KEY (blob, idx)
    ) WITHOUT ROWID;
    CREATE INDEX chunks_by_id ON chunks(chunk_id);
    CREATE TABLE models (
        name            TEXT PRIMARY KEY,      -- host/namespace/model:tag
        manifest_digest TEXT NOT NULL,
        size            INTEGER NOT NULL,
        updated_at      REAL NOT NULL,
        pinned          INTEGER NOT NULL DEFAULT 1  -- 1: a user added or pulled it here
    );
    CREATE TABLE versions (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        manifest_digest TEXT NOT NULL,
        size            INTEGER NOT NULL,
        parents         TEXT NOT NULL,         -- JSON list of version ids
        author          TEXT NOT NULL DEFAULT '',
        created_at      REAL NOT NULL
    );
    CREATE INDEX versions_by_name ON versions(name, created_at);
    """,
    # 1 -> 2: signed version records (the node signs them; storage keeps the bytes)
    """
    ALTER TABLE versions ADD COLUMN hlc INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE versions ADD COLUMN record BLOB;
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2 -> 3: what each delta sync reused locally and what it fetched (for reporting)
    """
    CREATE TABLE deltas (
        id             INTEGER PRIMARY KEY,
        model          TEXT NOT NULL,
        source         TEXT,                   -- older manifest or blob digest, if known
        target         TEXT NOT NULL,          -- sha256:<hex> of the blob assembled
        bytes_local    INTEGER NOT NULL,
        bytes_fetched  INTEGER NOT NULL,
        chunks_local   INTEGER NOT NULL,
        chunks_fetched INTEGER NOT NULL,
        created_at     REAL NOT NULL
    );
    CREATE INDEX deltas_by_model ON deltas(model, created_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _is_full(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class DatabaseError(RuntimeError):
    """The metadata database cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: str
    size: int
    mtime_ns: int
    indexed_at: float
    verified_at: float | None
    location: str


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    manifest_digest: str
    size: int
    updated_at: float
    pinned: bool


@dataclass(frozen=True, slots=True)
class VersionRow:
    id: str
    name: str
    manifest_digest: str
    size: int
    parents: tuple[str, ...]
    author: str
    created_at: float
    hlc: int = 0
    record: bytes | None = None  # the signed, encoded version record


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    blob: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DeltaRecord:
    model: str
    source: str | None
    target: str
    bytes_local: int
    bytes_fetched: int
    chunks_local: int
    chunks_fetched: int
    created_at: float


class MetadataDB:
    """Thread-safe access to the database; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{path}: cannot open the metadata database: {exc}") from None
        self._lock = threading.Lock()
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> MetadataDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                # A failed COMMIT (a full disk) may leave the transaction open, and then
                # every later BEGIN on this connection fails: always end it here.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_full(exc):
                    raise StoreFullError(
                        errno.ENOSPC, f"disk full while writing the metadata database {self.path}"
                    ) from exc
                raise

    def _query(self, sql: str, args: Iterable[object] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def _migrate(self) -> None:
        try:
            with self._tx() as conn:
                current = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if current > SCHEMA_VERSION:
                    raise DatabaseError(
                        f"{self.path}: schema version {current} is newer than this dmm supports "
                        f"({SCHEMA_VERSION}); upgrade dmm"
                    )
                for version in range(current, SCHEMA_VERSION):
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(
                f"{self.path}: cannot migrate the metadata database: {exc}"
            ) from None

    # --- blobs and chunks -------------------------------------------------------------

    def put_blob_index(self, index: BlobIndex, mtime_ns: int, location: str = "file") -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM chunks WHERE blob = ?", (index.digest,))
            conn.execute(
                "INSERT OR REPLACE INTO blobs (digest, size, mtime_ns, indexed_at, verified_at,"
                " location) VALUES (?, ?, ?, ?, ?, ?)",
                (index.digest, index.size, mtime_ns, time.time(), time.time(), location),
            )
            conn.executemany(
                "INSERT INTO chunks (blob, idx, offset, length, chunk_id) VALUES (?, ?, ?, ?, ?)",
                (
                    (index.digest, i, c.offset, c.length, c.digest)
                    for i, c in enumerate(index.chunks)
                ),
            )

    def get_blob(self, digest: str) -> BlobRow | None:
        rows = self._query(
            "SELECT digest, size, mtime_ns, indexed_at, verified_at, location FROM blobs"
            " WHERE digest = ?",
            (digest,),
        )
        return BlobRow(*rows[0]) if rows else None

    def all_blobs(self) -> list[BlobRow]:
        rows = self._query(
            "SELECT digest, size, mtime_ns, indexed_at, verified_at, location FROM blobs"
            " ORDER BY digest"
        )
        return [BlobRow(*row) for row in rows]

    def blob_chunks(self, digest: str) -> list[ChunkRef]:
        rows = self._query(
            "SELECT offset, length, chunk_id FROM chunks WHERE blob = ? ORDER BY idx", (digest,)
        )
        return [ChunkRef(*row) for row in rows]

    def find_chunk(self, chunk_id: bytes) -> list[ChunkLocation]:
        rows = self._query(
            "SELECT blob, offset, length FROM chunks WHERE chunk_id = ?", (chunk_id,)
        )
        return [ChunkLocation(*row) for row in rows]

    def find_chunks(self, chunk_ids: Iterable[bytes]) -> dict[bytes, list[ChunkLocation]]:
        """Every stored location of each chunk id, in a few queries rather than one per id.

        Ids held by no blob are absent from the result.
        """
        wanted = list(dict.fromkeys(chunk_ids))
        found: dict[bytes, list[ChunkLocation]] = {}
        # Below SQLite's bound-parameter limit on every version still in use (999).
        for start in range(0, len(wanted), _ID_BATCH):
            batch = wanted[start : start + _ID_BATCH]
            rows = self._query(
                "SELECT chunk_id, blob, offset, length FROM chunks WHERE chunk_id IN"
                f" ({','.join('?' * len(batch))}) ORDER BY blob, idx",
                batch,
            )
            for chunk_id, blob, offset, length in rows:
                found.setdefault(bytes(chunk_id), []).append(ChunkLocation(blob, offset, length))
        return found

    def mark_verified(self, digest: str, mtime_ns: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE blobs SET verified_at = ?, mtime_ns = ? WHERE digest = ?",
                (time.time(), mtime_ns, digest),
            )

    def set_location(self, digest: str, location: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE blobs SET location = ? WHERE digest = ?", (location, digest))

    def delete_blob(self, digest: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def chunk_stats(self) -> tuple[int, int, int, int]:
        """(chunk references, distinct chunks, bytes referenced, distinct bytes)."""
        row = self._query("SELECT COUNT(*), COALESCE(SUM(length), 0) FROM chunks")[0]
        distinct = self._query(
            "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM"
            " (SELECT chunk_id, MAX(length) AS length FROM chunks GROUP BY chunk_id)"
        )[0]
        return int(row[0]), int(distinct[0]), int(row[1]), int(distinct[1])

    # --- models and versions ----------------------------------------------------------

    def upsert_model(self, name: str, manifest_digest: str, size: int, pinned: bool = True) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO models (name, manifest_digest, size, updated_at, pinned)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                " manifest_digest = excluded.manifest_digest, size = excluded.size,"
                " updated_at = excluded.updated_at,"
                " pinned = MAX(models.pinned, excluded.pinned)",
                (name, manifest_digest, size, time.time(), int(pinned)),
            )

    def get_model(self, name: str) -> ModelRow | None:
        rows = self._query(
            "SELECT name, manifest_digest, size, updated_at, pinned FROM models WHERE name = ?",
            (name,),
        )
        return _model_row(rows[0]) if rows else None

    def all_models(self) -> list[ModelRow]:
        rows = self._query(
            "SELECT name, manifest_digest, size, updated_at, pinned FROM models ORDER BY name"
        )
        return [_model_row(row) for row in rows]

    def delete_model(self, name: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (name,))

    def add_version(self, version: VersionRow) -> bool:
        """Record a version; False when that id is already known."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO versions (id, name, manifest_digest, size, parents, author,"
                " created_at, hlc, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version.id,
                    version.name,
                    version.manifest_digest,
                    version.size,
                    json.dumps(list(version.parents)),
                    version.author,
                    version.created_at,
                    version.hlc,
                    version.record,
                ),
            )
            return cur.rowcount == 1

    def versions(self, name: str) -> list[VersionRow]:
        """Every version of ``host/namespace/model:tag`` known here, oldest first."""
        rows = self._query(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? ORDER BY hlc, created_at, id",
            (name,),
        )
        return [_version_row(r) for r in rows]

    def get_version(self, version_id: str) -> VersionRow | None:
        rows = self._query(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE id = ?", (version_id,))
        return _version_row(rows[0]) if rows else None

    def versions_like(self, pattern: str) -> list[VersionRow]:
        """Versions whose name matches a SQL LIKE pattern (prefix search for the catalog)."""
        rows = self._query(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name LIKE ? ESCAPE '\\'"
            " ORDER BY name, hlc, id",
            (pattern,),
        )
        return [_version_row(r) for r in rows]

    # --- deltas -----------------------------------------------------------------------

    def add_delta(self, record: DeltaRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO deltas (model, source, target, bytes_local, bytes_fetched,"
                " chunks_local, chunks_fetched, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.model,
                    record.source,
                    record.target,
                    record.bytes_local,
                    record.bytes_fetched,
                    record.chunks_local,
                    record.chunks_fetched,
                    record.created_at,
                ),
            )

    def deltas(self, model: str) -> list[DeltaRecord]:
        """The deltas recorded for ``model``, oldest first."""
        rows = self._query(
            "SELECT model, source, target, bytes_local, bytes_fetched, chunks_local,"
            " chunks_fetched, created_at FROM deltas WHERE model = ? ORDER BY created_at, id",
            (model,),
        )
        return [
            DeltaRecord(
                str(r[0]),
                None if r[1] is None else str(r[1]),
                str(r[2]),
                int(r[3]),
                int(r[4]),
                int(r[5]),
                int(r[6]),
                float(r[7]),
            )
            for r in rows
        ]

    # --- settings -----------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


_ID_BATCH = 500
_VERSION_COLUMNS = "id, name, manifest_digest, size, parents, author, created_at, hlc, record"


def _version_row(r: Any) -> VersionRow:
    return VersionRow(
        str(r[0]),
        str(r[1]),
        str(r[2]),
        int(r[3]),
        tuple(json.loads(str(r[4]))),
        str(r[5]),
        float(r[6]),
        int(r[7]),
        None if r[8] is None else bytes(r[8]),
    )


def _model_row(row: Any) -> ModelRow:
    return ModelRow(str(row[0]), str(row[1]), int(row[2]), float(row[3]), bool(row[4]))
