"""Feature extraction on a Ray cluster (``ris-extract --engine ray``): the same database, scaled out.

Why this shape: the product must not change when it scales, so only the compute moves. The driver
lists the files, holds the writer lock and is the database's one writer, exactly as in the local
engine (same resume unit, same row order, same attributes); Ray runs the work in between:

* decoding: one CPU task per chunk of ``batch_size`` images (``ris.extract._decode_chunk``), on any
  node; a task whose worker dies is retried by Ray, and a lost output is rebuilt from its lineage;
* the network: a pool of actors, each building its ``FeatureExtractor`` once (``num_gpus=1`` each
  when the cluster has GPUs); a killed actor is restarted and its call retried;
* the driver takes the chunks back in input order and commits each one once, as a batch of the
  local engine would be. A row is in the database once or not at all, whatever is retried; a
  killed driver resumes from the last committed chunk like a killed local run.

The dataset folder must be readable at the same path on every node (a shared file system).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ris.errors import Interrupted, RisError
from ris.extract import DEFAULT_BATCH, ExtractSummary
from ris.extractor import ExtractConfig

ENV_FOR_WORKERS = ("KERAS_BACKEND", "RIS_MAX_FILE_BYTES", "RIS_DECODE_BUDGET")


@dataclass
class RayOptions:
    """How the run uses the cluster. Defaults fit any cluster; tests and benchmarks pin them."""

    address: str | None = None  # None: start a local cluster; 'auto' or 'HOST:PORT': join one
    actors: int | None = None  # embedding actors; None: one per GPU, or 1 on a CPU-only cluster
    actor_cpus: float | None = None  # logical CPUs each actor holds; None: see _actor_resources
    decode_cpus: float = 1.0  # logical CPUs per decode task (a decode is single-threaded)
    in_flight: int | None = None  # chunks decoded or embedded ahead of the writer; None: 2 per actor + CPUs
    max_restarts: int = 4  # restarts of each actor (a killed worker process) before the run fails
    num_cpus: int | None = None  # a local cluster's CPUs (None: all); ignored when joining one


@dataclass
class RaySummary(ExtractSummary):
    engine: str = "ray"
    actors: int = 0
    actor_restarts: int = 0  # embedding worker processes replaced during the run (their batch was retried)
    decode_seconds: float = 0.0  # summed over the decode tasks whose chunks were committed
    embed_seconds: float = 0.0  # summed over the actors' calls: / (seconds * actors) = how busy they were
    nodes: dict[str, int] = field(default_factory=dict)  # images decoded per node id (first 12 hex digits)


@dataclass
class RunState:
    """What ``on_commit`` sees after each committed chunk (tests time their faults with it)."""

    rows: int  # rows in the database now
    committed_chunks: int
    actor_pids: list[int]  # the current worker process of each embedding actor
    nodes: dict[str, int]  # images decoded per node so far


class _Embedder:
    """One embedding actor: the extractor is built once, then called batch after batch."""

    def __init__(self, config: ExtractConfig, batch_size: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from ris.extractor import build_extractor

        self.extractor = build_extractor(config)
        self.batch_size = batch_size
        # the first call at a batch shape costs several steady ones (oneDNN primitives, XLA compile):
        # paid here, while the other actors and the decode workers start, not in the first batch
        size = self.extractor.max_size
        self.extractor.embed_async(np.zeros((batch_size, size, size, 3), np.uint8), pad_to=batch_size)()

    def describe(self) -> dict[str, Any]:
        return {"attrs": self.extractor.attrs(), "shape": tuple(self.extractor.output_shape),
                "max_size": int(self.extractor.max_size), "aspect": self.extractor.aspect, "pid": os.getpid()}

    def embed(self, decoded: tuple) -> tuple[np.ndarray, list[str | None], str, float, int, float]:
        """(features of the decoded images, the decode errors, the decoding node, its seconds, this pid,
        these seconds): the timings tell a decode-bound run from a network-bound one."""
        t0 = time.perf_counter()
        images, errors, node, decode_s = decoded
        if len(images):
            feats = self.extractor.embed_async(images, pad_to=self.batch_size)()
        else:
            feats = np.zeros((0, *self.extractor.output_shape), np.float32)
        return feats, errors, node, decode_s, os.getpid(), time.perf_counter() - t0


def _decode(root: str, rel_paths: list[str], size: int,
            aspect: str = "squash") -> tuple[np.ndarray | list[np.ndarray], list[str | None], str, float]:
    """A decode task: the local engine's chunk decoder, plus the node it ran on and its seconds."""
    import cv2
    import ray

    from ris.decoding import _decode_chunk

    cv2.setNumThreads(1)  # parallelism comes from the tasks
    if not os.path.isdir(root):  # else every image would be listed as damaged, and never retried
        raise RisError(f"{root}: the dataset folder is not there on node {socket.gethostname()}; every node "
                       f"must see it at the same path (a shared file system)")
    t0 = time.perf_counter()
    images, errors = _decode_chunk(root, rel_paths, size, aspect)
    return images, errors, ray.get_runtime_context().get_node_id(), time.perf_counter() - t0


