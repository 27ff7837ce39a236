"""ris.ray_cluster: joining or starting the cluster, fitting the run to it, noticing when it cannot go on.

No cluster is needed for most cases here (tests/test_ray_engine.py runs the engine on one): a
cluster that is not there, the resource plan, and the reason a run would wait for ever; joining a
cluster with or without Ray's token authentication starts a one-node cluster.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from raycluster import HOST, REPO
from ris.errors import RisError
from ris.testing import make_tiny_dataset

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
FAST = ["--model", "mobilenet_v2", "--weights", "none", "--resize", "32", "--no-progress"]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, reason", [(None, "nothing listens"), ("no-such-host.invalid:6379", "unknown host")])
def test_a_cluster_that_is_not_there_fails_in_seconds_in_one_line(tmp_path, address, reason):
    """Ray's own connection retries took ~14 minutes to give up on a cluster that is down, holding
    the database's writer lock and printing ~40 warnings. A fresh process, as a user runs it; the
    timeout only keeps a regression from hanging the suite."""
    address = address or f"{HOST}:{_closed_port()}"
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    db = tmp_path / "f.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
                           "--features-db", str(db), "--engine", "ray", "--ray-address", address, *FAST],
                          env=env, capture_output=True, text=True, timeout=240)
    err = done.stderr.strip()
    assert done.returncode == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and address in err and reason in err, err[-2000:]
    assert not db.exists() and not (tmp_path / "f.h5.lock").exists()


def test_an_address_that_is_not_host_and_port_is_refused():
    from ris.ray_cluster import probe

    with pytest.raises(RisError, match="HOST:PORT"):
        probe("headnode")
    with pytest.raises(RisError, match="nothing listens"):
        probe(f"ray://{HOST}:{_closed_port()}")  # a Ray Client address is probed the same way


def test_actors_leave_cpus_for_decoding_and_take_one_gpu_each():
    from ris.ray_cluster import RayOptions, actor_resources

    assert actor_resources(RayOptions(), cpus=2, gpus=0) == (1, {"num_cpus": 1.0})
    assert actor_resources(RayOptions(actors=2), cpus=2, gpus=0) == (2, {"num_cpus": 0.5})
    n, res = actor_resources(RayOptions(), cpus=64, gpus=8)
    assert n == 8 and res["num_gpus"] == 1 and res["num_cpus"] == 1.0
    assert actor_resources(RayOptions(actors=1, actor_cpus=0.25), cpus=2, gpus=0) == (1, {"num_cpus": 0.25})


def test_decoding_asks_for_what_the_actors_leave_on_a_one_cpu_cluster():
    """One CPU: the actor held half of it and every decode task asked for a whole one, so none ever
    ran and the run waited for ever."""
    from ris.ray_cluster import RayOptions, plan_resources

    n, actor, decode = plan_resources(RayOptions(), cpus=1, gpus=0)
    assert n == 1 and 0 < decode and actor["num_cpus"] + decode <= 1
    assert plan_resources(RayOptions(), cpus=2, gpus=0)[2] == 1.0  # where a whole CPU is left, unchanged
    assert plan_resources(RayOptions(decode_cpus=0.5), cpus=8, gpus=0)[2] == 0.5


def test_actors_that_leave_no_cpu_for_decoding_are_refused():
    from ris.ray_cluster import RayOptions, plan_resources

    with pytest.raises(RisError, match="no CPU .*decod"):
        plan_resources(RayOptions(actors=2, actor_cpus=1.0), cpus=2, gpus=0)


def test_a_cluster_left_without_room_for_decoding_or_actors_is_named():
    """After a node leaves, the actors restart on what is left; where they hold every CPU, or where
    no GPU is left for them, nothing can run again: the reason, not a silent wait."""
    from ris.ray_cluster import starved

    assert starved([1.0, 1.0], 0, actors=1, per_actor={"num_cpus": 1.0}, decode_cpus=1.0) is None
    why = starved([1.0], 0, actors=1, per_actor={"num_cpus": 1.0}, decode_cpus=1.0)
    assert why and "1 CPU" in why and "decod" in why
    gpu = starved([8.0], 0, actors=2, per_actor={"num_gpus": 1, "num_cpus": 1.0}, decode_cpus=1.0)
    assert gpu and "GPU" in gpu
    assert starved([], 0, actors=1, per_actor={"num_cpus": 0.5}, decode_cpus=0.5)  # no node at all


class _NeverReady:
    """A stand-in for the ray module whose result never comes back."""

    class exceptions:
        RayError = RuntimeError

    @staticmethod
    def wait(refs, timeout):
        import time

        time.sleep(timeout)
        return [], refs


def test_a_wait_the_cluster_can_never_end_stops_with_the_reason():
    """A node left, the restarted actors hold every CPU, no decode task is placed again: the wait
    for the next batch went on for ever."""
    from ris.ray_cluster import get

    with pytest.raises(RisError, match="nothing came back for .* s: no room for decoding"):
        get(_NeverReady, object(), poll_s=0.01, stall_s=0.2, why_stuck=lambda: "no room for decoding")


def test_a_slow_batch_on_a_cluster_that_can_run_it_is_waited_for():
    import threading

    from ris.ray_cluster import get

    class Later(_NeverReady):
        done = threading.Event()

        @staticmethod
        def wait(refs, timeout):
            return (refs, []) if Later.done.wait(timeout) else ([], refs)

        @staticmethod
        def get(ref):
            return "batch"

    threading.Timer(0.5, Later.done.set).start()
    assert get(Later, object(), poll_s=0.01, stall_s=0.1, why_stuck=lambda: None) == "batch"


# --- a cluster with Ray's token authentication -------------------------------------------------

TOKEN = "0123456789abcdef0123456789abcdef"


def _extract_on(address: str, tmp_path, name: str, **env_extra: str) -> subprocess.CompletedProcess:
    """ris-extract --engine ray --ray-address ``address`` in a fresh process, as a user runs it:
    no Ray settings but ``env_extra``, and a home of its own (no ~/.ray/auth_token but one put there)."""
    data = tmp_path / "d"
    if not data.exists():
        make_tiny_dataset(data, n_objects=2, views=2, size=48)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), HOME=str(tmp_path / "home"),
               RAY_USAGE_STATS_ENABLED="0", **env_extra)
    return subprocess.run([sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
                           "--features-db", str(tmp_path / name), "--engine", "ray", "--ray-address", address,
                           "--json", *FAST], env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def token_cluster():
    from raycluster import running_cluster

    with running_cluster(nodes=1, auth={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}) as c:
        yield c


@pytest.mark.slow
def test_a_cluster_with_token_auth_is_joined_with_this_machines_token(token_cluster, tmp_path):
    """`ray start --head` turns Ray's token auth on whenever ~/.ray/auth_token exists (a local
    `ray.init`, such as `ris-extract --engine ray` without an address, writes one), but a driver
    given HOST:PORT joined without the token: 20 s of retries, ~20 C++ warnings, then
    'ConnectionError: Failed to connect to Ray cluster', which did not say why."""
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text(TOKEN)
    done = _extract_on(token_cluster.address, tmp_path, "f.h5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["extracted"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("token, reason", [(None, "no token"), ("f" * 32, "refused this machine's token")])
def test_a_cluster_whose_token_this_machine_lacks_is_one_line(token_cluster, tmp_path, token, reason):
    env = {"RAY_AUTH_TOKEN": token} if token else {}
    done = _extract_on(token_cluster.address, tmp_path, "f.h5", **env)
    err = done.stderr.strip()
    assert done.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1 and token_cluster.address in err and reason in err, err[-3000:]
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.lock").exists()


@pytest.mark.slow
def test_a_cluster_without_auth_is_joined_without_a_token_this_machine_has(tmp_path):
    """A token here (RAY_AUTH_MODE=token, or 'auto' with ~/.ray/auth_token) against a cluster without
    auth connected, but every actor died before it ran ('ActorDiedError: The actor never ran')."""
    from raycluster import running_cluster

    with running_cluster(nodes=1) as c:
        done = _extract_on(c.address, tmp_path, "f.h5", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["extracted"] == 4


@pytest.mark.slow
def test_a_port_where_no_ray_cluster_answers_is_one_line(tmp_path):
    """A port that takes connections but is not a Ray head's (another service, a mistyped port):
    Ray's own retries went on for minutes, printing warnings, with the writer lock held."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()  # connections complete, nothing ever answers
        address = f"{HOST}:{server.getsockname()[1]}"
        done = _extract_on(address, tmp_path, "f.h5")
    err = done.stderr.strip()
    assert done.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1 and address in err and "no Ray cluster answered" in err, err[-3000:]
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.lock").exists()


def test_joining_that_fails_leaves_this_process_auth_mode_as_it_was(monkeypatch):
    """The auth mode set to ask the cluster must not outlive a failed join: a later local cluster of
    the same process would start without Ray's token authentication."""
    import ray._raylet

    from ris.ray_cluster import match_auth

    def not_ray(address, cluster_id=None):
        raise RuntimeError("Timed out while waiting for GCS to become available.")

    monkeypatch.setattr(ray._raylet, "GcsClient", not_ray)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(RisError, match="no Ray cluster answered"):
        match_auth(f"{HOST}:1", shown=f"{HOST}:1")
    assert "RAY_AUTH_MODE" not in os.environ
