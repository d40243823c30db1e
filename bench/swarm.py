"""One holder, N pullers, shaped links: the swarm against a registry, in the same run.

Every host is a separate namespace on a shaped LAN (``bench.netlab``): one holder and N
pullers, each a real ``dmm node start`` process. Two ways of getting one model to all N:

- registry (the baseline): the holder serves the blob over plain HTTP
  (``python -m http.server``) and the N pullers download it at once with curl, the way N
  machines pull from one registry. The holder's link carries N copies, so this takes
  about N times one download. One download alone is measured too.
- swarm: the N pullers' nodes are asked to pull at once, through their Ollama API
  (``POST /api/pull``, as ``ollama pull`` asks); they find each other mid-fetch and
  trade chunks.

Figures, for each N: time until all N have the model (against the registry's time), the
same time against one lone download (goal: at most 2x at N = 16), and the bytes the
holder's link sent divided by the model size (goal: at most 2).

The model is small so a run takes minutes on 2 cores, and its chunks are a quarter of
the default size, so that the few requests each puller keeps in flight at the holder
are as small a share of it as they are of a multi-gigabyte model at the default size.
Every node shares the machine's 2 cores, so the swarm's figure includes 17 processes'
CPU contention that real machines would not have.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import Figure, progress, register
from bench.netlab import Lab
from storage.testmodels import generate_model

BENCH = "swarm"
ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Params:
    pullers: tuple[int, ...]
    size: int  # of the model's weights
    rate: str  # of every link, as tc writes it


FULL = Params(pullers=(8, 16), size=16 * MiB, rate="20mbit")
QUICK = Params(pullers=(2,), size=4 * MiB, rate="50mbit")
P2P_PORT = 4001
API_PORT = 11435
HTTP_PORT = 8080
GOAL_VS_ONE = 2.0  # swarm time / one download, at N = 16
GOAL_UPLOAD = 2.0  # holder upload / model size
CHUNKS = '[sync]\nchunk_size = "256KiB"\nmin_chunk_size = "64KiB"\nmax_chunk_size = "512KiB"\n'
MODEL = "swarmbench:v1"


def _config(folder: Path, lab: Lab, host: int, bootstrap: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    boot = f'"{bootstrap}"' if bootstrap else ""
    path.write_text(
        f'[node]\nname = "h{host}"\ndata_dir = "data"\n'
        f'[storage]\nmodels_dir = "models"\n'
        f"{CHUNKS}"
        f'[network]\nlisten = ["/ip4/{lab.ip(host)}/tcp/{P2P_PORT}"]\n'
        f"bootstrap = [{boot}]\nmdns = false\n"
        f'[api]\nlisten = "127.0.0.1:{API_PORT}"\n'
    )
    return path


def _dmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


def _wait_api(lab: Lab, host: int, path: str, ready: re.Pattern[str], deadline: float) -> str:
    """Poll the node's API on ``host`` until ``path`` answers matching ``ready``."""
    url = f"http://127.0.0.1:{API_PORT}{path}"
    while True:
        got = lab.run(host, ["curl", "-sf", "--max-time", "2", url], timeout=10)
        if got.returncode == 0 and ready.search(got.stdout):
            return got.stdout
        if time.monotonic() > deadline:
            raise RuntimeError(f"host {host}: {path} not ready in time ({got.stdout[:200]!r})")
        time.sleep(0.2)


