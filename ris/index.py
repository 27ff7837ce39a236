"""Search indexes over a feature matrix, and the one registry of index kinds (``--index``).

Kinds: ``exact`` (blockwise BLAS, any size that fits the time), ``hnsw`` (hnswlib graph, saved
beside the database), ``ivfpq`` (faiss IVF-PQ, compressed, memory-mapped, saved beside the
database), ``milvus:PATH.db`` / ``milvus://HOST:PORT`` (a Milvus Lite file or a Milvus server),
and ``auto`` (exact below 200,000 rows, else a saved HNSW or IVF-PQ index if there is one).
Every kind returns ``(distances, rows)`` in the same units (euclidean = true L2 distance,
cosine = 1 - cos), sorted by (distance, row), rows being row numbers of the feature database
(-1 with distance inf where fewer than k were found), so callers switch between them freely.
Approximate kinds store stable ids and follow the database's appends and removals
(``ris.index_state``). Importing this module needs neither Keras nor any index library.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ris.errors import DatabaseError, RisError
from ris.hnsw_files import is_saved, meta_path
from ris.hnsw_index import HnswIndex, build_hnsw_from_db, hnsw_available, update_hnsw  # noqa: F401 (re-exported)
from ris.index_state import RowMap, catch_up, saved_source, stale_reason
from ris.sidecars import hnsw_path, ivfpq_path
from ris.topk import METRICS, blockwise_topk, row_norms

DEFAULT_CACHE_BYTES = 2 << 30
AUTO_THRESHOLD = 200_000


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


class ExactIndex:
    """Exact k-NN by blockwise GEMM over an array or an h5py dataset.

    A database of at most ``cache_bytes`` is read into RAM once (with its row norms), because a
    single query must otherwise re-read the whole file: 1M x 256 float32 took ~50 ms/query from
    RAM and ~300-550 ms streamed from HDF5 on the 2-core sandbox (bench/README.md). Larger
    databases are streamed block by block on every search. The row count is fixed at creation.
    """

    kind = "exact"

    def __init__(self, database, metric: str = "euclidean", block_rows: int = 65536,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        _check_metric(metric)
        self.metric = metric
        self.block_rows = int(block_rows)
        self._n = int(database.shape[0])
        nbytes = self._n * int(np.prod(database.shape[1:])) * 4
        self._norms = None
        if isinstance(database, np.ndarray) or nbytes <= cache_bytes:
            database = np.ascontiguousarray(database[: self._n], dtype=np.float32)
            self._norms = row_norms(database, metric)
        self._db = database

    def __len__(self) -> int:
        return self._n

    @property
    def in_memory(self) -> bool:
        return self._norms is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        db = self._db if self.in_memory or self._n == self._db.shape[0] else _RowsView(self._db, self._n)
        return blockwise_topk(queries, db, k, self.metric, block_rows=self.block_rows, norms=self._norms)


class _RowsView:
    """The first ``n`` rows of a dataset that has grown since the index was made."""

    def __init__(self, data, n: int) -> None:
        self._data, self.shape = data, (n, *data.shape[1:])

    def __getitem__(self, s: slice):
        return self._data[s.start : min(s.stop, self.shape[0])]


def index_path_for(features_db: str) -> str:
    return hnsw_path(features_db)


# -- opening an index ------------------------------------------------------------------------------

@dataclass
class IndexRequest:
    """What every opener gets: the vectors, where their files live, and what they are."""

    vectors_path: str  # the database (or embedding cache) the index files are kept beside
    features: object  # (N, D) array or h5py dataset
    metric: str
    source: dict | None = None  # see ris.index_state
    arg: str | None = None  # the part after 'milvus:'
    build: bool = True  # False: use a saved index only (auto never builds: it takes minutes)
    threshold: int = AUTO_THRESHOLD
    rebuild: bool = False  # build anew even if a saved index could follow; the saved one stays until replaced
    # what a saved index that cannot be used (not ``build``) leaves in its place, said in its warning
    instead: str = "using exact search (rebuild it with --index {kind})"

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])


_LABELS = {"hnsw": "HNSW", "ivfpq": "IVF-PQ", "milvus": "Milvus"}


class IndexNotSaved(UserWarning):
    """An index built or caught up for this run could not be saved (it still serves the run);
    ``ris-index build``, whose job is the saved index, turns it into an error."""


def open_saved(req: IndexRequest, path: str, load: Callable[[str], object], build: Callable[[], object],
               name: str, exists: Callable[[str], bool] = os.path.isfile, shown: str | None = None):
    """Load the index saved at ``path``, catch it up with the database and re-save it; build it
    when it is missing, damaged or stale (``req.build``) or return None (not ``req.build``).
    ``req.rebuild`` builds anew without reading the saved index, which stays usable under its name
    until the new one's save replaces it (a rebuild killed mid-way leaves the old index, not none)."""
    label, shown = _LABELS.get(name, name), shown or path  # shown: the file messages name (one that exists)
    index, reason, changed = None, "no saved index", False
    if req.rebuild and req.build:
        reason = "a rebuild was asked for"
    elif exists(path):
        try:
            index = load(path)
            reason = stale_reason(index, req.features, req.metric, req.source)
            if reason is None:
                if hasattr(index, "pending") and index.pending(req.features, req.source):
                    index = index.writable(path)
                added, removed = catch_up(index, req.features, req.source, progress=req.rows - len(index) > 50000,
                                          name=name)
                changed = bool(added or removed)
                if len(index) != req.rows:
                    reason = f"it holds {len(index)} vectors, the database {req.rows} rows"
                elif hasattr(index, "disagrees"):  # a collection kept elsewhere: spot-check its rows
                    reason = index.disagrees(req.source, req.rows)
        except (DatabaseError, RuntimeError) as exc:
            reason = str(exc)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # metadata of the wrong shape
            index, reason = None, f"it is damaged ({type(exc).__name__}: {exc})"
    if reason is not None:
        if not req.build:
            if exists(path):
                warnings.warn(f"ignoring {label} index {shown}: {reason}; {req.instead.format(kind=name)}",
                              stacklevel=3)
            return None
        print(f"building {label} index {shown} ({reason})", file=sys.stderr)
        index, changed = build(), True
    if changed or saved_source(req.source) != index.source:
        index.source = saved_source(req.source)
        try:
            index.save(path)
        except OSError as exc:  # a read-only location, a full disk: the index still serves this run
            warnings.warn(IndexNotSaved(f"could not save {label} index {shown}: {exc.strerror or exc}"), stacklevel=3)
    if req.source is not None and req.source.get("ids") is not None:
        index.rowmap = RowMap(req.source["ids"])
    return index


