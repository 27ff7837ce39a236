"""Search indexes over a feature matrix: exact (blockwise BLAS) and approximate (HNSW).

Both return ``(distances, indices)`` in the same units (euclidean = true L2 distance, cosine =
1 - cos), sorted by (distance, index), so callers can switch between them freely. Indices are
row numbers of the feature database.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np

from ris.errors import DatabaseError, RisError
from ris.sidecars import atomic_write, hnsw_path
from ris.topk import METRICS, blockwise_topk, row_norms

_SPACES = {"euclidean": "l2", "cosine": "cosine"}
_FINGERPRINT_ROWS = 64
DEFAULT_CACHE_BYTES = 2 << 30


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _fingerprint(rows: np.ndarray) -> str:
    """Hash of the first database rows: tells a rebuilt database from an appended one."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).tobytes()).hexdigest()[:16]


def _sorted(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, dist), axis=1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


class ExactIndex:
    """Exact k-NN by blockwise GEMM over an array or an h5py dataset.

    A database of at most ``cache_bytes`` is read into RAM once (with its row norms), because a
    single query must otherwise re-read the whole file: 1M x 256 float32 took ~50 ms/query from
    RAM and ~300-550 ms streamed from HDF5 on the 2-core sandbox (bench/README.md). Larger
    databases are streamed block by block on every search. The row count is fixed at creation.
    """

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


def _hnswlib():
    try:
        import hnswlib
    except ImportError as exc:
        raise RisError("approximate search needs hnswlib: pip install 'ris[ann]' "
                       "(or use the exact index)") from exc
    return hnswlib


def hnsw_available() -> bool:
    try:
        _hnswlib()
    except RisError:
        return False
    return True


