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
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ris.cli.common import one_line
from ris.errors import Interrupted, RisError
from ris.extract import DEFAULT_BATCH, ExtractSummary
from ris.extractor import ExtractConfig
from ris.jpeg_noise import phrased
from ris.ray_cluster import (RayOptions, cluster_now, connect, disconnect, get, node_name, plan_resources, reason,
                             runtime_env, starved)

__all__ = ["RayOptions", "RaySummary", "RunState", "extract_on_ray"]


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

    def embed(self, decoded: tuple) -> tuple:
        """(features of the decoded images, the decode errors, the digests of the bytes decoded, the
        paths the node could not see, libjpeg's lines by path, the decoding node, its id, its
        seconds, this pid, these seconds): the timings tell a decode-bound run from a network-bound one."""
        t0 = time.perf_counter()
        images, errors, digests, unseen, found, node, node_id, decode_s = decoded
        if len(images):
            feats = self.extractor.embed_async(images, pad_to=self.batch_size)()
        else:
            feats = np.zeros((0, *self.extractor.output_shape), np.float32)
        return feats, errors, digests, unseen, found, node, node_id, decode_s, os.getpid(), time.perf_counter() - t0


def _decode(root: str, rel_paths: list[str], size: int, aspect: str = "squash") -> tuple:
    """A decode task: the local engine's chunk decoder (images, errors, digests of the bytes decoded:
    each file is read once, on its node), plus the paths this node could not see, libjpeg's lines
    by path (for the driver to name, as the local engine does), the node (as a user finds it, and
    its id) and the task's seconds."""
    import cv2
    import ray

    cv2.setNumThreads(1)  # parallelism comes from the tasks
    if not os.path.isdir(root):  # else every image would be listed as damaged, and never retried
        raise RisError(f"{root}: the dataset folder is not there on {node_name()}; every node "
                       f"must see it at the same path (a shared file system)")
    images, errors, digests, unseen, seconds, found = _decode_here(root, rel_paths, size, aspect)
    return images, errors, digests, unseen, found, node_name(), ray.get_runtime_context().get_node_id(), seconds


def _decode_here(root: str, rel_paths: list[str], size: int, aspect: str = "squash") -> tuple:
    """(images, error or None per path, digest per path, the failed paths that are not there at
    all, seconds, {path: libjpeg's lines}: caught here, not left unnamed in the worker's log)."""
    from ris.decoding import _decode_chunk_named

    t0 = time.perf_counter()
    images, errors, digests, found = _decode_chunk_named(root, rel_paths, size, aspect)
    unseen = [rel for rel, err in zip(rel_paths, errors)
              if err is not None and not os.path.lexists(os.path.join(root, rel))]
    return images, errors, digests, unseen, time.perf_counter() - t0, found


def refuse_unseen(unseen: list[str], root: Path, node: str) -> None:
    """Stop the run where a node could not see a file this machine sees: it is not damaged, and
    recorded as failed it would never be retried. One gone here too was deleted during the run:
    listed as failed, as the local engine lists it."""
    for rel in unseen:
        if os.path.lexists(root / rel):
            raise RisError(f"{root / rel}: {node} cannot see this file, which this machine sees; every node must "
                           "see the dataset folder at the same path (a shared file system)")


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
    lock=None,
) -> RaySummary:
    """``extract_features`` with decoding and the network on a Ray cluster; same database, same resume.

    Connects to ``options.address`` (or starts a local cluster, stopped at the end) unless Ray is
    already initialised in this process, in which case that connection is used and kept. Ray
    prints its notices (a dead worker, ...) on the driver's stdout, where ``--json`` writes: while
    this runs they go to stderr. ``lock``: the writer lock, held already (``--sync``'s, lent).
    """
    with contextlib.redirect_stdout(sys.stderr):
        return _extract(dataset, features_db, config, labels, batch_size, append, overwrite, progress, log,
                        options, on_commit, lock)