def _open_exact(req: IndexRequest) -> ExactIndex:
    return ExactIndex(req.features, req.metric)


def _open_hnsw(req: IndexRequest):
    if not req.build and not hnsw_available():
        return None
    path = index_path_for(req.vectors_path)  # no file: messages name its metadata (an old-layout index: its graph)
    return open_saved(req, path, HnswIndex.load,
                      lambda: build_hnsw_from_db(req.features, req.metric, source=req.source), "hnsw", is_saved,
                      shown=path if os.path.isfile(path) and not os.path.isfile(meta_path(path)) else meta_path(path))


def _open_ivfpq(req: IndexRequest):
    from ris.faiss_index import faiss_available, open_ivfpq

    if not req.build and not faiss_available():
        return None
    return open_ivfpq(req)


def _open_milvus(req: IndexRequest):
    from ris.milvus_index import open_milvus

    return open_milvus(req)


def _open_auto(req: IndexRequest):
    if req.rows < req.threshold:
        return ExactIndex(req.features, req.metric)
    quiet = IndexRequest(**{**req.__dict__, "build": False})
    for opener, saved in ((_open_hnsw, is_saved(hnsw_path(req.vectors_path))),
                          (_open_ivfpq, os.path.isfile(ivfpq_path(req.vectors_path)))):
        if saved:
            index = opener(quiet)
            if index is not None:
                return index
    return ExactIndex(req.features, req.metric)


@dataclass(frozen=True)
class IndexKind:
    name: str  # what --index takes; with ``takes_arg``, the prefix before the argument
    open: Callable[[IndexRequest], object]
    help: str
    takes_arg: bool = False
    metavar: str = ""
    check: Callable[[str], object] | None = None  # validates the argument (RisError), before any slow work


def _check_milvus(arg: str) -> None:
    from ris.milvus_index import parse_target

    parse_target(arg)


