"""The node's local store, opened from its configuration."""

from __future__ import annotations

from node.config import Config
from storage.chunks import ChunkParams
from storage.store import ModelStore

DB_FILENAME = "dmm.db"


def chunk_params(config: Config) -> ChunkParams:
    return ChunkParams(
        min_size=config.sync.min_chunk_size,
        avg_size=config.sync.chunk_size,
        max_size=config.sync.max_chunk_size,
    )


def open_store(config: Config) -> ModelStore:
    """The store at ``[storage] models_dir``, its database under ``[node] data_dir``."""
    config.node.data_dir.mkdir(parents=True, exist_ok=True)
    return ModelStore(
        models_dir=config.storage.models_dir,
        db_path=config.node.data_dir / DB_FILENAME,
        packs_dir=config.sync.cas_dir,
        params=chunk_params(config),
    )
