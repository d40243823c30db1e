"""A real OCI registry for tests and benchmarks: Debian's ``docker-registry``.

``run_oci_registry(folder)`` writes a config (filesystem storage in ``folder``, plain
http on a free loopback port), starts ``docker-registry serve``, waits for ``/v2/`` to
answer, and stops it when the block ends. ``OciRegistry.push_model`` publishes a GGUF
file as an Ollama model through the OCI push API, as ``ollama push`` would. Like
``node/testing.py``, nothing here is faked.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from storage.manifest import Manifest
from storage.names import digest_hex
from storage.store import ModelStore

START_TIMEOUT = 30.0
MISSING = (
    "docker-registry is not installed: run scripts/test (it installs it) "
    "or `apt-get install docker-registry`"
)


class RegistryUnavailable(RuntimeError):
    """docker-registry is missing or did not start; the message says what to do."""


@dataclass(frozen=True, slots=True)
class OciRegistry:
    url: str
    root: Path  # the registry's filesystem storage
    scratch: Path

    def push_model(self, gguf: Path, repo: str, tag: str) -> Manifest:
        """Make ``gguf`` an Ollama model and push its blobs and manifest to ``repo:tag``."""
        folder = self.scratch / f"{repo.replace('/', '_')}_{tag}"
        with ModelStore(folder / "models", folder / "dmm.db", folder / "cas") as store:
            store.add_model(f"{repo}:{tag}", gguf, template="{{ .Prompt }}")
            stored = store.get(f"{repo}:{tag}")
            with httpx.Client(base_url=self.url, timeout=60) as client:
                for layer in stored.manifest.all_layers():
                    if client.head(f"/v2/{repo}/blobs/{layer.digest}").status_code == 200:
                        continue
                    start = client.post(f"/v2/{repo}/blobs/uploads/")
                    assert start.status_code == 202, start.text
                    location = start.headers["Location"]
                    sep = "&" if "?" in location else "?"
                    done = client.put(
                        f"{location}{sep}digest={layer.digest}",
                        content=store.cas.path(layer.digest).read_bytes(),
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    assert done.status_code == 201, done.text
                put = client.put(
                    f"/v2/{repo}/manifests/{tag}",
                    content=stored.raw,
                    headers={"Content-Type": stored.manifest.media_type},
                )
                assert put.status_code == 201, put.text
        return stored.manifest

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt it)."""
        hexdigest = digest_hex(digest)
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def run_oci_registry(folder: Path) -> Iterator[OciRegistry]:
    """A running docker-registry storing into ``folder``; stopped when the block ends."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RegistryUnavailable(MISSING)
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log_path = folder / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:  # no event to wait on: poll the port until it answers
                try:
                    if httpx.get(f"{url}/v2/", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RegistryUnavailable(
                        f"docker-registry did not start: {log_path.read_text()[-2000:]}"
                    )
                time.sleep(0.05)
            scratch = folder / "models"
            scratch.mkdir(exist_ok=True)
            yield OciRegistry(url, folder / "data", scratch)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


__all__ = ["MISSING", "OciRegistry", "RegistryUnavailable", "run_oci_registry"]
