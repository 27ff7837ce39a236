"""The Ray cluster of ``ris-extract --engine ray``: joining or starting it, fitting a run to it,
waiting on it, and saying in one line why it cannot go on.

Why a module of its own: what the engine does with the cluster (``ris.ray_engine``) is the same
whatever the cluster is; what can go wrong with the cluster itself (down, unreachable, shrunk
below what the run needs, a remote error wrapped in Ray's traceback) is handled here, once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ris.errors import RisError

ENV_FOR_WORKERS = ("KERAS_BACKEND", "RIS_MAX_FILE_BYTES", "RIS_DECODE_BUDGET")
PROBE_TIMEOUT_S = 5.0


@dataclass
class RayOptions:
    """How the run uses the cluster. Defaults fit any cluster; tests and benchmarks pin them."""

    address: str | None = None  # None: start a local cluster; 'auto' or 'HOST:PORT': join one
    actors: int | None = None  # embedding actors; None: one per GPU, or 1 on a CPU-only cluster
    actor_cpus: float | None = None  # logical CPUs each actor holds; None: see actor_resources
    decode_cpus: float = 1.0  # logical CPUs per decode task (single-threaded); less where the actors leave less
    in_flight: int | None = None  # chunks decoded or embedded ahead of the writer; None: 2 per actor + CPUs
    max_restarts: int = 4  # restarts of each actor (a killed worker process) before the run fails
    num_cpus: int | None = None  # a local cluster's CPUs (None: all); ignored when joining one
    stall_s: float = 60.0  # no batch back for this long and the cluster cannot run the work: stop, say why


# --- joining ---------------------------------------------------------------------------------

def connect(options: RayOptions) -> bool:
    """Join or start the cluster; True when this call initialised Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a local cluster
    kwargs: dict[str, Any] = {"log_to_driver": bool(os.environ.get("RIS_VERBOSE")),
                              "logging_level": logging.WARNING}
    address = options.address
    if address in (None, "", "local"):
        # 127.0.0.2, not 127.0.0.1: Ray replaces 127.0.0.1 by the machine's interface address
        # (macOS has only 127.0.0.1 on lo0). Token auth is Ray's default for a new local cluster;
        # Ray switches itself to it (setting RAY_AUTH_MODE here, after Ray was imported, made driver
        # and cluster disagree). Its notice that it did so is not the user's business:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            print("ray: RAY_AUTH_MODE=disabled: the local cluster's ports (Ray listens on every interface) take "
                  "tasks from anyone who reaches them", file=sys.stderr)
        kwargs.update(address="local", include_dashboard=False, num_cpus=options.num_cpus,
                      _node_ip_address="127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1")
    else:
        found = _auto_address() if address == "auto" else address
        if found:  # 'auto' with no cluster on record: ray.init says so at once
            probe(found, shown=address)
            if not found.startswith("ray://"):  # (a Ray Client server authenticates on its own)
                match_auth(found, shown=address)
        kwargs["address"] = address
        host = (found or "").removeprefix("ray://").rsplit(":", 1)[0]
        if host.startswith("127."):  # a loopback cluster: this driver must be on loopback too
            kwargs["_node_ip_address"] = host
    try:
        ray.init(**kwargs)
    except BaseException as exc:
        ray.shutdown()  # what a start cut short (SIGTERM, Ctrl-C) had started goes with it
        _restore_auth()
        if not isinstance(exc, Exception):
            raise
        where = "start a local Ray cluster" if kwargs["address"] == "local" else f"join the Ray cluster at {address}"
        raise RisError(f"cannot {where}: {reason(exc)}") from None
    return True