def _extract(dataset, features_db, config, labels, batch_size, append, overwrite, progress, log, options,
             on_commit, lock=None) -> RaySummary:
    from ris.extract import (_finite_rows, _progress, _raise_interrupt, finish_run, refuse_another_recipe,
                             skipped_before, still_to_do)
    from ris.featuredb import partial_path
    from ris.filestamp import file_stamps
    from ris.featurewriter import FeatureWriter
    from ris.run_input import list_input
    from ris.sidecars import WriterLock

    try:
        import ray
    except ImportError:
        raise RisError("--engine ray needs Ray: pip install 'ris[ray]'") from None
    options = options or RayOptions()
    features_db = Path(features_db)
    run = list_input(dataset, labels, features_db, append, overwrite)
    for line in [*run.warnings(), *([run.label_note] if run.label_note else [])]:
        log(line)
    root, files, label_of = run.root, run.files, run.label_of
    features_db.parent.mkdir(parents=True, exist_ok=True)
    lock = lock or WriterLock(features_db).acquire()  # before the slow cluster start and model builds
    started = False
    # SIGTERM is a Ctrl-C from here on, also while Ray starts (ray.init sets its own handler, whose
    # SystemExit ended the command as 'ray: SystemExit: 1', exit 2)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        refuse_another_recipe(features_db, config, append, overwrite)  # before the cluster and the models start
        started = connect(options)
        if main:
            signal.signal(signal.SIGTERM, _raise_interrupt)
        res = ray.cluster_resources()
        n_actors, per_actor, decode_cpus = plan_resources(options, float(res.get("CPU", 0)), float(res.get("GPU", 0)))

        def why_stuck() -> str | None:
            return starved(*cluster_now(), actors=n_actors, per_actor=per_actor, decode_cpus=decode_cpus)

        # SPREAD: decoding uses every node's CPUs and reads, also those of a node that joins mid-run
        decode = ray.remote(_decode).options(num_cpus=decode_cpus, runtime_env=runtime_env(), max_retries=5,
                                             scheduling_strategy="SPREAD")
        # start the decode workers (and their imports) while the actors build their models
        warm = [decode.remote(str(root.resolve()), [], 32) for _ in range(max(1, int(res.get("CPU", 1))))]
        actors, info, actor_pids = _start_actors(config, batch_size, options, n_actors, per_actor, log, why_stuck)
        for ref in warm:  # a worker's error (no dataset folder there) as its one line, not Ray's traceback
            get(ray, ref, stall_s=options.stall_s, why_stuck=why_stuck)
        attrs = dict(info["attrs"], dataset_root=os.path.abspath(root), labels_mode=run.label_mode)
        writer = FeatureWriter(features_db, attrs, info["shape"], run.label_names, append=append,
                               overwrite=overwrite, lock=lock, log=log, progress=progress)
    except BaseException as exc:
        lock.release()
        disconnect(started)  # (a start cut short was shut down by connect itself)
        if main:
            signal.signal(signal.SIGTERM, previous)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise Interrupted("interrupted while the Ray cluster started; nothing was written") from None
        if isinstance(exc, RisError):
            raise
        raise RisError(f"ray: {reason(exc)}") from None
    todo = still_to_do(writer, files, features_db, log)
    summary = RaySummary(str(features_db), len(files), 0, writer.resumed_rows, feature_shape=info["shape"],
                         actors=len(actors), other_files=run.other_files, hidden_files=run.hidden_files,
                         skipped_before=skipped_before(writer, files), unlisted_folders=list(run.unlisted or {}))
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    window = options.in_flight or 2 * len(actors) + max(1, int(ray.cluster_resources().get("CPU", 1)))
    root_abs = str(root.resolve())
    bar = _progress(len(todo), progress)
    t0 = time.perf_counter()
    pending: deque[tuple[list[str], int, Any, Any]] = deque()  # (paths, actor, result ref, stamps), input order
    load = [0] * len(actors)
    committed = 0

    def submit(paths: list[str]) -> None:
        a = min(range(len(actors)), key=load.__getitem__)  # the least busy actor
        load[a] += 1
        stamps = file_stamps(root, paths)  # before the nodes read them; digests come from what they read
        pending.append((paths, a, actors[a].embed.remote(decode.remote(root_abs, paths, info["max_size"], info["aspect"])),
                        stamps))

    try:
        k = 0
        while k < len(chunks) or pending:
            while k < len(chunks) and len(pending) < window:
                submit(chunks[k])
                k += 1
            paths, a, ref, stamps = pending.popleft()
            feats, errors, digests, unseen, found, node, node_id, decode_s, pid, embed_s = get(
                ray, ref, stall_s=options.stall_s, why_stuck=why_stuck)
            refuse_unseen(unseen, root, node)
            summary.decode_seconds += decode_s
            summary.embed_seconds += embed_s
            load[a] -= 1
            if pid != actor_pids[a]:
                summary.actor_restarts += 1
                bar.write(f"ray: embedding actor {a} restarted (pid {actor_pids[a]} -> {pid}); "
                          f"its batches were retried", file=sys.stderr)
                actor_pids[a] = pid
            for p in paths:  # libjpeg's lines the node caught, said as the local engine says them
                for warning in phrased(found.get(p, [])):
                    bar.write(f"warning: {one_line(str(root / p))}: {warning}", file=sys.stderr)
            failures = [(p, _as_given(e, root_abs, root, p)) for p, e in zip(paths, errors) if e is not None]
            for _, err in failures:
                bar.write(f"skipped: {one_line(err)}", file=sys.stderr)
            stamp_of = {p: (s, d) for p, s, d in zip(paths, stamps, digests)}
            ids, feats, not_finite = _finite_rows([p for p, e in zip(paths, errors) if e is None], feats, root)
            for _, err in not_finite:  # said and counted, not recorded: the next run tries them again
                bar.write(f"skipped: {one_line(err)}", file=sys.stderr)
            writer.add(ids, feats, [label_of[i] for i in ids], *zip(*(stamp_of[i] for i in ids)))
            writer.add_failures(failures)
            summary.extracted += len(ids)
            summary.skipped.extend(failures + not_finite)
            summary.nodes[node_id[:12]] = summary.nodes.get(node_id[:12], 0) + len(paths)
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
        disconnect(started, in_flight=[ref for _, _, ref, _ in pending])
        kept = f"run the same command again to resume (partial data kept in {partial_path(features_db)})"
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {rows} images; {kept}") from None
        if isinstance(exc, SystemExit):
            raise Interrupted(f"interrupted after {rows} images; {kept}") from None
        why = str(exc) if isinstance(exc, RisError) else f"ray: {reason(exc)}"
        raise RisError(f"{why}; {rows} images were committed, {kept}") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    summary.seconds = time.perf_counter() - t0  # the run's own time: the cluster's shutdown is not in its img/s
    bar.close()
    disconnect(started)
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


