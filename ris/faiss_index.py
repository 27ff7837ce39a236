"""Compressed k-NN on one machine: a faiss IVF-PQ index (the optional extra ``ris[faiss]``).

Why: HNSW keeps every float of every vector plus its graph in RAM (~1.2 GB per million 256-d
vectors); IVF-PQ keeps a code of ``m`` bytes per vector (64 by default) plus its 8-byte id, so
10M vectors fit in ~0.7 GB, and the saved index is memory-mapped (``faiss.IO_FLAG_MMAP``): only
the inverted lists a query visits are paged in. This is how clip-retrieval/autofaiss serve
LAION-5B from one machine. The price is approximate distances: with ``rerank`` (default 100),
the shortlist is re-ranked exactly from the stored vectors of the feature database, read row
by row straight from the HDF5 file (``StoredRows``).

Build: trained on a sample (OPQ rotation, coarse k-means, PQ codebooks), then the database is
streamed in chunks and added with its stable ids, so appended images are added and removed
ones removed (``remove_ids``) without retraining (``ris.index_state``). The index is saved as
``<vectors>.ivfpq`` (JSON metadata, the commit point) naming its data file
``<vectors>.ivfpq.<token>.faiss``; both are written atomically, so a build killed at any point
leaves either the previous index or none under the final name. A save holds a ``flock`` on its
data file until the metadata naming it is committed; then it deletes the index's data files that
the metadata does not name and no process holds (a killed save's orphan, the superseded one).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import time
import uuid
from dataclasses import asdict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads OpenMP: spinning threads
# starve everything else on a shared 2-core machine (k-means ran ~10x slower under load)

import numpy as np  # noqa: E402

from ris.errors import DatabaseError, RisError  # noqa: E402
from ris.ivfpq_params import IvfPqParams, asked_settings, choose_params, saved_nprobe  # noqa: E402  (re-exported)
from ris.index_state import RowMap, catch_up, ids_of, saved_source, to_rows  # noqa: E402
from ris import sidecars  # noqa: E402
from ris.sidecars import (atomic_write, create_locked, drop_unnamed, file_crc32, fsync_dir, ivfpq_path,  # noqa: E402
                          remove_stale_temps)
from ris.stored_rows import StoredRows  # noqa: E402  (re-ranking reads; re-exported)
from ris.topk import METRICS, l2_normalize  # noqa: E402

FORMAT = 1


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise RisError("the ivfpq index needs faiss: pip install 'ris[faiss]' (or use --index exact|hnsw)") from exc
    threads = os.environ.get("RIS_FAISS_THREADS")
    try:
        n = int(threads) if threads else len(os.sched_getaffinity(0))
    except (AttributeError, ValueError):
        n = os.cpu_count() or 1
    faiss.omp_set_num_threads(max(1, n))
    # no per-cell precomputed distance tables: nlist x m x 256 floats (268 MB at 4096 cells and
    # 64-byte codes) for no measurable speed-up at 32 probes (bench/README.md)
    faiss.cvar.precomputed_table_max_bytes = 0
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except RisError:
        return False
    return True


SHORTLIST_PER_RESULT = 4  # re-rank at least 4 x k candidates (see IvfPqIndex.shortlist)


class IvfPqIndex:
    """faiss IVF-PQ over stable ids; ``search`` answers database row numbers (see ``rowmap``)."""

    kind = "ivfpq"

    def __init__(self, index, dim: int, metric: str, params: IvfPqParams, mmap: bool = False):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.index, self.dim, self.metric, self.params, self.mmap = index, int(dim), metric, params, mmap
        self.source: dict | None = None
        self.next_id = self.removed_seen = self.fingerprint_rows = 0
        self.fingerprint: str | None = None
        self.rowmap: RowMap | None = None
        self.stored: StoredRows | None = None  # exact vectors for re-ranking, attached by open_ivfpq
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        ps = faiss.ParameterSpace()
        ps.set_index_parameter(self.index, "nprobe", int(self.params.nprobe))
        if self.params.nlist >= 1024:  # HNSW coarse quantizer: must see at least nprobe cells
            ps.set_index_parameter(self.index, "quantizer_efSearch", max(64, 2 * int(self.params.nprobe)))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray(l2_normalize(x), dtype=np.float32) if self.metric == "cosine" else x

    def add_ids(self, vectors: np.ndarray, ids: np.ndarray, start_row: int | None = None) -> None:
        if self.mmap:
            raise RuntimeError("a memory-mapped IVF-PQ index is read-only (load it with mmap=False)")
        if len(vectors):
            self.index.add_with_ids(self._prep(vectors), np.ascontiguousarray(ids, dtype=np.int64))
            self.next_id = max(self.next_id, int(np.max(ids)) + 1)

    def remove_ids(self, ids: np.ndarray) -> int:
        if self.mmap:
            raise RuntimeError("a memory-mapped IVF-PQ index is read-only (load it with mmap=False)")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return int(self.index.remove_ids(ids)) if len(ids) else 0

    def pending(self, features, source: dict | None) -> bool:
        """Whether the database changed since the index was saved (then it must be loaded writable)."""
        n = int(features.shape[0])
        removed = 0 if source is None or source.get("removed") is None else len(source["removed"])
        ids = ids_of(source, n)
        return self.removed_seen < removed or (n > 0 and int(ids[-1]) >= self.next_id)

    def writable(self, path: str) -> "IvfPqIndex":
        return IvfPqIndex.load(path, mmap=False) if self.mmap else self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._prep(np.atleast_2d(np.asarray(queries, np.float32)))
        k = min(int(k), len(self))
        if k <= 0 or not len(q):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        rerank = self.stored is not None and self.params.rerank > 0
        d2, labels = self._search(q, min(self.shortlist(k) if rerank else k, len(self)))
        if not rerank:
            dist = np.sqrt(np.maximum(d2, 0)) if self.metric == "euclidean" else d2 / 2  # unit vectors: 1-cos = d2/2
            return to_rows(np.where(labels < 0, np.inf, dist), labels, self.rowmap, k)
        return self._rerank(np.atleast_2d(queries), labels, k)

    @property
    def exact_distances(self) -> bool:
        """Whether ``search`` answers true distances (re-ranked from the stored rows), so a caller
        showing them need not compute them again."""
        return self.stored is not None and self.params.rerank > 0

    def shortlist(self, k: int) -> int:
        """Candidates re-ranked exactly for k results: ``rerank``, or ``SHORTLIST_PER_RESULT`` x k
        when more results are asked for. Why: a shortlist of just k keeps PQ's choice of who is in
        the list (Corel, 13,000 rows, lists of 100: mAP 0.16 off exact search's; 2 x k: 0.014;
        4 x k: 0.002; bench/README.md)."""
        return max(int(self.params.rerank), SHORTLIST_PER_RESULT * int(k))

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss search; a few queries run on one thread: faiss splits work by query, and waking
        a second OpenMP thread for one query cost milliseconds on a loaded 2-core machine. Queries
        whose ``nprobe`` cells held fewer than k vectors (k near the collection's size) are searched
        again over every cell: they came back short (-1 labels) where every other kind gives k."""
        faiss = _faiss()
        threads = faiss.omp_get_max_threads()
        if len(q) < 16:
            faiss.omp_set_num_threads(1)
        try:
            d2, labels = self.index.search(q, k)
            short = (labels < 0).any(axis=1)
            if short.any() and self.params.nprobe < self.params.nlist:
                every = [faiss.SearchParametersIVF(nprobe=int(self.params.nlist))]  # referenced: faiss keeps pointers
                if self.params.nlist >= 1024:  # the HNSW coarse quantizer must return every cell
                    every.append(faiss.SearchParametersHNSW(efSearch=int(self.params.nlist)))
                    every[0].quantizer_params = every[-1]
                pre = isinstance(self.index, faiss.IndexPreTransform)
                every.append(faiss.SearchParametersPreTransform(index_params=every[0]) if pre else every[0])
                d2[short], labels[short] = self.index.search(q[short], k, params=every[-1])
            return d2, labels
        finally:
            faiss.omp_set_num_threads(threads)

    def _rerank(self, q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The shortlist's true distances to the queries as given (not prepared), as exact search shows them."""
        from ris.topk import true_distances

        rows = labels if self.rowmap is None else self.rowmap.rows(labels)
        dist = np.full(rows.shape, np.inf, np.float32)
        for i in range(len(q)):
            ok = rows[i] >= 0
            if ok.any():
                dist[i, ok] = true_distances(q[i : i + 1], self.stored.read(rows[i][ok]), self.metric)[0]
        return to_rows(dist, rows, None, k)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write a new data file, then the metadata naming it (the commit), then drop the data
        files no metadata names and no writer holds (the previous one, killed saves')."""
        faiss = _faiss()
        if self.mmap:  # opened read-only, so unchanged: only its metadata (the source it follows) is new
            data = getattr(self, "data_file", None)
            if data is None or not os.path.isfile(data):
                raise RuntimeError("a memory-mapped IVF-PQ index cannot be re-saved; load it with mmap=False")
            self._write_meta(path, data)
            drop_unnamed(_data_files(path), lambda: _named_data(path))
            return
        data = f"{path}.{uuid.uuid4().hex[:8]}.faiss"
        folder = os.path.dirname(path) or "."
        name = re.escape(os.path.basename(path))  # killed saves' temps carry other tokens than ours
        remove_stale_temps(folder, re.compile(name + r"\.[0-9a-f]{8}\.faiss\.[0-9a-f]{8}\.tmp"))
        tmp = f"{data}.{uuid.uuid4().hex[:8]}.tmp"
        held = create_locked(tmp)  # held until committed: no other save's cleanup drops it meanwhile
        try:
            try:
                _write_index(faiss, self.index, tmp)
                self.data_crc32 = file_crc32(tmp)
                sidecars.fsync_file(tmp)
                os.replace(tmp, data)
                self._write_meta(path, data)
            except BaseException as exc:
                for f in (tmp, data):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
                if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
                    raise OSError(exc.errno, exc.strerror, data) from exc  # name the data file, not its temp
                raise
            drop_unnamed(_data_files(path), lambda: _named_data(path), own=data)
        finally:
            os.close(held)
        fsync_dir(folder)

    def _write_meta(self, path: str, data: str) -> None:
        params = asdict(self.params)
        chosen = bool(params.pop("nprobe_chosen"))  # beside params: older versions read params as they were
        meta = {"format": FORMAT, "kind": self.kind, "dim": self.dim, "metric": self.metric, "count": len(self),
                "next_id": self.next_id, "removed_seen": self.removed_seen, "params": params, "nprobe_chosen": chosen,
                "factory": self.params.factory(self.dim), "fingerprint": self.fingerprint,
                "fingerprint_rows": self.fingerprint_rows, "source": saved_source(self.source),
                "data": os.path.basename(data), "data_bytes": os.path.getsize(data),
                "data_crc32": getattr(self, "data_crc32", None)}
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> "IvfPqIndex":
        faiss = _faiss()
        for attempt in range(2):  # a writer may replace the data file between our two reads
            meta = _read_meta(path)
            try:
                dim, metric, params = int(meta["dim"]), meta["metric"], IvfPqParams(**meta["params"])
                data = os.path.join(os.path.dirname(path) or ".", os.path.basename(meta["data"]))
                count = int(meta["count"])
                if int(params.nprobe) < 1 or int(params.rerank) < 0:
                    raise ValueError(f"nprobe {params.nprobe}, rerank {params.rerank}")
                chosen = meta.get("nprobe_chosen", meta["params"].get("nprobe_chosen"))
                params = saved_nprobe(params, count, None if chosen is None else bool(chosen))
            except (KeyError, TypeError, ValueError) as exc:
                raise DatabaseError(f"IVF-PQ index {path} is damaged (bad or missing {exc})") from None
            if os.path.isfile(data) or attempt:
                break
        if not os.path.isfile(data) or os.path.getsize(data) != meta.get("data_bytes"):
            raise DatabaseError(f"IVF-PQ index {path}: its data file {data} is missing or does not match")
        crc = meta.get("data_crc32")  # (None: saved before checksums, or re-saved from one)
        if crc is not None and file_crc32(data) != crc:
            raise DatabaseError(f"IVF-PQ index {path} is damaged (its data file {data} does not match the checksum "
                                "its metadata holds)")
        index = faiss.read_index(data, faiss.IO_FLAG_MMAP if mmap else 0)
        if index.ntotal != count or index.d != dim:
            raise DatabaseError(f"IVF-PQ index {path}: {data} holds {index.ntotal} vectors, its metadata says {count}")
        self = cls(index, dim, metric, params, mmap=mmap)
        self.data_file, self.data_crc32 = data, crc  # a memory-mapped index's metadata is re-saved naming it
        self.source, self.next_id = meta.get("source"), int(meta.get("next_id", count))
        self.removed_seen = int(meta.get("removed_seen", 0))
        self.fingerprint, self.fingerprint_rows = meta.get("fingerprint"), int(meta.get("fingerprint_rows", 0))
        return self


def _read_meta(path: str) -> dict:
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"IVF-PQ index {path}: cannot read it ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "ivfpq":
        raise DatabaseError(f"IVF-PQ index {path}: not an ris IVF-PQ index file")
    return meta


def _named_data(path: str) -> str | None:
    """The data file the metadata names; None if unreadable (a damaged index's rebuild must still save)."""
    try:
        name = _read_meta(path).get("data") if os.path.isfile(path) else None
    except DatabaseError:
        return None
    return os.path.join(os.path.dirname(path), os.path.basename(str(name))) if name else None


def _data_files(path: str) -> list[str]:
    """The index's data files (``<path>.<8 hex>.faiss``), named or not; never another index's."""
    return sorted(f for f in glob.glob(glob.escape(path) + ".*.faiss")
                  if re.fullmatch(r"\.[0-9a-f]{8}\.faiss", f[len(path):]))


def _sample_rows(features, n_rows: int, seed: int = 0) -> np.ndarray:
    """A sorted random sample of rows, read in blocks (h5py wants increasing indices)."""
    n = int(features.shape[0])
    rows = np.arange(n) if n_rows >= n else np.sort(np.random.default_rng(seed).choice(n, n_rows, replace=False))
    out = np.empty((len(rows), int(features.shape[1])), np.float32)
    for s in range(0, len(rows), 65536):
        part = rows[s : s + 65536]
        lo, hi = int(part[0]), int(part[-1]) + 1
        out[s : s + len(part)] = np.asarray(features[lo:hi], np.float32)[part - lo] if hi - lo <= 4 * len(part) \
            else np.asarray(features[part], np.float32)
    return out


def _tuned(index):
    """Training settings: no polysemous training (the factory's default for IVF-PQ: minutes of
    annealing we never use), 20 OPQ iterations instead of 50 (the rotation has mostly settled)."""
    faiss = _faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = 20
    return index


def build_ivfpq(features, metric: str, source: dict | None = None, params: IvfPqParams | None = None,
                progress: bool = True, chunk_rows: int = 100_000, where: str = "the database") -> IvfPqIndex:
    """Train on a sample of ``features`` (array or h5py dataset), then add every row, streamed."""
    faiss = _faiss()
    n, dim = int(features.shape[0]), int(features.shape[1])
    if n == 0:
        raise DatabaseError(f"{where}: no images to train an IVF-PQ index on (use --index exact or hnsw)")
    params = params or choose_params(n, dim)
    t0 = time.perf_counter()
    index = IvfPqIndex(_tuned(faiss.index_factory(dim, params.factory(dim))), dim, metric, params)
    sample = index._prep(_sample_rows(features, params.train_rows))
    if progress:
        print(f"ivfpq: training {params.factory(dim)} on {len(sample)} rows", file=sys.stderr, flush=True)
    index.index.train(sample)
    del sample
    index._apply_search_params()
    if progress:
        print(f"ivfpq: trained in {time.perf_counter() - t0:.0f} s; adding {n} rows", file=sys.stderr, flush=True)
    catch_up(index, features, source, chunk_rows=chunk_rows, progress=progress, name="ivfpq")
    return index


def open_ivfpq(req):
    """``--index ivfpq``: the saved index beside the vectors (caught up, or built), memory-mapped.
    A database with no rows (every image removed) has nothing to train on: it answers nothing,
    as every other kind does, and the index is built once rows come back."""
    from ris.index import ExactIndex, open_saved

    if req.rows == 0:
        return ExactIndex(req.features, req.metric)
    path = ivfpq_path(req.vectors_path)
    index = open_saved(req, path, IvfPqIndex.load, lambda: build_ivfpq(
        req.features, req.metric, req.source, params=_rebuilt_params(path, req.features), where=req.vectors_path),
        "ivfpq")
    if index is not None:
        index.stored = StoredRows(req.features)
    return index


def _rebuilt_params(path: str, features) -> IvfPqParams:
    """Parameters for the rows now, keeping the search settings the saved index was given
    (``ris-index build --nprobe/--rerank``): a rebuild is no reason to drop them."""
    try:
        asked = asked_settings(_read_meta(path)) if os.path.isfile(path) else {}
    except DatabaseError:  # unreadable metadata: the defaults
        asked = {}
    params = choose_params(int(features.shape[0]), int(features.shape[1]), **asked)
    params.nprobe = min(int(params.nprobe), int(params.nlist))
    return params


def _write_index(faiss, index, path: str | os.PathLike) -> None:
    """``faiss.write_index`` through a Python file, so that every write and the last flush are
    checked and fail as ``OSError`` (faiss's own writer raised a RuntimeError on a full disk, and
    reports a failed last flush only on stderr, leaving a short file)."""
    failures: list[OSError] = []
    with open(path, "wb") as out:
        def write(chunk: bytes) -> None:
            try:
                out.write(chunk)
            except OSError as exc:
                failures.append(exc)
                raise
        try:
            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        except RuntimeError:
            if failures:
                raise OSError(failures[0].errno, failures[0].strerror, str(path)) from None
            raise