def _auto_address() -> str | None:
    """The address 'auto' stands for (RAY_ADDRESS, or the cluster 'ray start' recorded here)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto") or None
    except Exception:  # no cluster on record: ray.init says so
        return None


def probe(address: str, shown: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds where Ray would retry for minutes: the cluster's port must take a connection.

    A cluster that is down cost ~14 minutes of Ray's own retries (and ~40 warnings) before this,
    with the database's writer lock held all the while.
    """
    shown = shown if shown and shown != address else address
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise RisError(f"--ray-address {shown}: not 'auto' or HOST:PORT (the head node's GCS port, 6379 by default)")
    where = f"cannot join the Ray cluster at {shown}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except socket.gaierror as exc:
        raise RisError(f"{where}: {host}: unknown host ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise RisError(f"{where}: nothing listens at {host}:{port} (connection refused); is the cluster up? "
                       "('ray status' on its head node)") from None
    except TimeoutError:
        raise RisError(f"{where}: {host}:{port} did not answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise RisError(f"{where}: {host}:{port}: {exc.strerror or exc}") from None


AUTH_MODE = "RAY_AUTH_MODE"
_saved_auth: list[str | None] = []  # RAY_AUTH_MODE as it was before match_auth set it


def match_auth(address: str, shown: str) -> None:
    """Join the cluster at ``address`` the way it authenticates: with this machine's token where it
    asks for one, without where it does not; else one line saying what is missing.

    Why: driver and cluster must agree, and Ray's defaults make them disagree. `ray start --head`
    turns token auth on whenever ~/.ray/auth_token exists (a local ``ray.init`` writes one), yet a
    driver given HOST:PORT joined without it (20 s of retries, ~20 warnings, then 'Failed to
    connect', no reason given); and one with a token (RAY_AUTH_MODE=token, or 'auto' where a token
    exists) joined a cluster without auth, but its actors never ran ('ActorDiedError'). A GCS call
    without the token, answered in milliseconds, tells which the cluster is.
    """
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError

    where = f"cannot join the Ray cluster at {shown}"

    def refused() -> bool:
        with _without_lines(("Failed to get cluster ID from GCS", "Failed to connect to")):
            try:
                GcsClient(address=address, cluster_id=None)
            except AuthenticationError:
                return True
            except Exception as exc:  # what ray.init met too, after minutes more (a port that is not Ray's)
                raise RisError(f"{where}: no Ray cluster answered there ({reason(exc)}); is it the head node's "
                               "GCS port? ('ray status' on the head node)") from None
        return False

    try:
        _set_auth_mode("disabled")
        if not refused():
            return
        if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):  # (token mode without one aborts)
            raise RisError(f"{where}: it uses Ray's token authentication and this machine has no token: copy "
                           "~/.ray/auth_token from its head node here, or set RAY_AUTH_TOKEN")
        _set_auth_mode("token")
        if refused():
            raise RisError(f"{where}: it refused this machine's token ({_token_source()}); use its head node's "
                           "~/.ray/auth_token, or set RAY_AUTH_TOKEN to it")
    except BaseException:  # (Ctrl-C too) the mode set to ask does not outlive a join that failed
        _restore_auth()
        raise


def _token_source() -> str:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if os.environ.get(var):
            return var
    return "~/.ray/auth_token"


def _set_auth_mode(mode: str) -> None:
    """This process' Ray auth mode; Ray reads RAY_AUTH_MODE into its config when imported, and
    re-reads it so (as Ray itself does when it turns token auth on)."""
    from ray._raylet import Config

    if not _saved_auth:
        _saved_auth.append(os.environ.get(AUTH_MODE))
    os.environ[AUTH_MODE] = mode
    Config.initialize("")


def _restore_auth() -> None:
    """RAY_AUTH_MODE as it was before ``match_auth``: a later local cluster of this process is
    started as it would have been."""
    if not _saved_auth:
        return
    before = _saved_auth.pop()
    if before is None:
        os.environ.pop(AUTH_MODE, None)
    else:
        os.environ[AUTH_MODE] = before
    from ray._raylet import Config

    Config.initialize("")


def disconnect(started: bool, in_flight: list | None = None) -> None:
    """Leave the cluster (shut it down if this process started it). ``in_flight``: the refs of
    tasks a stopped run leaves, cancelled first; Ray's driver then logs 'Failed to push error to
    driver for task ...' from C++ for each task it could not report (seen after Ctrl-C): those
    lines, and only those, are dropped."""
    if not started and not in_flight:
        return
    import ray

    with _without_lines(NOISE):
        for ref in in_flight or []:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if in_flight:
            with contextlib.suppress(Exception):
                ray.wait(in_flight, num_returns=len(in_flight), timeout=2)
        if started:
            ray.shutdown()
            _restore_auth()


NOISE = ("Failed to push error to driver",)


@contextlib.contextmanager
def _without_lines(noise: tuple[str, ...]) -> Iterator[None]:
    """Run with file descriptor 2 (C++ code writes there) sent to a file, then pass on what was
    written except the lines that contain one of ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(True)
                    if not any(n in line for n in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def runtime_env() -> dict[str, Any] | None:
    """Settings the workers must share with the driver (backend, limits), passed explicitly:
    on a real cluster the workers do not inherit the driver's environment. None when there are
    none: then the cluster's already started workers take the tasks (a runtime_env has its own)."""
    env = {k: os.environ[k] for k in ENV_FOR_WORKERS if k in os.environ}
    return {"env_vars": env} if env else None


