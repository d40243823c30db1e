"""One holder, N pullers, shaped links: the swarm against a registry, in the same run.

Every host is a separate namespace on a shaped LAN (``bench.netlab``): one holder and N
pullers, each a real ``dmm node start`` process. Two ways of getting one model to all N:

- registry (the baseline): the holder serves the blob over plain HTTP
  (``python -m http.server``) and the N pullers download it at once with curl, the way N
  machines pull from one registry. The holder's link carries N copies, so this takes
  about N times one download. One download alone is measured too.
- swarm: the N pullers' nodes are asked to pull at once, through their Ollama API
  (``POST /api/pull``, as ``ollama pull`` asks); they find each other mid-fetch and
  trade chunks. The pulls start once the nodes have settled (done joining), as on
  machines whose nodes run already.

Figures, for each N: time until all N have the model (against the registry's time), the
same time against one lone download (goal: at most 2x at N = 16), and the bytes the
holder's link sent divided by the model size (goal: at most 2). Then what the swarm costs
in CPU, which this machine, not the protocol, may make the limit: the CPU seconds of every
node process during the swarm, per puller, against those of one pull alone (holder and
puller, in a lab of their own, measured first); and the swarm's time against that CPU
spread over the machine's cores, the least time it could take here. One dmm pull alone is
also measured against one HTTP download.

The model is small so a run takes minutes on 2 cores, and its chunks are a quarter of
the default size, so that the few requests each puller keeps in flight at the holder
are as small a share of it as they are of a multi-gigabyte model at the default size.
Every node shares the machine's 2 cores, so the swarm's figure includes 17 processes'
CPU contention that real machines would not have.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
# The nodes have settled when all of them together use less CPU than this in a second.
SETTLED_CPU = 0.1
SETTLE_MAX = 120.0


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


def _cpu_seconds(processes: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU the processes have used so far (``ip netns exec`` execs, so each
    pid is the node's own)."""
    total = 0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError as exc:
            raise RuntimeError(f"node process {process.pid} is gone: {exc}") from exc
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _settle(nodes: list[subprocess.Popen[bytes]]) -> float:
    """Wait until the nodes have done joining (connecting to each other, identify, the
    DHT's routing-table refreshes): their CPU over a second is under SETTLED_CPU. The
    swarm is timed as a user with running nodes sees it, not with 17 start-ups in it.
    Returns the seconds waited; gives up waiting after SETTLE_MAX."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_MAX:
        before = _cpu_seconds(nodes)
        time.sleep(1.0)
        if _cpu_seconds(nodes) - before < SETTLED_CPU:
            break
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class Swarm:
    seconds: float  # until every puller has the model
    upload: float  # the holder's link, in model sizes
    cpu: float  # seconds, every node process together


def _http_one(lab: Lab, root: Path, digest: str) -> list[str]:
    """Serve the holder's blobs over plain HTTP; returns the curl command that downloads
    the model, run once as a warm-up."""
    lab.start(
        0,
        [sys.executable, "-m", "http.server", "--bind", lab.ip(0), str(HTTP_PORT),
         "--directory", str(root / "h0" / "models" / "blobs")],
        log=root / "http.log",
    )  # fmt: skip
    url = f"http://{lab.ip(0)}:{HTTP_PORT}/sha256-{digest}"
    curl = ["curl", "-sf", "--retry", "20", "--retry-connrefused", "--retry-delay", "0",
            "-o", "/dev/null", url]  # fmt: skip
    _all_at_once(lab, range(1, 2), {1: curl}, ROOT)  # warm-up: the server is up
    return curl


def _http_registry(lab: Lab, curl: list[str], pullers: int) -> tuple[float, int]:
    """``pullers`` hosts download at once from the holder, the registry case: seconds,
    and the bytes the holder's link sent."""
    sent = lab.tx_bytes(0)
    hosts = range(1, pullers + 1)
    seconds = _all_at_once(lab, hosts, dict.fromkeys(hosts, curl), ROOT)
    return seconds, lab.tx_bytes(0) - sent


