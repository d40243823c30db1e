"""Disk full: a pull onto a small filesystem fails with one clear line, leaves no manifest
and no visible blob, and resumes when space returns, fetching only what was missing.

The small filesystem is a tmpfs this test mounts (it needs root, or CAP_SYS_ADMIN); where
that is impossible the test fails saying so, rather than skipping unseen.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from node.config import load_config
from node.daemon import Node, open_node
from node.testing import free_port
from storage.db import MetadataDB
from storage.fsutil import StoreFullError
from storage.partial import PartialBlob
from tests.conftest import MakeModel, clean_env
from tests.test_node_cli import _config

MiB = 1024 * 1024


def _mount(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at ``tmp_path/small``, unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    proc = _mount(["-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mountpoint)])
    if proc.returncode != 0:
        pytest.fail(
            f"the disk-full test mounts a tmpfs and could not ({proc.stderr.strip()}); "
            "run it as root or with CAP_SYS_ADMIN"
        )
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _puller_config(root: Path, models_dir: Path, data_dir: Path, holder: Node) -> Path:
    folder = root / "puller"
    folder.mkdir()
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nname = "puller"\ndata_dir = "{data_dir}"\n'
        f'[storage]\nmodels_dir = "{models_dir}"\n'
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
        f'bootstrap = ["{holder.host.listen_addrs[0]}"]\nmdns = false\n'
        f'[api]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    return path


async def _cli_pull(config: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "node.cli", "pull", "big:v1", "--config", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=clean_env(),
    )


def _one_error_line(stderr: str, what: str) -> bool:
    """One ``dmm:`` line on stderr (progress lines aside), the last, saying ``what``."""
    errors = [line for line in stderr.splitlines() if line.startswith("dmm:")]
    return len(errors) == 1 and stderr.strip().endswith(errors[0]) and what in errors[0]


def _nothing_half_written(puller: Node, models_dir: Path, digest: str) -> None:
    """No manifest; the big blob not under its name; every visible blob whole (a small
    layer fetched before the disk filled is complete and verified, and gc takes it)."""
    assert not [p for p in (models_dir / "manifests").rglob("*") if p.is_file()]
    assert not (models_dir / "blobs" / f"sha256-{digest[7:]}").exists()
    assert puller.store.verify().ok


def _fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem is full."""
    ballast = directory / "ballast"
    # Unbuffered: a buffered file would retry the write that failed when it is closed,
    # and raise ENOSPC again from there.
    with ballast.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * MiB)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return ballast


# Blobs and manifests on the small disk, with the node's database on another disk (a
# store on its own disk) or on the same one (everything under one home directory).
@pytest.mark.slow
@pytest.mark.parametrize("database_too", [False, True], ids=["models-only", "database-too"])
async def test_pull_onto_a_full_disk_fails_clearly_and_resumes_when_space_returns(
    tmp_path: Path, make_model: MakeModel, small_disk: Path, database_too: bool
) -> None:
    gguf = make_model(size=12 * MiB)
    models_dir = small_disk / "models"
    data_dir = small_disk / "data" if database_too else tmp_path / "puller-data"
    holder_config = load_config(_config(tmp_path, "holder", storage='upload_rate_limit = "4MiB"\n'))
    with trio.fail_after(240):
        async with open_node(holder_config) as holder:
            added = await trio.to_thread.run_sync(lambda: holder.store.add_model("big:v1", gguf))
            await holder.refresh()
            digest, size = added.model_blob, gguf.stat().st_size
            chunks = holder.store.db.blob_chunks(digest)
            config = _puller_config(tmp_path, models_dir, data_dir, holder)
            async with open_node(load_config(config)) as puller:
                # 1. The blob cannot fit at all: refused before a byte moves, on both paths.
                cli = await _cli_pull(config)
                err = cli.stderr.decode()
                assert cli.returncode == 1, err
                assert _one_error_line(err, "disk full"), err
                async with httpx.AsyncClient(base_url=puller.api_urls[0], timeout=60) as http:
                    r = await http.post("/api/pull", json={"model": "big:v1", "stream": False})
                    assert r.status_code == 507, r.text
                    assert "disk full" in r.json()["error"] and "\n" not in r.json()["error"]
                    async with http.stream("POST", "/api/pull", json={"model": "big:v1"}) as s:
                        lines = [json.loads(x) async for x in s.aiter_lines() if x.strip()]
                    assert "disk full" in lines[-1]["error"], lines
                _nothing_half_written(puller, models_dir, digest)

                # 2. Room for it, then the disk fills up mid-pull.
                assert _mount(["-o", "remount,size=32m", str(small_disk)]).returncode == 0
                sidecar = models_dir / "blobs" / f".dmm-{digest[7:]}.progress"
                ballast: Path | None = None
                async with trio.open_nursery() as nursery:
                    result: list[subprocess.CompletedProcess[bytes]] = []

                    async def pull() -> None:
                        result.append(await _cli_pull(config))

                    nursery.start_soon(pull)
                    while not sidecar.exists():  # a first durable flush: bytes have landed
                        await trio.sleep(0.02)
                    ballast = await trio.to_thread.run_sync(_fill, small_disk)
                err = result[0].stderr.decode()
                assert result[0].returncode == 1, err
                assert _one_error_line(err, "disk full"), err
                _nothing_half_written(puller, models_dir, digest)
                assert ballast is not None
                ballast.unlink()
                with contextlib.closing(
                    PartialBlob.open(puller.store.cas, digest, size, chunks)
                ) as partial:
                    done = partial.done_bytes
                assert 0 < done < size

                # 3. Space returns: the pull resumes and fetches only what was missing.
                async with httpx.AsyncClient(base_url=puller.api_urls[0], timeout=120) as http:
                    r = await http.post("/api/pull", json={"model": "big:v1", "stream": False})
                assert r.status_code == 200, r.text
                fetched = r.json()["bytes_fetched"]
                assert fetched <= size - done + 2 * max(c.length for c in chunks)
                assert (models_dir / "blobs" / f"sha256-{digest[7:]}").read_bytes() == (
                    gguf.read_bytes()
                )
                assert puller.store.verify().ok


def test_a_full_database_raises_store_full_and_the_connection_still_works(tmp_path: Path) -> None:
    # Found with the database on the full tmpfs: SQLite's "database or disk is full" left
    # the pull with a raw sqlite3 error. SQLite's page cap makes the same error on any disk.
    with MetadataDB(tmp_path / "m.db") as db:
        pages = db._query("PRAGMA page_count")[0][0]
        db._query(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreFullError, match="disk full while writing the metadata"):
            for i in range(1000):
                db.upsert_model(f"registry.ollama.ai/library/m{i}:latest", "sha256:" + "a" * 64, i)
        # The failed transaction was ended: once there is room, writes work again.
        db._query(f"PRAGMA max_page_count = {pages + 1000}")
        db.upsert_model("registry.ollama.ai/library/after:latest", "sha256:" + "b" * 64, 1)
        assert db.get_model("registry.ollama.ai/library/after:latest") is not None
