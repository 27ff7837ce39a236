"""What a saved index was built from, and how it follows its database through appends and removals.

Every approximate index (HNSW, faiss IVF-PQ, a Milvus collection) stores the database's stable
per-image ids (``FeatureDB.row_ids``), never row numbers: rows shift when images are removed, ids
do not. Beside the vectors it keeps a *cursor*: the database content it reflects (``source``),
``next_id`` (every id below it was added) and ``removed_seen`` (how much of the database's removal
log it has applied). Catching up is then the same for every kind: apply the removal log's new
entries, add the rows whose id is >= ``next_id``, check the live count equals the row count.
Both steps are idempotent, so an update killed half-way is simply redone.

An index serves a database if it was built from the same kind of vectors of this content or of
an earlier version it descends from (``history``: appends and removals keep it, a re-extraction
starts a new one). Search results are mapped back from ids to the current row numbers.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Protocol

import numpy as np

from ris.errors import DatabaseError

FINGERPRINT_ROWS = 64
SAVED_SOURCE_KEYS = ("content_id", "history", "vectors", "key", "lineage")


class FollowingIndex(Protocol):
    """What ``catch_up`` needs of an index kind (HNSW, IVF-PQ, Milvus)."""

    metric: str
    dim: int
    source: dict | None
    next_id: int
    removed_seen: int
    fingerprint: str | None
    fingerprint_rows: int

    def __len__(self) -> int: ...  # live vectors

    def add_ids(self, vectors: np.ndarray, ids: np.ndarray, start_row: int | None = None) -> None: ...

    def remove_ids(self, ids: np.ndarray) -> int: ...


def source_of(db, base: dict | None = None) -> dict:
    """The source dict of a ``FeatureDB``'s vectors: ``base`` (content_id, history, vectors, key)
    plus its lineage, stable ids, removal log and next id."""
    source = dict(base) if base else {"content_id": db.content_id, "history": db.content_history,
                                      "vectors": "raw", "key": db.content_key}
    source.update(lineage=db.lineage, ids=db.row_ids, removed=db.removed_ids, next_id=db.next_id)
    source.update(database=str(db.path), replaced_lineages=_json_list(getattr(db, "attrs", {}).get("replaced_lineages")))

    def describe(start: int, end: int) -> tuple[list[str], list[str]]:
        """(relative paths, label names) of rows start..end-1, for indexes that store them (Milvus)."""
        from ris.featuredb import decode_names

        names = db.label_names
        return (decode_names(db.f["image_ids"][start:end]),
                [names[l] if 0 <= l < len(names) else "" for l in db.f["labels"][start:end]])

    source["describe"] = describe
    return source


def _json_list(text) -> list:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def replaced_lineages(path) -> str:
    """What ``ris-extract --overwrite`` records in the new database: the lineages of the one it
    replaces at ``path`` (and of those that one replaced), as JSON. A Milvus collection of such a
    lineage that no other database used is dropped (``ris.milvus_owners``); none if unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs.get(k) for k in ("replaced_lineages", "lineage_id", "content_history", "content_id")}
    except Exception:  # noqa: BLE001 - a damaged database is often why it is overwritten
        return "[]"
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    history = _json_list(text["content_history"])
    lineage = text["lineage_id"] or (history[0] if history else text["content_id"])
    return json.dumps((_json_list(text["replaced_lineages"]) + ([str(lineage)] if lineage else []))[-50:])


def saved_source(source: dict | None) -> dict | None:
    """The JSON-able part of a source, as stored in an index's metadata."""
    return None if source is None else {k: source[k] for k in SAVED_SOURCE_KEYS if k in source}


def ids_of(source: dict | None, n: int) -> np.ndarray:
    ids = None if source is None else source.get("ids")
    return np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)