# --- the actors ----------------------------------------------------------------------------

def _start_actors(config: ExtractConfig, batch_size: int, options: RayOptions, n: int, resources: dict[str, float],
                  log: Callable[[str], None], why_stuck: Callable[[], str | None]):
    """Start ``n`` embedding actors; (actors, what actor 0 says its features are, their pids).

    Every actor must make its features the same way (same fingerprint): a node with other library
    versions or weights would mix incomparable rows into one database.
    """
    import ray

    from ris.featuredb import fingerprint

    cls = ray.remote(_Embedder).options(max_restarts=options.max_restarts, max_task_retries=-1,
                                        runtime_env=runtime_env(), scheduling_strategy="SPREAD", **resources)
    actors = [cls.remote(config, batch_size) for _ in range(n)]
    refs = [a.describe.remote() for a in actors]
    if len(ray.wait(refs, num_returns=len(refs), timeout=120)[0]) < len(refs):
        log(f"ray: still waiting for the cluster to start {n} embedding actor(s) ({resources} each)")
    infos = [get(ray, r, what="starting the embedding actors", stall_s=options.stall_s, why_stuck=why_stuck)
             for r in refs]
    first = fingerprint(infos[0]["attrs"])
    for i, other in enumerate(infos[1:], 1):
        if fingerprint(other["attrs"]) != first or other["shape"] != infos[0]["shape"]:
            raise RisError(f"ray: embedding actor {i} makes features differently from actor 0 "
                           f"({fingerprint(other['attrs'])} vs {first}); install the same ris and weights on "
                           f"every node")
    return actors, infos[0], [i["pid"] for i in infos]