def _all_at_once(lab: Lab, hosts: range, argv_for: dict[int, list[str]], cwd: Path) -> float:
    """Start argv_for[h] on every host together; seconds until the last one exits 0."""
    started = time.monotonic()
    running = {
        h: subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(h), *argv_for[h]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
        )
        for h in hosts
    }
    failed: list[str] = []
    for h, process in running.items():
        _, err = process.communicate(timeout=900)
        if process.returncode != 0:
            failed.append(f"host {h}: {err.decode(errors='replace').strip()[-300:]}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return time.monotonic() - started


def _one_size(pullers: int, size: int, rate: str, work: Path) -> list[Figure]:
    hosts = pullers + 1
    progress(f"swarm N={pullers}: building {hosts} hosts at {rate} each")
    with Lab(hosts, rate) as lab:
        root = work / f"n{pullers}"
        holder_cfg = _config(root / "h0", lab, 0)
        root.mkdir(parents=True, exist_ok=True)
        model = root / "model.gguf"
        generate_model(model, size=size, seed=pullers)
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        added = subprocess.run(
            _dmm("add", MODEL, str(model), "--config", str(holder_cfg)),
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        if added.returncode != 0:
            raise RuntimeError(f"dmm add: {added.stderr.strip()}")
        blobs = root / "h0" / "models" / "blobs"

        # --- the registry case -----------------------------------------------------
        lab.start(
            0,
            [sys.executable, "-m", "http.server", "--bind", lab.ip(0), str(HTTP_PORT),
             "--directory", str(blobs)],
            log=root / "http.log",
        )  # fmt: skip
        url = f"http://{lab.ip(0)}:{HTTP_PORT}/sha256-{digest}"
        curl = ["curl", "-sf", "--retry", "20", "--retry-connrefused", "--retry-delay", "0",
                "-o", "/dev/null", url]  # fmt: skip
        _all_at_once(lab, range(1, 2), {1: curl}, ROOT)  # warm-up: the server is up
        progress(f"swarm N={pullers}: one download")
        one = _all_at_once(lab, range(1, 2), {1: curl}, ROOT)
        progress(f"swarm N={pullers}: {pullers} downloads from the registry at once")
        sent = lab.tx_bytes(0)
        registry = _all_at_once(lab, range(1, hosts), dict.fromkeys(range(1, hosts), curl), ROOT)
        registry_upload = (lab.tx_bytes(0) - sent) / size
        progress(f"swarm N={pullers}: one {one:.1f}s, registry {registry:.1f}s")

        # --- the swarm ---------------------------------------------------------------
        holder_id = subprocess.run(
            _dmm("id", "--config", str(holder_cfg)), capture_output=True, text=True,
            cwd=ROOT, check=True,
        ).stdout.strip()  # fmt: skip
        boot = f"/ip4/{lab.ip(0)}/tcp/{P2P_PORT}/p2p/{holder_id}"
        configs = {0: holder_cfg}
        for h in range(1, hosts):
            configs[h] = _config(root / f"h{h}", lab, h, boot)
        lab.start(0, _dmm("node", "start", "--config", str(holder_cfg)), cwd=ROOT,
                  log=root / "h0.log")  # fmt: skip
        deadline = time.monotonic() + 120
        _wait_api(lab, 0, "/api/status", re.compile(r'"published":1\b'), deadline)
        for h in range(1, hosts):
            lab.start(h, _dmm("node", "start", "--config", str(configs[h])), cwd=ROOT,
                      log=root / f"h{h}.log")  # fmt: skip
        deadline = time.monotonic() + 60 + 10 * pullers
        for h in range(1, hosts):
            _wait_api(lab, h, "/api/status", re.compile(r'"peers":[1-9]'), deadline)
        progress(f"swarm N={pullers}: {pullers} nodes pull at once")
        sent = lab.tx_bytes(0)
        # Through each node's Ollama API, as `OLLAMA_HOST=<node> ollama pull` does: the
        # figure is the swarm's, not 16 Python CLI start-ups on two cores.
        pull = ["curl", "-sf", "--max-time", "900", "-X", "POST", "-d",
                f'{{"model": "{MODEL}", "stream": false}}',
                f"http://127.0.0.1:{API_PORT}/api/pull"]  # fmt: skip
        pulls = dict.fromkeys(range(1, hosts), pull)
        swarm = _all_at_once(lab, range(1, hosts), pulls, ROOT)
        upload = (lab.tx_bytes(0) - sent) / size
        for h in range(1, hosts):
            blob = root / f"h{h}" / "models" / "blobs" / f"sha256-{digest}"
            if not blob.is_file() or blob.stat().st_size != model.stat().st_size:
                raise RuntimeError(f"host {h} does not hold the model after its pull")
        progress(f"swarm N={pullers}: swarm {swarm:.1f}s, holder sent {upload:.2f}x the model")

    label = f"N={pullers}"
    return [
        Figure.against(
            BENCH, f"{label}: all have the model", swarm, "s",
            f"registry: {pullers} HTTP downloads from the holder", registry, better="lower",
        ),
        Figure.against(
            BENCH, f"{label}: all have it, vs one download", swarm, "s",
            "one HTTP download alone", one, better="lower", goal=GOAL_VS_ONE,
        ),
        Figure.against(
            BENCH, f"{label}: holder upload", upload, "x model",
            "registry holder upload", registry_upload, better="lower",
            goal=GOAL_UPLOAD / registry_upload,
        ),
    ]  # fmt: skip


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """1 holder, N pullers in shaped network namespaces: swarm vs a registry (root)."""
    params = QUICK if quick else FULL
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="dmm-bench-swarm-") as tmp:
        for pullers in params.pullers:
            figures += _one_size(pullers, params.size, params.rate, Path(tmp))
    return figures