def _swarm(lab: Lab, root: Path, model: Path, digest: str, pullers: int) -> Swarm:
    """Start the holder's node and ``pullers`` more, then have them all pull at once."""
    hosts = pullers + 1
    holder_cfg = root / "h0" / "node.toml"
    holder_id = subprocess.run(
        _dmm("id", "--config", str(holder_cfg)), capture_output=True, text=True,
        cwd=ROOT, check=True,
    ).stdout.strip()  # fmt: skip
    boot = f"/ip4/{lab.ip(0)}/tcp/{P2P_PORT}/p2p/{holder_id}"
    configs = {0: holder_cfg}
    for h in range(1, hosts):
        configs[h] = _config(root / f"h{h}", lab, h, boot)
    nodes = [lab.start(0, _dmm("node", "start", "--config", str(holder_cfg)), cwd=ROOT,
                       log=root / "h0.log")]  # fmt: skip
    deadline = time.monotonic() + 120
    _wait_api(lab, 0, "/api/status", re.compile(r'"published":1\b'), deadline)
    for h in range(1, hosts):
        nodes.append(lab.start(h, _dmm("node", "start", "--config", str(configs[h])),
                               cwd=ROOT, log=root / f"h{h}.log"))  # fmt: skip
    deadline = time.monotonic() + 60 + 10 * pullers
    for h in range(1, hosts):
        _wait_api(lab, h, "/api/status", re.compile(r'"peers":[1-9]'), deadline)
    settled = _settle(nodes)
    progress(f"swarm N={pullers}: nodes settled in {settled:.1f}s; {pullers} pull at once")
    sent = lab.tx_bytes(0)
    cpu = _cpu_seconds(nodes)
    # Through each node's Ollama API, as `OLLAMA_HOST=<node> ollama pull` does: the
    # figure is the swarm's, not 16 Python CLI start-ups on two cores.
    pull = ["curl", "-sf", "--max-time", "900", "-X", "POST", "-d",
            f'{{"model": "{MODEL}", "stream": false}}',
            f"http://127.0.0.1:{API_PORT}/api/pull"]  # fmt: skip
    seconds = _all_at_once(lab, range(1, hosts), dict.fromkeys(range(1, hosts), pull), ROOT)
    cpu = _cpu_seconds(nodes) - cpu
    upload = (lab.tx_bytes(0) - sent) / model.stat().st_size
    for h in range(1, hosts):
        blob = root / f"h{h}" / "models" / "blobs" / f"sha256-{digest}"
        if not blob.is_file() or blob.stat().st_size != model.stat().st_size:
            raise RuntimeError(f"host {h} does not hold the model after its pull")
    return Swarm(seconds, upload, cpu)


@contextmanager
def _lab_with_model(pullers: int, size: int, rate: str, root: Path) -> Iterator[tuple[Lab, Path]]:
    """A lab of one holder and ``pullers`` hosts; the holder's store holds the model."""
    progress(f"swarm N={pullers}: building {pullers + 1} hosts at {rate} each")
    with Lab(pullers + 1, rate) as lab:
        holder_cfg = _config(root / "h0", lab, 0)
        model = root / "model.gguf"
        generate_model(model, size=size, seed=pullers)
        added = subprocess.run(
            _dmm("add", MODEL, str(model), "--config", str(holder_cfg)),
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        if added.returncode != 0:
            raise RuntimeError(f"dmm add: {added.stderr.strip()}")
        yield lab, model


def _lone_pull(size: int, rate: str, work: Path) -> tuple[float, Swarm]:
    """The baselines one puller gives: (one HTTP download's seconds, one dmm pull)."""
    root = work / "n1"
    with _lab_with_model(1, size, rate, root) as (lab, model):
        digest = _sha256(model)
        curl = _http_one(lab, root, digest)
        one, _ = _http_registry(lab, curl, 1)
        return one, _swarm(lab, root, model, digest, 1)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _one_size(pullers: int, size: int, rate: str, work: Path, lone: Swarm) -> list[Figure]:
    root = work / f"n{pullers}"
    with _lab_with_model(pullers, size, rate, root) as (lab, model):
        digest = _sha256(model)
        curl = _http_one(lab, root, digest)
        progress(f"swarm N={pullers}: one download")
        one, _ = _http_registry(lab, curl, 1)
        progress(f"swarm N={pullers}: {pullers} downloads from the registry at once")
        registry, registry_sent = _http_registry(lab, curl, pullers)
        progress(f"swarm N={pullers}: one {one:.1f}s, registry {registry:.1f}s")
        swarm = _swarm(lab, root, model, digest, pullers)
        progress(
            f"swarm N={pullers}: swarm {swarm.seconds:.1f}s, holder sent "
            f"{swarm.upload:.2f}x the model, {swarm.cpu:.1f} CPU s"
        )

    label = f"N={pullers}"
    return [
        Figure.against(
            BENCH, f"{label}: all have the model", swarm.seconds, "s",
            f"registry: {pullers} HTTP downloads from the holder", registry, better="lower",
        ),
        Figure.against(
            BENCH, f"{label}: all have it, vs one download", swarm.seconds, "s",
            "one HTTP download alone", one, better="lower", goal=GOAL_VS_ONE,
        ),
        Figure.against(
            BENCH, f"{label}: holder upload", swarm.upload, "x model",
            "registry holder upload", registry_sent / size, better="lower",
            goal=GOAL_UPLOAD / (registry_sent / size),
        ),
        Figure.against(
            BENCH, f"{label}: node CPU per puller", swarm.cpu / pullers, "s",
            "one pull alone: holder + puller CPU", lone.cpu, better="lower",
        ),
        Figure.against(
            BENCH, f"{label}: all have it, vs CPU-bound floor", swarm.seconds, "s",
            f"its node CPU / {os.cpu_count()} cores", swarm.cpu / (os.cpu_count() or 1),
            better="lower",
        ),
    ]  # fmt: skip


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """1 holder, N pullers in shaped network namespaces: swarm vs a registry (root)."""
    params = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="dmm-bench-swarm-") as tmp:
        one, lone = _lone_pull(params.size, params.rate, Path(tmp))
        progress(f"swarm N=1: one download {one:.1f}s, one pull {lone.seconds:.1f}s, "
                 f"{lone.cpu:.1f} CPU s")  # fmt: skip
        figures = [
            Figure.against(
                BENCH, "one dmm pull alone", lone.seconds, "s", "one HTTP download alone",
                one, better="lower",
            ),
        ]  # fmt: skip
        for pullers in params.pullers:
            figures += _one_size(pullers, params.size, params.rate, Path(tmp), lone)
    return figures
