"""A real OCI registry for tests: Debian's ``docker-registry``, started once per session.

The session fixture ``oci_registry`` writes a config (filesystem storage in a scratch
folder, plain http on a free loopback port), starts ``docker-registry serve``, waits for
``/v2/`` to answer and stops it at the end. ``OciRegistry.push_model`` publishes a
generated model through the OCI push API, as ``ollama push`` would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from storage.manifest import Manifest
from storage.names import digest_hex
from storage.store import ModelStore

START_TIMEOUT = 30.0
MISSING = (
    "docker-registry is not installed: run scripts/test (it installs it) "
    "or `apt-get install docker-registry`"
)


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


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail(MISSING)
    folder = tmp_path_factory.mktemp("oci-registry")
    port = _free_port()
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (folder / "registry.log").open("wb")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
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
                pytest.fail(
                    f"docker-registry did not start: {(folder / 'registry.log').read_text()}"
                )
            time.sleep(0.05)
        scratch = folder / "models"
        scratch.mkdir()
        yield OciRegistry(url, folder / "data", scratch)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
