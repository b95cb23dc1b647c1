"""A private local Ray cluster for e2e tests: `ray start` processes with token auth, torn down by this test
only.

Other Ray clusters may run on the same machine (other test sessions, other users), so nothing here uses
`ray stop` (which stops every Ray on the machine) or a default port. Every node gets free ports, a temp
dir of its own, a temp HOME (the real ~/.ray is never touched) and a marker variable in its environment;
teardown kills the node process groups, then any process that still carries the marker (Ray workers and job
drivers live in process groups of their own), by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
MARKER = "MMFUSION_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    root: Path  # short path: Ray's unix sockets live under it (108-byte limit)
    token: str
    env: dict[str, str]  # what every node, job and client of this cluster runs with
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self, with_token: bool = True) -> dict[str, str]:
        """A user's shell: token auth on; the token only when asked for (and never the real ~/.ray)."""
        env = dict(self.env)
        env.pop(MARKER)
        env.pop("RAY_ADDRESS", None)
        if not with_token:
            env.pop("RAY_AUTH_TOKEN_PATH")
            env["HOME"] = str(self.root / "home-without-token")
        return env

    def _start(self, args: list[str], num_cpus: float, name: str) -> None:
        node_tmp = self.root / name
        node_tmp.mkdir()
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus:g}", "--object-store-memory=150000000", f"--temp-dir={node_tmp}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", *args]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start_head(self, num_cpus: float) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self._start(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"],
                    num_cpus, "head")
        headers = {"Authorization": f"Bearer {self.token}"}
        deadline = time.time() + 90
        while time.time() < deadline:
            self._check_alive()
            try:
                if requests.get(f"{self.dashboard_url}/api/version", headers=headers, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"the Ray head did not come up:\n{self.log_tail()}")
        self._wait_for_nodes()

    def add_worker(self, num_cpus: float) -> None:
        self._start([f"--address={self.gcs_address}"], num_cpus, f"worker{len(self.nodes)}")
        self._wait_for_nodes()

    def _wait_for_nodes(self, timeout_s: float = 90) -> None:
        """Until every node started here is ALIVE in the cluster's view."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._check_alive()
            if self.alive_nodes() >= len(self.nodes):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{len(self.nodes)} Ray nodes did not all join:\n{self.log_tail()}")

    def alive_nodes(self) -> int:
        r = requests.get(f"{self.dashboard_url}/nodes?view=summary",
                         headers={"Authorization": f"Bearer {self.token}"}, timeout=5)
        r.raise_for_status()
        return sum(n["raylet"]["state"] == "ALIVE" for n in r.json()["data"]["summary"])

    def _check_alive(self) -> None:
        for p in self.nodes:
            if p.poll() is not None:
                raise RuntimeError(f"a Ray node exited with {p.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """SIGKILL: a test cluster keeps no state worth a graceful stop (`ray start --block` takes ~30 s)."""
        for p in self.nodes:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for _ in range(40):  # workers and job drivers: matched by the marker in their environment
            left = marked_pids(self.env[MARKER])
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.25)
        shutil.rmtree(self.root, ignore_errors=True)


def marked_pids(value: str) -> list[int]:
    needle = f"{MARKER}={value}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def make_cluster() -> LocalRayCluster:
    """Token auth on, a fresh token in the cluster's own temp dir; no node started yet."""
    root = Path(tempfile.mkdtemp(prefix="mmf-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    home = root / "home"
    home.mkdir()
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # an activated venv: `mmfusion` and `ray` on PATH
        "RAY_USAGE_STATS_ENABLED": "0",
        MARKER: root.name,
    }
    return LocalRayCluster(root=root, token=token, env=env)

