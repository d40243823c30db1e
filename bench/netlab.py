"""A small shaped LAN in network namespaces, for benchmarks that need real separate hosts.

``Lab(hosts, rate)`` makes one namespace per host and one "switch" namespace holding a
bridge; each host is joined to the bridge by a veth pair whose both ends are shaped with
``tc tbf`` to ``rate`` (so ``rate`` is the host's upload and its download). Host ``i`` is
``10.77.0.<i+1>``. Nothing touches the machine's own namespace: every interface, address
and route lives in namespaces the lab creates and deletes. Needs root and iproute2.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SUBNET = "10.77.0"
BRIDGE = "br0"


class LabError(RuntimeError):
    """The lab could not be built; the message says what to fix."""


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


class Lab:
    def __init__(self, hosts: int, rate: str) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be in 1..200")
        self.hosts = hosts
        self.rate = rate
        # Unique per process, so concurrent labs (a test and a benchmark) never collide.
        self.tag = f"{os.getpid() % 100000:05d}"
        self.switch = f"dmmlab{self.tag}-sw"
        self.processes: list[subprocess.Popen[bytes]] = []

    def ns(self, host: int) -> str:
        return f"dmmlab{self.tag}-h{host}"

    def ip(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def _veth(self, host: int) -> tuple[str, str]:
        # Interface names are at most 15 characters.
        return f"l{self.tag}h{host}a", f"l{self.tag}h{host}b"

    # --- building ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("network namespaces need root (run as root, or skip this benchmark)")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        self._in(self.switch, "ip", "link", "add", BRIDGE, "type", "bridge")
        self._in(self.switch, "ip", "link", "set", BRIDGE, "up")
        for host in range(self.hosts):
            ns = self.ns(host)
            inner, outer = self._veth(host)
            _run(["ip", "netns", "add", ns])
            _run(
                ["ip", "link", "add", inner, "netns", ns, "type", "veth",
                 "peer", "name", outer, "netns", self.switch]
            )  # fmt: skip
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(ns, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", inner)
            self._in(ns, "ip", "link", "set", inner, "up")
            self._in(self.switch, "ip", "link", "set", outer, "master", BRIDGE)
            self._in(self.switch, "ip", "link", "set", outer, "up")
            # Both directions shaped: the host's egress is its upload, the switch port's
            # egress towards it is its download.
            for where, dev in ((ns, inner), (self.switch, outer)):
                self._in(where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", self.rate, "burst", "64kb", "latency", "100ms")  # fmt: skip

    def _in(self, ns: str, *argv: str) -> str:
        return _run(["ip", "netns", "exec", ns, *argv])

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        for ns in [*(self.ns(h) for h in range(self.hosts)), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    # --- using -------------------------------------------------------------------------

    def run(self, host: int, argv: Sequence[str], *, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ``argv`` on ``host`` to completion."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(host), *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )

    def start(self, host: int, argv: Sequence[str], *, cwd: Path | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``argv`` on ``host`` in the background; stopped by ``close``."""
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.processes.append(process)
        return process

    def tx_bytes(self, host: int) -> int:
        """Bytes the host has sent on its link (every header included)."""
        inner, _ = self._veth(host)
        return int(self._in(self.ns(host), "cat", f"/sys/class/net/{inner}/statistics/tx_bytes"))