INDEX_KINDS: dict[str, IndexKind] = {k.name: k for k in (
    IndexKind("auto", _open_auto, "exact below 200,000 rows, else a saved hnsw or ivfpq index if there is one "
                                  "(never builds one)"),
    IndexKind("exact", _open_exact, "blockwise BLAS search: exact, no index"),
    IndexKind("hnsw", _open_hnsw, "HNSW graph (pip install 'ris[ann]'), built on first use and saved beside the "
                                  "database: ~1.2 GB RAM per million 256-d vectors"),
    IndexKind("ivfpq", _open_ivfpq, "faiss IVF-PQ (pip install 'ris[faiss]'), compressed (~72 bytes per vector), "
                                    "memory-mapped, built on first use and saved beside the database"),
    IndexKind("milvus", _open_milvus, "a Milvus collection (pip install 'ris[milvus]'): milvus:PATH.db = Milvus "
                                      "Lite, embedded; milvus://HOST:PORT = a Milvus server", takes_arg=True,
              metavar="milvus:PATH.db|milvus://HOST:PORT", check=_check_milvus),
)}


def parse_index(text: str) -> tuple[str, str | None]:
    """'hnsw' -> ('hnsw', None); 'milvus:x.db' -> ('milvus', 'x.db'); anything else: RisError."""
    name, sep, arg = str(text).partition(":")
    kind = INDEX_KINDS.get(name)
    if kind is None or (kind.takes_arg and not arg) or (not kind.takes_arg and sep):
        raise RisError(f"unknown index {text!r}; choose {index_metavar()}")
    if kind.check is not None:
        kind.check(arg)
    return name, (arg or None)


def index_metavar() -> str:
    return "|".join(k.metavar or k.name for k in INDEX_KINDS.values())


def index_help() -> str:
    return "; ".join(f"{k.metavar or k.name} = {k.help}" for k in INDEX_KINDS.values())


def index_arg(text: str) -> str:
    """``type=`` for an ``--index`` flag: the same choices everywhere, from INDEX_KINDS."""
    try:
        parse_index(text)
    except RisError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_kind(kind: str) -> tuple[str, str]:
    """``parse_index``, refusing an unknown kind in the commands' words (before anything is opened)."""
    try:
        return parse_index(kind)
    except RisError:
        from ris.errors import BadChoice

        raise BadChoice(f"unknown index kind {kind!r}; choose {index_metavar()}") from None


def open_search_index(features_db_path: str, features, metric: str, kind: str = "auto",
                      threshold: int = AUTO_THRESHOLD, source: dict | None = None, build: bool = True,
                      rebuild: bool = False):
    """Pick and open the index for a feature database (or its embedding cache).

    ``kind``: a name of INDEX_KINDS (``milvus:...`` with its target). ``auto`` uses a saved,
    matching index when the database has >= ``threshold`` rows, else exact search. ``hnsw`` and
    ``ivfpq`` build (and save) their index when it is missing or stale; ``milvus`` creates or
    refreshes its collection. In all of them, images appended to or removed from the database
    since are added or removed and the index re-saved. ``source`` (``ris.index_state.source_of``)
    keys the index on the database content and gives the stable ids. ``rebuild`` builds anew; the
    saved index (a Milvus collection too) is replaced only when the new one is committed.
    """
    name, arg = check_kind(kind)
    _check_metric(metric)
    req = IndexRequest(str(features_db_path), features, metric, source, arg, build, threshold, rebuild)
    index = INDEX_KINDS[name].open(req)
    if index is None:  # a saved-only open that found nothing usable
        return ExactIndex(features, metric)
    return index


def follow_saved_indexes(features_db: str | Path, log=lambda s: print(s, file=sys.stderr)) -> list[str]:
    """Catch up the HNSW and IVF-PQ indexes saved beside the database's raw features now (they
    would otherwise catch up on their next use); return the kinds updated. Indexes of head
    embeddings follow when their embeddings are next made; Milvus collections when next opened."""
    import shlex

    from ris.featuredb import FeatureDB
    from ris.index_state import source_of

    done = []
    with FeatureDB(features_db) as db:
        if db.features.ndim != 2:
            return done
        for kind, path, saved, shown in (("hnsw", hnsw_path(db.path), is_saved, meta_path),
                                         ("ivfpq", ivfpq_path(db.path), os.path.isfile, str)):
            if saved(path):
                req = IndexRequest(str(db.path), db.features, "euclidean", source_of(db), build=False,
                                   instead=f"it was not caught up: ris-index build --features-db "
                                           f"{shlex.quote(str(features_db)).replace('{', '{{').replace('}', '}}')} "
                                           "--index {kind} rebuilds it")
                index = INDEX_KINDS[kind].open(req)
                if index is not None:
                    done.append(kind)
                    log(f"{shown(path)}: follows the database ({len(index)} vectors)")
    return done
