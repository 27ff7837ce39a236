"""A real Ray cluster of node processes on this machine, for the tests (tests/test_ray_*.py).

Loopback only (127.0.0.2: Ray rewrites 127.0.0.1 to the interface address), free ports for
everything a node listens on, its own temp dir; each ``ray start`` and what it spawns is one process
group, stopped by killing the groups.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _node_args() -> list[str]:
    """Free ports for everything a node listens on, so this cluster never meets another one."""
    return ["--node-ip-address", HOST, "--num-cpus", "1", "--object-store-memory", str(150 << 20),
            "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
            "--disable-usage-stats"]


class Cluster:
    """Ray node processes started here; each `ray start` and what it spawns is one process group."""

    def __init__(self, temp_dir: str, auth: dict[str, str] | None = None):
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"{HOST}:{self.port}"
        # the workers import this checkout's ris, as the tests do
        # loopback only, on ports of its own: no token (a token would come from ~/.ray, shared state)
        # unless ``auth`` says otherwise (RAY_AUTH_MODE=token with its own RAY_AUTH_TOKEN)
        self.auth = auth or {"RAY_AUTH_MODE": "disabled"}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "3", **self.auth}
        self.groups: list[int] = []

    def start_node(self, head: bool = False) -> int:
        where = (["--head", "--port", str(self.port), "--include-dashboard", "false",
                  "--ray-client-server-port", str(_free_port())] if head else ["--address", self.address])
        proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *where, *_node_args(),
                                 "--temp-dir", self.temp_dir], env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        self.groups.append(proc.pid)  # the node's processes stay in the group of `ray start`
        return proc.pid

    def kill_group(self, pgid: int, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in self.groups:
                self.kill_group(pgid, sig)
            deadline = time.time() + 5
            while sig == signal.SIGTERM and time.time() < deadline and any(_alive(g) for g in self.groups):
                time.sleep(0.2)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def running_cluster(nodes: int = 2, auth: dict[str, str] | None = None):
    """A head and ``nodes - 1`` more nodes of one CPU each, stopped when the block ends; ``auth``:
    the RAY_AUTH_* settings of its nodes and of this process' drivers (default: no token)."""
    temp_dir = tempfile.mkdtemp(prefix="ris-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(temp_dir, auth)
    saved = {k: os.environ.get(k) for k in c.auth}
    os.environ.update(c.auth)  # before Ray is imported: the in-process drivers connect the same way
    try:
        pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
        c.start_node(head=True)
        for _ in range(nodes - 1):
            c.start_node()
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
