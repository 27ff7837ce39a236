"""Approximate k-NN with hnswlib (the optional extra ``ris[ann]``), saved beside the database.

Labels are the database's stable ids (``ris.index_state``): appended rows are added, removed
images are marked deleted (hnswlib's ``mark_deleted``: they are skipped by every search and their
slots stay in the graph until the next rebuild), so a database that changes is followed without
rebuilding. Memory: about 1.2 GB per million 256-d vectors (bench/README.md).
"""
from __future__ import annotations

import os

import numpy as np

from ris.errors import DatabaseError, RisError
from ris.hnsw_files import load_pair, meta_path, save_pair
from ris.index_state import RowMap, catch_up, saved_source, to_rows
from ris.sidecars import file_crc32
from ris.topk import METRICS

_SPACES = {"euclidean": "l2", "cosine": "cosine"}


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
    """hnswlib graph over stable ids; ``search`` answers database row numbers (see ``rowmap``).

    ``len(self)`` is the number of live vectors; ``next_id`` says every id below it was added
    (for a database that never lost an image, ids are row numbers and the two are equal).
    """

    kind = "hnsw"

    def __init__(self, dim: int, metric: str = "euclidean", M: int = 32, ef_construction: int = 200,
                 ef_search: int = 128, max_elements: int = 1024) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.dim, self.metric = int(dim), metric
        self.M, self.ef_construction, self.ef_search = int(M), int(ef_construction), int(ef_search)
        self.fingerprint: str | None = None
        self.fingerprint_rows = 0
        self.source: dict | None = None  # content key of the vectors it was built from (see ris.index_state)
        self.next_id = self.removed_seen = self.deleted = 0
        self.rowmap: RowMap | None = None
        self._index = _hnswlib().Index(space=_SPACES[metric], dim=self.dim)
        self._index.init_index(max_elements=max(1, int(max_elements)), ef_construction=self.ef_construction,
                               M=self.M)
        self._setup()

    def _setup(self) -> None:
        self._index.set_ef(self.ef_search)
        # add_items uses all cores; hnswlib itself runs batches of <= 4*threads queries on one thread
        self._index.set_num_threads(_threads())

    def __len__(self) -> int:
        return int(self._index.get_current_count()) - self.deleted

    @property
    def params(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def add(self, vectors: np.ndarray, start_id: int) -> None:
        """Append rows ``start_id .. start_id+len(vectors)-1``; ``start_id`` must equal ``next_id``."""
        if int(start_id) != self.next_id:
            raise ValueError(f"rows must be added in order: start_id={start_id}, index has {self.next_id} rows")
        self.add_ids(vectors, np.arange(start_id, start_id + len(vectors), dtype=np.int64))

    def add_ids(self, vectors: np.ndarray, ids: np.ndarray, start_row: int | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if not len(vectors):
            return
        need = int(self._index.get_current_count()) + len(vectors)
        if need > self._index.get_max_elements():
            self._index.resize_index(max(need, 2 * self._index.get_max_elements()))
        self._index.add_items(vectors, np.asarray(ids, np.int64))
        self.next_id = max(self.next_id, int(np.max(ids)) + 1)

    def remove_ids(self, ids: np.ndarray) -> int:
        """Mark these ids deleted; ids it never held are ignored. Returns how many it held."""
        n = 0
        for i in np.asarray(ids, np.int64):
            try:
                self._index.mark_deleted(int(i))
            except RuntimeError as exc:  # "already deleted": a re-run after a kill; "not found": never added
                if "already" not in str(exc):
                    continue
            n += 1
        self.deleted += n
        return n

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
        return to_rows(dist, labels, self.rowmap, k)

    def save(self, path: str) -> None:
        """Write a new graph, then the metadata ``path.json`` naming it (``ris.hnsw_files``): a crash
        never leaves a torn index, and two processes saving at once never leave a mixed pair.
        Killed before the metadata, the catch-up from the older one is simply redone (idempotent)."""
        meta = {"format": 3, "kind": self.kind, "dim": self.dim, "metric": self.metric, "count": len(self),
                "db_rows": len(self), "next_id": self.next_id, "removed_seen": self.removed_seen,
                "deleted": self.deleted, "params": self.params, "fingerprint": self.fingerprint,
                "fingerprint_rows": self.fingerprint_rows, "source": saved_source(self.source)}
        save_pair(path, lambda tmp: self._index.save_index(str(tmp)), int(self._index.index_file_size()), meta)

    @classmethod
    def load(cls, path: str) -> "HnswIndex":
        """The index saved at ``path`` (either layout); a graph dropped by a save committed meanwhile
        is not an error: the newer metadata is read."""
        return load_pair(path, lambda meta, graph: cls._load(path, meta, graph))

    @classmethod
    def _load(cls, path: str, meta: dict, graph: str) -> "HnswIndex":
        sidecar = meta_path(path)
        self = cls.__new__(cls)
        try:
            self.dim, self.metric = int(meta["dim"]), meta["metric"]
            p = meta["params"]
            self.M, self.ef_construction, self.ef_search = int(p["M"]), int(p["ef_construction"]), int(p["ef_search"])
            self.fingerprint, self.fingerprint_rows = meta.get("fingerprint"), int(meta.get("fingerprint_rows", 0))
            self.source = meta.get("source")
            self.next_id = int(meta.get("next_id", meta["count"]))
            self.removed_seen, self.deleted = int(meta.get("removed_seen", 0)), int(meta.get("deleted", 0))
            space, count = _SPACES[self.metric], max(1, int(meta["count"]) + self.deleted)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatabaseError(f"HNSW index {path}: its sidecar {sidecar} is damaged "
                                f"(bad or missing {exc})") from None
        if not os.path.isfile(graph):
            raise DatabaseError(f"HNSW index {path}: its graph {graph} is missing")
        if meta.get("index_bytes") not in (None, os.path.getsize(graph)):
            raise DatabaseError(f"HNSW index {path}: its graph {graph} does not match its sidecar {sidecar}")
        if "crc32" in meta and file_crc32(graph) != meta["crc32"]:  # hnswlib follows damaged links into a crash
            raise DatabaseError(f"HNSW index {path} is damaged (the checksum of {graph} does not match {sidecar})")
        self.rowmap = None
        self._index = _hnswlib().Index(space=space, dim=self.dim)
        self._index.load_index(graph, max_elements=count)
        if self._index.get_current_count() < int(meta["count"]) + self.deleted:  # older than its .json
            raise DatabaseError(f"HNSW index {path}: its graph {graph} does not match its sidecar {sidecar}")
        self._setup()
        return self


def update_hnsw(index: HnswIndex, features, chunk_rows: int = 50000, progress: bool = False,
                source: dict | None = None) -> int:
    """Catch the index up with ``features`` (see ``ris.index_state.catch_up``); return rows added."""
    return catch_up(index, features, source, chunk_rows=chunk_rows, progress=progress, name="hnsw")[0]


def build_hnsw_from_db(features, metric: str, chunk_rows: int = 50000, progress: bool = True,
                       source: dict | None = None, **params) -> HnswIndex:
    """Build an index over every row of ``features`` (array or h5py dataset), streamed in chunks."""
    params.setdefault("max_elements", int(features.shape[0]))
    index = HnswIndex(int(features.shape[1]), metric, **params)
    update_hnsw(index, features, chunk_rows=chunk_rows, progress=progress, source=source)
    return index
