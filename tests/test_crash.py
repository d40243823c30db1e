"""Crash safety: SIGKILL `dmm add`/`dmm import` and a pulling node at random moments.

After every kill `dmm verify` checks the store — no visible blob whose
bytes do not match its name, no manifest naming a missing blob — and at the end the model
is complete and bit-exact. Kill moments are drawn from a seeded RNG; the seed is printed
(run with ``DMM_CRASH_SEED=N`` to replay one). ``DMM_CRASH_KILLS`` raises the count for a
longer soak.

Processes come from a fork server: one process imports everything `dmm` needs, then
forks a child per command, and the child runs ``node.cli.main`` on it exactly as the `dmm`
entry point does. Interpreter start-up (seconds here, mostly libp2p's import) is thus
paid once, and the kills land in the work, not in ``import``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import load_config
from node.local import open_store
from tests.conftest import MakeModel, clean_env, dmm
from tests.test_node_cli import _config

MiB = 1024 * 1024
KILLS = int(os.environ.get("DMM_CRASH_KILLS", "20"))

_SERVER = r"""
import json, os, sys
import node.cli, node.daemon
print("ready", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command[0] == "run":
        _, argv, log = command
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                code = node.cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    else:
        pid, status = os.waitpid(command[1], os.WNOHANG)
        print(json.dumps(os.waitstatus_to_exitcode(status) if pid else None), flush=True)
"""


class ForkServer:
    """Runs `dmm` commands as forked children of one process that has done the imports."""

    def __init__(self, logs: Path) -> None:
        logs.mkdir(exist_ok=True)
        self.logs = logs
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        self.children: set[int] = set()
        assert self._ask(None) == "ready"

    def _ask(self, command: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def run(self, label: str, *argv: str) -> Child:
        log = self.logs / f"{label}.log"
        pid = int(self._ask(["run", list(argv), str(log)]))
        self.children.add(pid)
        return Child(self, pid, log)

    def returncode(self, pid: int) -> int | None:
        code: int | None = json.loads(self._ask(["poll", pid]))
        if code is not None:
            self.children.discard(pid)
        return code

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log = server, pid, log
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.server.returncode(self.pid)
        return self.code

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            assert time.monotonic() < deadline, f"pid {self.pid} still running: {self.output()}"
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGKILL, then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line
            assert self.poll() is None, f"exited {self.code}: {self.output()}"
            assert time.monotonic() < deadline, f"no {prefix!r} line: {self.output()}"
            time.sleep(0.02)


@pytest.fixture
def forks(tmp_path: Path) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path / "logs")
    yield server
    server.close()


def _check_store(forks: ForkServer, label: str, config: Path) -> set[str]:
    """`dmm verify`: every visible blob matches its name, every manifest's blobs exist.
    Returns the names of the models in the store."""
    child = forks.run(f"verify-{label}", "verify", "--json", "--config", str(config))
    code = child.wait(timeout=120)
    report = json.loads(child.output())
    assert code == 0 and report["ok"], report
    with open_store(load_config(config)) as store:
        return {e.name.display for e in store.list_models()}


def _reset(config: Path) -> None:
    """Forget every model and blob, so the next attempt starts from an empty store."""
    with open_store(load_config(config)) as store:
        for entry in store.list_models():
            store.remove(entry.name.display)
        store.gc(0)


def _blob(config: Path, model_digest: str) -> Path:
    return load_config(config).storage.models_dir / "blobs" / f"sha256-{model_digest[7:]}"


@pytest.mark.slow
def test_sigkill_during_add_and_import_leaves_no_broken_store(
    tmp_path: Path, make_model: MakeModel, forks: ForkServer
) -> None:
    seed = int(os.environ.get("DMM_CRASH_SEED", random.randrange(2**32)))
    print(f"crash seed {seed} (DMM_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    config = _config(tmp_path, "store")
    ggufs = [make_model(f"m{i}.gguf", 6 * MiB, seed=i) for i in range(2)]
    # An Ollama store to import from (same filesystem: its blobs are hard-linked, then
    # each is indexed; that is the work killed).
    source = _config(tmp_path, "source")
    with open_store(load_config(source)) as source_store:
        for i, gguf in enumerate(ggufs):
            source_store.add_model(f"src{i}:v1", gguf)
    source_models = load_config(source).storage.models_dir
    commands = [
        ("add", "m0:v1", str(ggufs[0])),
        ("add", "m1:v1", str(ggufs[1])),
        ("import", "--from", str(source_models)),
    ]
    # How long each command takes from its fork to its exit: the kill window.
    windows = []
    for i, argv in enumerate(commands):
        started = time.monotonic()
        child = forks.run(f"measure-{i}", *argv, "--json", "--config", str(config))
        assert child.wait(timeout=120) == 0, child.output()
        windows.append(time.monotonic() - started)
        _reset(config)
    kills = completed = 0
    for attempt in range(KILLS * 3):
        if kills >= KILLS:
            break
        which = rng.randrange(len(commands))
        child = forks.run(str(attempt), *commands[which], "--json", "--config", str(config))
        time.sleep(rng.uniform(0, windows[which]))
        if child.poll() is None:
            child.kill()
            kills += 1
        else:
            assert child.code == 0, child.output()
            completed += 1
        _check_store(forks, str(attempt), config)
        if rng.random() < 0.3:
            _reset(config)
    assert kills >= KILLS, f"only {kills} kills landed in {KILLS * 3} attempts"
    # Whatever the kills left, running the commands again completes them, bit-exact.
    for argv in commands:
        dmm(config, *argv, "--json")
    assert "all good" in dmm(config, "verify").stdout
    names = _check_store(forks, "end", config)
    assert names == {"m0:v1", "m1:v1", "src0:v1", "src1:v1"}
    with open_store(load_config(config)) as store:
        for i, gguf in enumerate(ggufs):
            layer = store.get(f"m{i}:v1").manifest.layer_of_type("model")
            assert layer is not None
            assert _blob(config, layer.digest).read_bytes() == gguf.read_bytes()
    print(f"{kills} kills, {completed} runs finished before their kill moment")


def _api(config: Path, path: str) -> Any:
    url = f"http://{load_config(config).api.listen}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _start_node(forks: ForkServer, label: str, config: Path, holder: str) -> Child:
    node = forks.run(label, "node", "start", "--config", str(config))
    node.wait_for_line("dmm node ", timeout=30)
    # Pulls start once the holder is a peer: only then is a kill a kill mid-pull.
    deadline = time.monotonic() + 30
    while holder not in [p["peer_id"] for p in _api(config, "/api/peers")["peers"]]:
        assert time.monotonic() < deadline, "the restarted node never reached the holder"
        time.sleep(0.05)
    return node


@pytest.mark.slow
def test_sigkill_of_a_pulling_node_never_leaves_a_broken_store(
    tmp_path: Path, make_model: MakeModel, forks: ForkServer
) -> None:
    seed = int(os.environ.get("DMM_CRASH_SEED", random.randrange(2**32)))
    print(f"crash seed {seed} (DMM_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    # A rate-limited holder (4 MiB/s after a 4 MiB burst), so a pull lasts a second or
    # two and kills land inside it.
    holder_config = _config(tmp_path, "holder", storage='upload_rate_limit = "4MiB"\n')
    gguf = make_model(size=8 * MiB)
    with open_store(load_config(holder_config)) as holder_store:
        model_blob = holder_store.add_model("big:v1", gguf).model_blob
    holder = forks.run("holder", "node", "start", "--config", str(holder_config))
    holder_id = holder.wait_for_line("dmm node ", timeout=60).split()[2]
    holder_addr = holder.wait_for_line("  p2p ", timeout=10).split()[1]
    puller_config = _config(tmp_path, "puller", [holder_addr])
    # How long one whole pull takes here and now, from its fork to its exit: the kill
    # window. A fixed guess let most pulls finish first on a quiet machine, and too few
    # kills landed.
    node = _start_node(forks, "node-measure", puller_config, holder_id)
    started = time.monotonic()
    client = forks.run("pull-measure", "pull", "big:v1", "--json", "--config", str(puller_config))
    assert client.wait(timeout=120) == 0, client.output()
    window = time.monotonic() - started
    node.kill()
    _reset(puller_config)
    print(f"one pull took {window:.2f} s: kills land in [0, {window:.2f}) s")
    kills = completed = 0
    # Most kill moments land mid-pull; a pull faster than the measured one escapes its
    # kill. Six tries per kill: even if only a third landed, too few kills would be a
    # one-in-a-million draw.
    for attempt in range(KILLS * 6):
        if kills >= KILLS:
            break
        node = _start_node(forks, f"node-{attempt}", puller_config, holder_id)
        client = forks.run(
            f"pull-{attempt}", "pull", "big:v1", "--json", "--config", str(puller_config)
        )
        time.sleep(rng.uniform(0, window))
        pulled = client.poll() == 0
        node.kill()
        if pulled:
            completed += 1
        else:
            kills += 1
        client.wait(timeout=30)
        names = _check_store(forks, str(attempt), puller_config)
        if pulled:
            assert names == {"big:v1"}
            assert _blob(puller_config, model_blob).read_bytes() == gguf.read_bytes()
            _reset(puller_config)  # so the next kills land in a pull again
    assert kills >= KILLS, f"only {kills} kills landed mid-pull in {KILLS * 6} attempts"
    # The last attempt was killed mid-pull (or reset): the pull still completes.
    node = _start_node(forks, "node-last", puller_config, holder_id)
    client = forks.run("pull-last", "pull", "big:v1", "--json", "--config", str(puller_config))
    assert client.wait(timeout=120) == 0, client.output()
    assert json.loads(client.output())["status"] == "success"
    node.kill()
    holder.kill()
    assert "all good" in dmm(puller_config, "verify").stdout
    assert _blob(puller_config, model_blob).read_bytes() == gguf.read_bytes()
    print(f"{kills} kills mid-pull, {completed} pulls finished before their kill moment")
