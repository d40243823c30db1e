"""Pull throughput, memory and delta size between real node processes on loopback.

Every node is a ``dmm node start`` subprocess with its own store and free loopback ports;
every pull is ``dmm pull NAME --json`` timed from start to exit (finding holders, chunk
lists, transfer, final sha256 check, manifest). The baseline is what a registry pull
costs: the same model file served by ``python -m http.server`` on loopback, fetched with
``curl -s -o FILE`` to disk, then checked with ``sha256sum`` (and ``curl`` alone, for a
floor with no verification). Peak RSS is ``VmHWM`` of the node processes, against an idle
node's. The delta figure is what a metadata-only edit (a longer chat template) costs to
pull, as a share of the model's size; Ollama would download the whole blob again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import Figure, progress, register
from storage.chunks import MiB
from storage.testmodels import DEFAULT_CHAT_TEMPLATE, generate_model

BENCH = "transfer"
FULL_SIZE = 1024 * MiB
QUICK_SIZE = 64 * MiB
FULL_HOLDERS = 4
QUICK_HOLDERS = 2
FULL_ROUNDS = 2
QUICK_ROUNDS = 1
GOAL = 0.8
RSS_GOAL_MIB = 150
MODEL = "bench-transfer:latest"
SEED = 7
# The edit a metadata-only new version makes: same weights, a longer chat template.
V2_TEMPLATE = DEFAULT_CHAT_TEMPLATE + "{# v2: a longer chat template, same weights #}" * 8
START_TIMEOUT = 60.0
FIND_TIMEOUT = 90.0
PULL_TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """No settings that would point a dmm process at the user's own store."""
    env = {k: v for k, v in os.environ.items() if k not in ("DMM_CONFIG", "OLLAMA_MODELS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(root: Path, name: str, bootstrap: list[str]) -> Path:
    """Like ``node.testing.node_config``, but with fixed free ports: the CLI needs the API's."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    boot = ", ".join(f'"{addr}"' for addr in bootstrap)
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "data"\n'
        f'[storage]\nmodels_dir = "models"\n'
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/{_free_port()}"]\n'
        f"bootstrap = [{boot}]\nmdns = false\n"
        f'[api]\nlisten = "127.0.0.1:{_free_port()}"\n'
    )
    return path


def _dmm(config: Path, *args: str, timeout: float = 120) -> Any:
    """Run ``dmm ARGS --json --config CONFIG``; its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dmm {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout)


def _status_mib(pid: int, key: str) -> float:
    """A ``kB`` line of /proc/<pid>/status (``VmHWM``, ``RssAnon``...) of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


class AnonSampler:
    """Peak ``RssAnon`` of some processes, sampled every 20 ms in a thread.

    ``VmHWM`` also counts the file pages a process maps, and a puller maps the blob it
    verifies (``index_file`` maps 64 MiB windows, two passes at once); ``RssAnon`` is the
    memory the process itself allocated.
    """

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, pid: int) -> None:
        with self._lock:
            self.peak.setdefault(pid, 0.0)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                for pid, peak in self.peak.items():
                    with contextlib.suppress(OSError, RuntimeError, ValueError):
                        self.peak[pid] = max(peak, _status_mib(pid, "RssAnon"))

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class NodeProcess:
    """``dmm node start`` in a subprocess; its log goes to ``<folder>/node.log``."""

    def __init__(self, root: Path, name: str, bootstrap: list[str]) -> None:
        self.name = name
        self.folder = root / name
        self.config = _config(root, name, bootstrap)
        self.log = open(self.folder / "node.log", "wb")  # noqa: SIM115  closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "node", "start", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=_env(),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # printed once the node is up
        if not first.startswith("dmm node "):
            self.stop()
            log = (self.folder / "node.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"node {name} did not start: {first!r}\n{log}")
        self.peer_id = first.split()[2]
        self.p2p = self.proc.stdout.readline().split()[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_mib(self) -> float:
        return _status_mib(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@contextlib.contextmanager
def _nodes() -> Iterator[list[NodeProcess]]:
    """Every node started goes in the list; all are stopped when the block ends."""
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def _wait_for_holders(node: NodeProcess, holders: int) -> None:
    """Until ``find`` from ``node`` sees the model at ``holders`` reachable peers."""
    deadline = time.monotonic() + FIND_TIMEOUT
    glob = MODEL.split(":")[0] + "*"
    seen = 0
    while True:
        found = _dmm(node.config, "find", glob, "--timeout", "5", timeout=60)
        reachable: set[str] = set()
        for model in found["models"]:
            reachable.update(model["reachable"])
        reachable.discard(node.peer_id)
        seen = len(reachable)
        if seen >= holders:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{node.name} sees {seen} of {holders} holders after {FIND_TIMEOUT}s"
            )
        time.sleep(0.5)


def _timed_pull(node: NodeProcess) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = _dmm(node.config, "pull", MODEL, timeout=PULL_TIMEOUT)
    seconds = time.perf_counter() - started
    if result.get("status") != "success" or result.get("already_complete"):
        raise RuntimeError(f"{node.name}: pull did not fetch the model: {result}")
    return seconds, result


def _forget(node: NodeProcess, size: int) -> None:
    """Remove the model from a running node's store and delete its blobs (``rm`` + ``gc``).

    The node stays up: node/pull.py does not count a provider it cannot dial (``DialError``)
    as a peer error, so a stopped puller left in the DHT would fail every later pull.
    """
    _dmm(node.config, "rm", MODEL)
    gc = _dmm(node.config, "gc", "--older-than", "0s")
    if gc["freed"] < size:
        raise RuntimeError(f"{node.name}: gc freed {gc['freed']} bytes, not the {size}-byte model")


@contextlib.contextmanager
def _http_server(directory: Path) -> Iterator[str]:
    """``python -m http.server`` on a free loopback port, serving ``directory``."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("python -m http.server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _registry_pull(url: str, out: Path, digest: str) -> tuple[float, float]:
    """curl the file to disk, then sha256sum it: (curl seconds, sha256sum seconds)."""
    started = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True, timeout=PULL_TIMEOUT)
    fetched = time.perf_counter()
    summed = subprocess.run(
        ["sha256sum", str(out)], check=True, capture_output=True, text=True, timeout=PULL_TIMEOUT
    )
    checked = time.perf_counter()
    if "sha256:" + summed.stdout.split()[0] != digest:
        raise RuntimeError(f"curl fetched {out} with the wrong sha256")
    out.unlink()
    return fetched - started, checked - fetched


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _fresh_model(path: Path, size: int, template: str | None) -> None:
    generate_model(path, size, seed=SEED, chat_template=template)
    # Flushed now, so writeback of these pages does not land inside a timed pull.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """dmm pull (node processes, loopback) vs curl + sha256sum; RSS; delta (1 GiB; goal >= 0.8)"""
    if shutil.which("curl") is None or shutil.which("sha256sum") is None:
        raise RuntimeError("the transfer benchmark's baseline needs curl and sha256sum")
    size = QUICK_SIZE if quick else FULL_SIZE
    holders = QUICK_HOLDERS if quick else FULL_HOLDERS
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    mib = size // MiB
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="dmm-bench-transfer-") as tmp,
        _nodes() as nodes,
        AnonSampler() as anon,
    ):
        work = Path(tmp)
        serve = work / "serve"
        serve.mkdir()
        model = serve / "model.gguf"
        progress(f"{BENCH}: generating a {mib} MiB GGUF model in {work}")
        _fresh_model(model, size, None)
        digest = _sha256(model)  # also warms the page cache, for curl and the holders alike
        total = model.stat().st_size

        progress(f"{BENCH}: adding it to {holders} holder stores")
        holder_configs = [_config(work, f"holder{i}", []) for i in range(holders)]
        for config in holder_configs:
            added = _dmm(config, "add", MODEL, str(model), timeout=PULL_TIMEOUT)
            if added["model_blob"] != digest:
                raise RuntimeError(f"dmm add named the model blob {added['model_blob']}")
        first = NodeProcess(work, "holder0", [])
        nodes.append(first)

        # 1. One holder, one puller; alternating with the baseline, best of each.
        # Pullers live to the end: a stopped node stays a provider in the DHT, and a pull
        # that meets a provider it cannot dial fails (see _forget). Between rounds a puller
        # forgets the model (rm + gc) so the next round fetches all of it again.
        best_curl = best_sha = best_one = float("inf")
        peers_one: list[str] = []
        puller = NodeProcess(work, "puller-one", [first.p2p])
        nodes.append(puller)
        _wait_for_holders(puller, 1)
        idle_rss = puller.peak_rss_mib()
        idle_anon = _status_mib(puller.pid, "RssAnon")
        anon.watch(puller.pid)
        anon.watch(first.pid)
        with _http_server(serve) as base_url:
            for r in range(rounds):
                progress(f"{BENCH}: round {r + 1}/{rounds}: curl + sha256sum of {mib} MiB")
                curl_s, sha_s = _registry_pull(f"{base_url}/model.gguf", work / "curl.out", digest)
                best_curl = min(best_curl, curl_s)
                best_sha = min(best_sha, curl_s + sha_s)
                progress(f"{BENCH}: round {r + 1}/{rounds}: dmm pull of {mib} MiB from 1 peer")
                seconds, result = _timed_pull(puller)
                best_one = min(best_one, seconds)
                peers_one = result["peers"]
                _forget(puller, total)
        puller_one_rss = puller.peak_rss_mib()
        progress(
            f"{BENCH}: curl {total / 1e6 / best_curl:.0f} MB/s, curl + sha256sum "
            f"{total / 1e6 / best_sha:.0f} MB/s, dmm from 1 peer {total / 1e6 / best_one:.0f} MB/s"
        )

        # 2. The same from every holder at once, to a fresh puller.
        for config in holder_configs[1:]:
            nodes.append(NodeProcess(work, config.parent.name, [first.p2p]))
        best_many = float("inf")
        peers_many: list[str] = []
        many = NodeProcess(work, "puller-many", [first.p2p])
        nodes.append(many)
        _wait_for_holders(many, holders)
        idle_rss = max(idle_rss, many.peak_rss_mib())
        idle_anon = max(idle_anon, _status_mib(many.pid, "RssAnon"))
        anon.watch(many.pid)
        for r in range(rounds):
            progress(f"{BENCH}: round {r + 1}/{rounds}: dmm pull of {mib} MiB from {holders} peers")
            if r:
                _forget(many, total)
            seconds, result = _timed_pull(many)
            best_many = min(best_many, seconds)
            peers_many = result["peers"]
        puller_many_rss = many.peak_rss_mib()
        server_rss = first.peak_rss_mib()
        puller_anon = max(anon.peak[puller.pid], anon.peak[many.pid])
        server_anon = anon.peak[first.pid]
        progress(
            f"{BENCH}: dmm from {len(peers_many)} peers {total / 1e6 / best_many:.0f} MB/s; "
            f"peak RSS: puller {puller_many_rss:.0f} MiB, server {server_rss:.0f} MiB, "
            f"idle node {idle_rss:.0f} MiB; peak RssAnon: puller {puller_anon:.0f} MiB, "
            f"server {server_anon:.0f} MiB, idle node {idle_anon:.0f} MiB"
        )

        # 3. A metadata-only edit: holder0 adds v2, the last puller (which has v1) pulls it.
        progress(f"{BENCH}: delta: holder0 adds v2 (longer chat template), a v1 holder pulls it")
        v2 = work / "model-v2.gguf"
        _fresh_model(v2, size, V2_TEMPLATE)
        added = _dmm(first.config, "add", MODEL, str(v2), timeout=PULL_TIMEOUT)
        if not added["changed"]:
            raise RuntimeError("dmm add of v2 changed nothing")
        _, delta = _timed_pull(many)
        shown = _dmm(many.config, "show", MODEL)
        if shown["digest"] != added["digest"]:
            raise RuntimeError(f"the puller has {shown['digest']}, not v2 {added['digest']}")
        delta_pct = 100 * delta["bytes_fetched"] / added["size"]
        progress(
            f"{BENCH}: delta fetched {delta['bytes_fetched']:,} of {added['size']:,} bytes "
            f"({delta_pct:.2f}%), {delta.get('bytes_local', 0):,} copied locally"
        )
    progress(f"{BENCH}: done in {time.monotonic() - began:.0f}s")

    base_sha = total / 1e6 / best_sha
    base_curl = total / 1e6 / best_curl
    registry = "curl -o + sha256sum (http.server, loopback)"
    curl_only = "curl -o alone, no check (http.server, loopback)"
    idle = "idle node process VmHWM"
    one = f"dmm pull {mib} MiB, 1 peer (node processes)"
    multi = f"dmm pull {mib} MiB, {len(peers_many)} peers at once (node processes)"
    rss_goal = RSS_GOAL_MIB / idle_rss
    if len(peers_one) != 1:
        raise RuntimeError(f"the one-peer pull used {len(peers_one)} peers")
    return [
        Figure.against(BENCH, one, total / 1e6 / best_one, "MB/s", registry, base_sha, goal=GOAL),
        Figure.against(
            BENCH, one + ", vs curl alone", total / 1e6 / best_one, "MB/s", curl_only, base_curl
        ),
        Figure.against(
            BENCH, multi, total / 1e6 / best_many, "MB/s", registry, base_sha, goal=GOAL
        ),
        Figure.against(
            BENCH, multi + ", vs curl alone", total / 1e6 / best_many, "MB/s", curl_only, base_curl
        ),
        Figure.against(
            BENCH,
            f"peak RSS (VmHWM) puller, 1 peer (goal <= {RSS_GOAL_MIB} MiB)",
            puller_one_rss,
            "MiB",
            idle,
            idle_rss,
            better="lower",
            goal=rss_goal,
        ),
        Figure.against(
            BENCH,
            f"peak RSS (VmHWM) puller, {len(peers_many)} peers (goal <= {RSS_GOAL_MIB} MiB)",
            puller_many_rss,
            "MiB",
            idle,
            idle_rss,
            better="lower",
            goal=rss_goal,
        ),
        Figure.against(
            BENCH,
            f"peak RSS (VmHWM) server, all pulls (goal <= {RSS_GOAL_MIB} MiB)",
            server_rss,
            "MiB",
            idle,
            idle_rss,
            better="lower",
            goal=rss_goal,
        ),
        Figure.against(
            BENCH,
            "peak RssAnon puller, both pulls (sampled 50/s; no mapped file pages)",
            puller_anon,
            "MiB",
            "idle node process RssAnon",
            idle_anon,
            better="lower",
        ),
        Figure.against(
            BENCH,
            "peak RssAnon server, all pulls (sampled 50/s; no mapped file pages)",
            server_anon,
            "MiB",
            "idle node process RssAnon",
            idle_anon,
            better="lower",
        ),
        Figure.against(
            BENCH,
            "delta pull, chat template edit",
            delta_pct,
            "% of model",
            "Ollama re-downloads the whole model: 100%",
            100.0,
            better="lower",
        ),
    ]