# --- fitting the run to the cluster ---------------------------------------------------------

def actor_resources(options: RayOptions, cpus: float, gpus: float) -> tuple[int, dict[str, float]]:
    """(actor count, resources per actor): one GPU each when there are GPUs; without, CPU actors
    that together hold at most half the CPUs, so decode tasks always have some."""
    if gpus >= 1:
        n = options.actors or int(gpus)
        return n, {"num_gpus": 1, "num_cpus": options.actor_cpus if options.actor_cpus is not None
                   else min(1.0, cpus / (2 * n))}
    n = options.actors or 1
    return n, {"num_cpus": options.actor_cpus if options.actor_cpus is not None else min(1.0, cpus / (2 * n))}


def plan_resources(options: RayOptions, cpus: float, gpus: float) -> tuple[int, dict[str, float], float]:
    """(actors, resources per actor, CPUs per decode task) for a cluster of ``cpus`` and ``gpus``.

    A decode task asks for at most what the actors leave: on a one-CPU cluster the actor held half
    and every decode task asked for a whole CPU, so none was ever placed.
    """
    n, per_actor = actor_resources(options, cpus, gpus)
    if n < 1:
        raise RisError(f"--ray-actors must be at least 1, not {n}")
    left = cpus - n * per_actor["num_cpus"]
    if left <= 1e-9:
        raise RisError(f"the Ray cluster has {cpus:g} CPU(s) and {n} embedding actor(s) of {per_actor['num_cpus']:g} "
                       f"CPU each hold them all: no CPU is left for decoding; use fewer --ray-actors or add nodes")
    return n, per_actor, min(options.decode_cpus, left)


def starved(node_cpus: list[float], gpus: float, actors: int, per_actor: dict[str, float],
            decode_cpus: float) -> str | None:
    """Why the cluster as it is now can never run the work (None: it can). ``node_cpus``: each
    alive node's CPUs. Checked only when nothing came back for a while: after a node leaves, the
    actors restart on what is left, and where they hold every CPU no decode task is placed again."""
    if not node_cpus:
        return "no node of the cluster is alive"
    need_gpus = actors * per_actor.get("num_gpus", 0)
    if need_gpus and gpus < need_gpus:
        return f"the cluster has {gpus:g} GPU(s) left for {actors} embedding actor(s) of one GPU each"
    held = actors * per_actor.get("num_cpus", 0)
    total = sum(node_cpus)
    if total - held < decode_cpus - 1e-9:
        return (f"the cluster has {total:g} CPU(s) left, the {actors} embedding actor(s) hold {held:g} and decoding "
                f"needs {decode_cpus:g} more")
    return None


def cluster_now() -> tuple[list[float], float]:
    """(CPUs of each alive node, GPUs of the alive nodes)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ([float(n.get("Resources", {}).get("CPU", 0)) for n in alive],
            sum(float(n.get("Resources", {}).get("GPU", 0)) for n in alive))


# --- waiting on it --------------------------------------------------------------------------

def get(ray, ref, what: str = "", poll_s: float = 0.5, stall_s: float | None = None,
        why_stuck: Callable[[], str | None] | None = None):
    """``ray.get`` that a Ctrl-C or SIGTERM can interrupt while it waits, whose failure is one line,
    and that stops with the reason when nothing came back for ``stall_s`` and ``why_stuck`` says
    the cluster cannot run the work any more (a wait that would never end)."""
    t0 = time.monotonic()
    checked = t0
    while not ray.wait([ref], timeout=poll_s)[0]:
        now = time.monotonic()
        if why_stuck is not None and stall_s is not None and now - t0 >= stall_s and now - checked >= min(5.0, stall_s):
            checked = now
            why = why_stuck()
            if why:
                raise RisError(f"ray: nothing came back for {now - t0:.0f} s: {why}; add nodes, or run again on what "
                               "is left (a run fits its actors and decode tasks to the cluster it finds)")
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise RisError(f"ray: {what + ': ' if what else ''}{reason(exc)}") from None


def reason(exc: BaseException) -> str:
    """One line for a Ray failure: the worker's own error when there is one, not Ray's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        if isinstance(cause, RisError):
            return str(cause)
        exc = cause
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def node_name() -> str:
    """This node as a user can find it: its address (several nodes may share a host name) and id."""
    import ray

    if not ray.is_initialized():  # called outside a worker: asking Ray would start a Ray instance here
        return f"node {socket.gethostname()}"
    ctx = ray.get_runtime_context()
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:
        ip = socket.gethostname()
    return f"node {ip} (id {ctx.get_node_id()[:12]})"