def fingerprint(rows: np.ndarray) -> str:
    """Hash of the first database rows: tells a rebuilt database from an appended one when no
    content ids are known (plain arrays and HDF5 files that are not ris databases)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).tobytes()).hexdigest()[:16]


def stale_reason(index: FollowingIndex, features, metric: str, source: dict | None = None) -> str | None:
    """Why a saved index cannot serve these vectors (even after catching up), or None if it can."""
    if source is not None:
        built = index.source or {}
        if built.get("vectors") != source.get("vectors") or (
                built.get("content_id") != source.get("content_id")
                and built.get("content_id") not in source.get("history", [])):
            return "the database content changed since the index was saved"
        if source.get("lineage") and not built.get("lineage") and not RowMap(source.get("ids")).identity:
            # saved by an older version or a caller without the stable ids: its labels are row
            # numbers, which no longer equal the ids once images have been removed
            return "the index was built over row numbers, and images were removed since"
    if index.metric != metric:
        return f"saved index is for metric {index.metric!r}, not {metric!r}"
    if index.dim != int(features.shape[1]):
        return f"saved index has dimension {index.dim}, the database {int(features.shape[1])}"
    tracked = source is not None and source.get("ids") is not None
    if tracked:
        next_id = int(source.get("next_id", 0))
        if index.next_id > next_id or index.removed_seen > len(source.get("removed", ())):
            return "the index is ahead of the database (was the database restored from a copy?)"
        return None
    if len(index) > int(features.shape[0]):
        return f"saved index covers {len(index)} rows, the database has {int(features.shape[0])}"
    if index.fingerprint_rows and fingerprint(features[: index.fingerprint_rows]) != index.fingerprint:
        return "the database's first rows changed since the index was saved"
    return None


def _progress(name: str, done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"{name}: {done}/{total} rows, {rate:.0f} rows/s, eta {eta:.0f} s", file=sys.stderr, flush=True)


def catch_up(index: FollowingIndex, features, source: dict | None = None, chunk_rows: int = 50000,
             progress: bool = False, name: str = "index") -> tuple[int, int]:
    """Apply the removals and add the rows the index has not seen; return (added, removed).

    ``features``: the vectors now (array or h5py dataset), one row per database row; ``source``
    gives their ids and the removal log (none: ids are the row numbers and nothing was removed).
    """
    n = int(features.shape[0])
    ids = ids_of(source, n)
    removed_log = np.zeros(0, np.int64) if source is None or source.get("removed") is None \
        else np.asarray(source["removed"], np.int64)
    removed = 0
    if index.removed_seen < len(removed_log):
        removed = index.remove_ids(removed_log[index.removed_seen:])
        index.removed_seen = len(removed_log)
    if source is None and index.next_id > n:
        raise DatabaseError(f"the index covers {index.next_id} rows but the feature database has only {n}; "
                            f"rebuild it")
    start = int(np.searchsorted(ids, index.next_id))  # ids increase with the row number
    t0 = time.perf_counter()
    for s in range(start, n, chunk_rows):
        e = min(s + chunk_rows, n)
        index.add_ids(np.asarray(features[s:e], dtype=np.float32), ids[s:e], start_row=s)
        index.next_id = int(ids[e - 1]) + 1
        if progress:
            _progress(name, e - start, n - start, t0)
    if source is not None and source.get("next_id") is not None:
        index.next_id = max(index.next_id, int(source["next_id"]))
    if index.fingerprint_rows < min(n, FINGERPRINT_ROWS) or (removed and index.fingerprint_rows):
        index.fingerprint_rows = min(n, FINGERPRINT_ROWS)
        index.fingerprint = fingerprint(features[: index.fingerprint_rows])
    return n - start, removed


class RowMap:
    """Stable ids -> current row numbers (ids increase with the row, so a binary search)."""

    def __init__(self, ids: np.ndarray | None):
        ids = None if ids is None else np.asarray(ids, np.int64)
        self.identity = ids is None or (len(ids) == 0 or (ids[0] == 0 and ids[-1] == len(ids) - 1))
        self.ids = ids
        self.n = None if ids is None else len(ids)

    def rows(self, labels: np.ndarray) -> np.ndarray:
        """Row of each id; -1 for ids not in the database (or -1 labels: no result)."""
        labels = np.asarray(labels, np.int64)
        if self.identity:
            if self.n is None:
                return labels
            return np.where((labels >= 0) & (labels < self.n), labels, -1)
        pos = np.searchsorted(self.ids, labels)
        pos = np.minimum(pos, len(self.ids) - 1)
        return np.where((labels >= 0) & (self.ids[pos] == labels), pos, -1)


def to_rows(dist: np.ndarray, labels: np.ndarray, rowmap: RowMap | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Map ids to rows, push ids the database no longer has to the end (distance inf, row -1), keep k,
    sort by (distance, row)."""
    dist = np.asarray(dist, np.float32)
    rows = labels.astype(np.int64) if rowmap is None else rowmap.rows(labels)
    dist = np.where(rows < 0, np.inf, dist).astype(np.float32)
    key_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((key_rows, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