class HnswIndex:
    """Approximate k-NN with hnswlib; labels are feature-database row numbers 0..len-1.

    Rows are only ever appended in order (``add(v, start_id=len(self))``), so ``len(self)`` is
    also the number of database rows covered, which is what makes incremental updates safe.
    """

    def __init__(self, dim: int, metric: str = "euclidean", M: int = 32, ef_construction: int = 200,
                 ef_search: int = 128, max_elements: int = 1024) -> None:
        _check_metric(metric)
        self.dim, self.metric = int(dim), metric
        self.M, self.ef_construction, self.ef_search = int(M), int(ef_construction), int(ef_search)
        self.fingerprint: str | None = None
        self.fingerprint_rows = 0
        self.source: dict | None = None  # content key of the vectors it was built from (see open_search_index)
        self._index = _hnswlib().Index(space=_SPACES[metric], dim=self.dim)
        self._index.init_index(max_elements=max(1, int(max_elements)), ef_construction=self.ef_construction,
                               M=self.M)
        self._setup()

    def _setup(self) -> None:
        self._index.set_ef(self.ef_search)
        # add_items uses all cores; hnswlib itself runs batches of <= 4*threads queries on one thread
        self._index.set_num_threads(_threads())

    def __len__(self) -> int:
        return int(self._index.get_current_count())

    @property
    def params(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def add(self, vectors: np.ndarray, start_id: int) -> None:
        """Append rows ``start_id .. start_id+len(vectors)-1``; ``start_id`` must equal ``len(self)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if int(start_id) != len(self):
            raise ValueError(f"rows must be added in order: start_id={start_id}, index has {len(self)} rows")
        if not len(vectors):
            return
        need = len(self) + len(vectors)
        if need > self._index.get_max_elements():
            self._index.resize_index(max(need, 2 * self._index.get_max_elements()))
        self._index.add_items(vectors, np.arange(start_id, need, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        k = min(int(k), len(self))
        if k <= 0 or not len(queries):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        self._index.set_ef(max(self.ef_search, k))  # ef < k cannot return k results
        labels, dist = self._index.knn_query(queries, k=k)
        dist = np.sqrt(np.maximum(dist, 0.0)) if self.metric == "euclidean" else dist  # 'l2' is squared
        return _sorted(dist.astype(np.float32, copy=False), labels.astype(np.int64))

    def save(self, path: str) -> None:
        """Write ``path`` and ``path.json``, each atomically, so a crash never leaves a torn index;
        the .json (written last) says what the index holds, and load checks the two agree."""
        with atomic_write(path) as tmp:
            self._index.save_index(str(tmp))
        meta = {"format": 1, "dim": self.dim, "metric": self.metric, "count": len(self), "db_rows": len(self),
                "params": self.params, "fingerprint": self.fingerprint,
                "fingerprint_rows": self.fingerprint_rows, "source": self.source,
                "index_bytes": os.path.getsize(path)}
        with atomic_write(path + ".json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str) -> "HnswIndex":
        try:
            with open(path + ".json") as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise DatabaseError(f"HNSW index {path}: cannot read its sidecar {path}.json ({exc})") from exc
        if not os.path.isfile(path):
            raise DatabaseError(f"HNSW index {path} is missing")
        if meta.get("index_bytes") not in (None, os.path.getsize(path)):  # killed between the two writes
            raise DatabaseError(f"HNSW index {path} does not match its sidecar {path}.json")
        self = cls.__new__(cls)
        try:
            self.dim, self.metric = int(meta["dim"]), meta["metric"]
            p = meta["params"]
            self.M, self.ef_construction, self.ef_search = int(p["M"]), int(p["ef_construction"]), int(p["ef_search"])
            self.fingerprint, self.fingerprint_rows = meta.get("fingerprint"), int(meta.get("fingerprint_rows", 0))
            self.source = meta.get("source")
            space, count = _SPACES[self.metric], max(1, int(meta["count"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatabaseError(f"HNSW index {path}: its sidecar {path}.json is damaged (bad or missing {exc})") from None
        self._index = _hnswlib().Index(space=space, dim=self.dim)
        self._index.load_index(path, max_elements=count)
        self._setup()
        return self


def index_path_for(features_db: str) -> str:
    return hnsw_path(features_db)


def _progress(done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"hnsw: {done}/{total} rows, {rate:.0f} rows/s, eta {eta:.0f} s", file=sys.stderr, flush=True)


def update_hnsw(index: HnswIndex, features, chunk_rows: int = 50000, progress: bool = False) -> int:
    """Add database rows ``[len(index), features.shape[0])``, read in chunks; return how many."""
    n, have = int(features.shape[0]), len(index)
    if n < have:
        raise DatabaseError(f"the HNSW index covers {have} rows but the feature database has only {n}; rebuild it")
    t0 = time.perf_counter()
    for start in range(have, n, chunk_rows):
        index.add(np.asarray(features[start : min(start + chunk_rows, n)], dtype=np.float32), start)
        if progress:
            _progress(len(index), n, t0)
    if index.fingerprint_rows < min(n, _FINGERPRINT_ROWS):
        index.fingerprint_rows = min(n, _FINGERPRINT_ROWS)
        index.fingerprint = _fingerprint(features[: index.fingerprint_rows])
    return n - have


def build_hnsw_from_db(features, metric: str, chunk_rows: int = 50000, progress: bool = True,
                       **params) -> HnswIndex:
    """Build an index over every row of ``features`` (array or h5py dataset), streamed in chunks."""
    params.setdefault("max_elements", int(features.shape[0]))
    index = HnswIndex(int(features.shape[1]), metric, **params)
    update_hnsw(index, features, chunk_rows=chunk_rows, progress=progress)
    return index


def _stale_reason(index: HnswIndex, features, metric: str, source: dict | None = None) -> str | None:
    """Why a saved index cannot serve this database, or None if it can (possibly after appending).

    ``source``: {'content_id', 'history', 'vectors'} of the vectors now; the index serves them if it
    was built from the same kind of vectors of this content, or of an earlier content in
    ``history`` (the database was appended to since: its rows are a prefix of these).
    """
    if source is not None:
        built = index.source or {}
        if built.get("vectors") != source.get("vectors") or (
                built.get("content_id") != source.get("content_id")
                and built.get("content_id") not in source.get("history", [])):
            return "the database content changed since the index was saved"
    if index.metric != metric:
        return f"saved index is for metric {index.metric!r}, not {metric!r}"
    if index.dim != int(features.shape[1]):
        return f"saved index has dimension {index.dim}, the database {int(features.shape[1])}"
    if len(index) > int(features.shape[0]):
        return f"saved index covers {len(index)} rows, the database has {int(features.shape[0])}"
    if index.fingerprint_rows and _fingerprint(features[: index.fingerprint_rows]) != index.fingerprint:
        return "the database's first rows changed since the index was saved"
    return None


def open_search_index(features_db_path: str, features, metric: str, kind: str = "auto",
                      threshold: int = 200_000, source: dict | None = None) -> ExactIndex | HnswIndex:
    """Pick and open the index for a feature database.

    ``auto`` uses a saved, matching HNSW index when the database has >= ``threshold`` rows and
    hnswlib is installed, else exact search: building an index takes minutes, so it is never
    done implicitly. ``hnsw`` builds (and saves) the index when it is missing or stale. In both,
    rows appended to the database since the index was saved are added and the index re-saved.
    ``source`` (see ``_stale_reason``) keys the saved index on the database content.
    """
    if kind not in ("auto", "exact", "hnsw"):
        raise ValueError(f"unknown index kind {kind!r}; choose auto, exact or hnsw")
    _check_metric(metric)
    n = int(features.shape[0])
    if kind == "exact" or (kind == "auto" and (n < threshold or not hnsw_available())):
        return ExactIndex(features, metric)
    path = index_path_for(features_db_path)
    index, reason = None, "no saved index"
    if os.path.isfile(path):
        try:
            index = HnswIndex.load(path)
            reason = _stale_reason(index, features, metric, source)
        except (DatabaseError, RuntimeError) as exc:
            reason = str(exc)
    if reason is not None:
        if kind == "auto":
            if os.path.isfile(path):
                warnings.warn(f"ignoring HNSW index {path}: {reason}; using exact search "
                              f"(rebuild it with --index hnsw)", stacklevel=2)
            return ExactIndex(features, metric)
        print(f"building HNSW index {path} ({reason})", file=sys.stderr)
        index = build_hnsw_from_db(features, metric)
    elif not update_hnsw(index, features, progress=n - len(index) > 50000) and (
            source is None or index.source == source):
        return index  # up to date: nothing to write
    if source is not None:
        index.source = dict(source)
    try:
        index.save(path)
    except OSError as exc:  # read-only location: the index still serves this run
        warnings.warn(f"could not save HNSW index {path}: {exc}", stacklevel=2)
    return index
