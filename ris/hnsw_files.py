"""How a saved HNSW index lies on disk, so that it is always one consistent pair.

The metadata ``<vectors>.hnsw.json`` is the commit point: it names its graph,
``<vectors>.hnsw.<token>.graph``, a new file for every save. Why: the graph and the metadata were
once renamed into place one after the other under fixed names, so two processes saving the same
index at once (a ``--sync`` catching it up while a search did too) could leave one's graph beside
the other's metadata; the checksum then called the index damaged, and it was rebuilt or skipped.
Now a save writes its graph under a new name, then atomically replaces the metadata naming it;
whichever save commits last wins whole. A reader reads the metadata, then the graph it names,
and reads the metadata again when that graph was dropped meanwhile.

An index saved before (graph ``<vectors>.hnsw``, metadata naming no graph) still loads; its next
save writes the new layout and drops the old graph.

Cleanup: a writer holds a ``flock`` on its graph from creation until its metadata is committed.
After committing, a save drops every graph of the index that the metadata does not name and no
process holds (a killed save's, a superseded one's), deciding only once it holds the graph's lock
itself, so a graph about to be committed is never dropped. Readers take no lock.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import uuid
from typing import Callable

from ris import sidecars
from ris.errors import DatabaseError
from ris.sidecars import (atomic_write, create_locked, drop_unnamed, ensure_room, file_crc32, fsync_dir,
                          remove_stale_temps)

GRAPH_SUFFIX = ".graph"


def meta_path(path: str) -> str:
    """The metadata of the index ``path`` (``<vectors>.hnsw``): the commit point."""
    return path + ".json"


def is_saved(path: str) -> bool:
    """Whether an index is saved at ``path``: its metadata, or an old-layout graph without one."""
    return os.path.isfile(meta_path(path)) or os.path.isfile(path)


def read_meta(path: str) -> dict:
    try:
        with open(meta_path(path)) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"HNSW index {path}: cannot read its sidecar {meta_path(path)} ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatabaseError(f"HNSW index {path}: its sidecar {meta_path(path)} is not an HNSW index's")
    return meta


def graph_of(path: str, meta: dict) -> str:
    """The graph file ``meta`` names (an old-layout index's: ``path`` itself)."""
    name = meta.get("graph")
    if name is None:
        return path
    return os.path.join(os.path.dirname(path), os.path.basename(str(name)))


def load_pair(path: str, load: Callable[[dict, str], object], attempts: int = 5):
    """``load(meta, graph)`` for the metadata and the graph it names; when that fails because a
    save committed another graph meanwhile (and dropped this one), read the metadata again."""
    for attempt in range(attempts):
        meta = read_meta(path)
        graph = graph_of(path, meta)
        try:
            return load(meta, graph)
        except (DatabaseError, RuntimeError, OSError) as exc:
            if attempt + 1 == attempts or os.path.isfile(graph) or _named(path) == graph:
                if isinstance(exc, OSError):  # damaged, or missing with no newer save to read instead
                    raise DatabaseError(f"HNSW index {path}: cannot read its graph {graph} ({exc})") from exc
                raise
    raise AssertionError("unreachable")


def _named(path: str) -> str | None:
    try:
        return graph_of(path, read_meta(path))
    except DatabaseError:
        return None


def save_pair(path: str, write_graph: Callable[[str], None], need: int, meta: dict) -> str:
    """Write a new graph (``write_graph(tmp)``, ``need`` bytes), then the metadata naming it
    (``meta`` plus the graph's name, size and CRC-32); drop stale graphs. Returns the graph."""
    folder = os.path.dirname(os.path.abspath(path))
    ensure_room(folder, need, "to save the HNSW index")
    name = re.escape(os.path.basename(path))
    remove_stale_temps(folder, re.compile(name + r"\.[0-9a-f]{8}" + re.escape(GRAPH_SUFFIX) + r"\.[0-9a-f]{8}\.tmp"))
    graph = f"{path}.{uuid.uuid4().hex[:8]}{GRAPH_SUFFIX}"
    tmp = f"{graph}.{uuid.uuid4().hex[:8]}.tmp"
    held = create_locked(tmp)  # held until committed: no other save's cleanup drops it meanwhile
    try:
        try:
            write_graph(tmp)
            written = os.path.getsize(tmp)
            if written != need:  # hnswlib does not check its writes: a full disk leaves a short file
                raise OSError(errno.ENOSPC, f"written short ({written} of {need} bytes; is the disk full?)", path)
            meta = {**meta, "graph": os.path.basename(graph), "index_bytes": written, "crc32": file_crc32(tmp)}
            sidecars.fsync_file(tmp)
            os.replace(tmp, graph)
            with atomic_write(meta_path(path)) as out:
                out.write_text(json.dumps(meta, indent=1))
        except BaseException as exc:
            for f in (tmp, graph):
                with contextlib.suppress(OSError):
                    os.unlink(f)
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
                raise OSError(exc.errno, exc.strerror, path) from exc
            raise
        drop_stale_graphs(path, own=graph)
    finally:
        os.close(held)
    fsync_dir(folder)
    return graph


def drop_stale_graphs(path: str, own: str | None = None) -> list[str]:
    """Delete the index's graphs that its metadata does not name and no writer holds (``own``: the
    caller's, held by the caller and done with); nothing while the metadata is unreadable."""
    graphs = [f for f in sorted(set(glob.glob(glob.escape(path) + ".*" + GRAPH_SUFFIX)) | {path})
              if f == path or re.fullmatch(r"\.[0-9a-f]{8}" + re.escape(GRAPH_SUFFIX), f[len(path):])]
    return drop_unnamed(graphs, lambda: _named(path), own=own)