def extract_on_ray(
    dataset: str | Path,
    features_db: str | Path,
    config: ExtractConfig,
    labels: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    append: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    options: RayOptions | None = None,
    on_commit: Callable[[RunState], None] | None = None,
) -> RaySummary:
    """``extract_features`` with decoding and the network on a Ray cluster; same database, same resume.

    Connects to ``options.address`` (or starts a local cluster, stopped at the end) unless Ray is
    already initialised in this process, in which case that connection is used and kept. Ray
    prints its notices (a dead worker, ...) on the driver's stdout, where ``--json`` writes: while
    this runs they go to stderr.
    """
    with contextlib.redirect_stdout(sys.stderr):
        return _extract(dataset, features_db, config, labels, batch_size, append, overwrite, progress, log,
                        options, on_commit)


def _extract(dataset, features_db, config, labels, batch_size, append, overwrite, progress, log, options,
             on_commit) -> RaySummary:
    from ris.extract import (_finite_rows, _progress, _raise_interrupt, finish_run, list_input, refuse_another_recipe,
                             still_to_do)
    from ris.featuredb import partial_path
    from ris.featurewriter import FeatureWriter
    from ris.sidecars import WriterLock

    try:
        import ray
    except ImportError:
        raise RisError("--engine ray needs Ray: pip install 'ris[ray]'") from None
    options = options or RayOptions()
    features_db = Path(features_db)
    run = list_input(dataset, labels, features_db, append, overwrite)
    root, files, label_of = run.root, run.files, run.label_of
    features_db.parent.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(features_db).acquire()  # before the slow cluster start and model builds
    started = False
    try:
        refuse_another_recipe(features_db, config, append, overwrite)  # before the cluster and the models start
        started = _connect(options)
        # SPREAD: decoding uses every node's CPUs and reads, also those of a node that joins mid-run
        decode = ray.remote(_decode).options(num_cpus=options.decode_cpus, runtime_env=_runtime_env(), max_retries=5,
                                             scheduling_strategy="SPREAD")
        # start the decode workers (and their imports) while the actors build their models
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        warm = [decode.remote(str(root.resolve()), [], 32) for _ in range(slots)]
        actors, info, actor_pids = _start_actors(config, batch_size, options, log)
        ray.get(warm)
        attrs = dict(info["attrs"], dataset_root=str(root.resolve()), labels_mode=run.label_mode)
        writer = FeatureWriter(features_db, attrs, info["shape"], run.label_names, append=append,
                               overwrite=overwrite, lock=lock, log=log, progress=progress)
    except BaseException as exc:
        lock.release()
        _disconnect(started)
        if isinstance(exc, (RisError, KeyboardInterrupt)):
            raise
        raise RisError(f"ray: {_reason(exc)}") from None
    todo = still_to_do(writer, files, features_db, log)
    summary = RaySummary(str(features_db), len(files), 0, writer.resumed_rows, feature_shape=info["shape"],
                         actors=len(actors), other_files=run.other_files, hidden_files=run.hidden_files)
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    window = options.in_flight or 2 * len(actors) + max(1, int(ray.cluster_resources().get("CPU", 1)))
    root_abs = str(root.resolve())
    bar = _progress(len(todo), progress)
    t0 = time.perf_counter()
    pending: deque[tuple[list[str], int, Any]] = deque()  # (paths, actor index, result ref), input order
    load = [0] * len(actors)
    committed = 0

    def submit(paths: list[str]) -> None:
        a = min(range(len(actors)), key=load.__getitem__)  # the least busy actor
        load[a] += 1
        pending.append((paths, a, actors[a].embed.remote(decode.remote(root_abs, paths, info["max_size"], info["aspect"]))))

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        k = 0
        while k < len(chunks) or pending:
            while k < len(chunks) and len(pending) < window:
                submit(chunks[k])
                k += 1
            paths, a, ref = pending.popleft()
            feats, errors, node, decode_s, pid, embed_s = _get(ray, ref)
            summary.decode_seconds += decode_s
            summary.embed_seconds += embed_s
            load[a] -= 1
            if pid != actor_pids[a]:
                summary.actor_restarts += 1
                bar.write(f"ray: embedding actor {a} restarted (pid {actor_pids[a]} -> {pid}); "
                          f"its batches were retried", file=sys.stderr)
                actor_pids[a] = pid
            failures = [(p, _as_given(e, root_abs, root, p)) for p, e in zip(paths, errors) if e is not None]
            for _, err in failures:
                bar.write(f"skipped: {err}", file=sys.stderr)
            ids, feats = _finite_rows([p for p, e in zip(paths, errors) if e is None], feats, failures)
            writer.add(ids, feats, [label_of[i] for i in ids])
            writer.add_failures(failures)
            summary.extracted += len(ids)
            summary.skipped.extend(failures)
            node = node[:12]
            summary.nodes[node] = summary.nodes.get(node, 0) + len(paths)
            committed += 1
            bar.update(len(paths))
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{summary.extracted / max(elapsed, 1e-9):.1f} img/s, {len(summary.skipped)} skipped")
            if on_commit is not None:
                on_commit(RunState(writer.rows, committed, list(actor_pids), dict(summary.nodes)))
    except BaseException as exc:
        bar.close()
        rows = writer.rows
        writer.close()
        _disconnect(started)
        kept = f"run the same command again to resume (partial data kept in {partial_path(features_db)})"
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {rows} images; {kept}") from None
        why = str(exc) if isinstance(exc, RisError) else f"ray: {_reason(exc)}"
        raise RisError(f"{why}; {rows} images were committed, {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    _disconnect(started)
    summary.seconds = time.perf_counter() - t0
    if summary.seconds > 0 and committed:
        log(f"ray: {len(actors)} embedding actor(s) busy {summary.embed_seconds / (summary.seconds * len(actors)):.0%} "
            f"of the run, decoding kept {summary.decode_seconds / summary.seconds:.1f} CPUs busy on average")
    finish_run(writer, run, summary, extract_engine="ray", ray_version=ray.__version__)
    return summary


def _as_given(reason: str, root_abs: str, root: Path, rel: str) -> str:
    """A worker's reason names the file by the absolute path it read; name it as the local engine
    does (the --dataset folder as given), so both engines list a damaged image alike."""
    read = str(Path(root_abs) / rel)
    return str(root / rel) + reason[len(read):] if reason.startswith(read) else reason


# --- the cluster ---------------------------------------------------------------------------

def _connect(options: RayOptions) -> bool:
    """Join or start the cluster; True when this call initialised Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a local cluster
    kwargs: dict[str, Any] = {"log_to_driver": bool(os.environ.get("RIS_VERBOSE")),
                              "logging_level": logging.WARNING}
    address = options.address
    if address in (None, "", "local"):
        # a one-machine cluster listens on loopback only. 127.0.0.2, not 127.0.0.1: Ray replaces
        # 127.0.0.1 by the machine's interface address (macOS has only 127.0.0.1 on lo0)
        # token auth is Ray's default for a new local cluster; Ray switches itself to it (setting
        # RAY_AUTH_MODE here, after Ray was imported, made driver and cluster disagree). Its notice
        # that it did so is not the user's business:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        kwargs.update(address="local", include_dashboard=False, num_cpus=options.num_cpus,
                      _node_ip_address="127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1")
    else:
        kwargs["address"] = address
        host = _loopback_host(address)
        if host:  # a loopback cluster: this driver must be on loopback too
            kwargs["_node_ip_address"] = host
    try:
        ray.init(**kwargs)
    except Exception as exc:
        where = "start a local Ray cluster" if kwargs["address"] == "local" else f"join the Ray cluster at {address}"
        raise RisError(f"cannot {where}: {_reason(exc)}") from None
    return True


def _loopback_host(address: str) -> str | None:
    """The cluster's host when it is a loopback address ('auto': the address Ray would find)."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # no cluster found: ray.init says so
            return None
    host = address.rsplit(":", 1)[0]
    return host if host.startswith("127.") else None


def _disconnect(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


def _runtime_env() -> dict[str, Any] | None:
    """Settings the workers must share with the driver (backend, limits), passed explicitly:
    on a real cluster the workers do not inherit the driver's environment. None when there are
    none: then the cluster's already started workers take the tasks (a runtime_env has its own)."""
    env = {k: os.environ[k] for k in ENV_FOR_WORKERS if k in os.environ}
    return {"env_vars": env} if env else None


def _actor_resources(options: RayOptions, cpus: float, gpus: float) -> tuple[int, dict[str, float]]:
    """(actor count, resources per actor): one GPU each when there are GPUs; without, CPU actors
    that together hold at most half the CPUs, so decode tasks always have some."""
    if gpus >= 1:
        n = options.actors or int(gpus)
        return n, {"num_gpus": 1, "num_cpus": options.actor_cpus if options.actor_cpus is not None
                   else min(1.0, cpus / (2 * n))}
    n = options.actors or 1
    return n, {"num_cpus": options.actor_cpus if options.actor_cpus is not None else min(1.0, cpus / (2 * n))}


def _start_actors(config: ExtractConfig, batch_size: int, options: RayOptions, log: Callable[[str], None]):
    """Start the embedding actors; (actors, what actor 0 says its features are, their pids).

    Every actor must make its features the same way (same fingerprint): a node with other library
    versions or weights would mix incomparable rows into one database.
    """
    import ray

    from ris.featuredb import fingerprint

    res = ray.cluster_resources()
    n, resources = _actor_resources(options, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    if n < 1:
        raise RisError(f"--ray-actors must be at least 1, not {n}")
    cls = ray.remote(_Embedder).options(max_restarts=options.max_restarts, max_task_retries=-1,
                                        runtime_env=_runtime_env(), scheduling_strategy="SPREAD", **resources)
    actors = [cls.remote(config, batch_size) for _ in range(n)]
    refs = [a.describe.remote() for a in actors]
    if len(ray.wait(refs, num_returns=len(refs), timeout=120)[0]) < len(refs):
        log(f"ray: still waiting for the cluster to start {n} embedding actor(s) ({resources} each)")
    infos = [_get(ray, r, what="starting the embedding actors") for r in refs]
    first = fingerprint(infos[0]["attrs"])
    for i, other in enumerate(infos[1:], 1):
        if fingerprint(other["attrs"]) != first or other["shape"] != infos[0]["shape"]:
            raise RisError(f"ray: embedding actor {i} makes features differently from actor 0 "
                           f"({fingerprint(other['attrs'])} vs {first}); install the same ris and weights on "
                           f"every node")
    return actors, infos[0], [i["pid"] for i in infos]


def _get(ray, ref, what: str = "", poll_s: float = 0.5):
    """``ray.get`` that a Ctrl-C or SIGTERM can interrupt while it waits."""
    while not ray.wait([ref], timeout=poll_s)[0]:
        pass
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise RisError(f"ray: {what + ': ' if what else ''}{_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """One line for a Ray failure: the worker's own error when there is one, not Ray's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        if isinstance(cause, RisError):
            return str(cause)
        exc = cause
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
