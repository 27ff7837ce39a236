"""The long-lived search state behind ris-serve, free of any web framework.

One ``Generation`` (engine + the file identity it was read from) is current at a time; a
background reload builds the next one from the grown database while the current one keeps
answering, then swaps it in with one assignment. Every method here blocks: the web layer runs
them in worker threads, inside its limiter.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ris.errors import BadImage, RisError
from ris.serve.files import (MAX_FILE_BYTES, ServeError, decode_upload, display_name, media_type, open_regular,
                             row_file, thumbnail_jpeg)


def shown_text(name: str) -> str:
    """A stored name or label as JSON can carry it: a file name that is not UTF-8 (kept with
    surrogate escapes, as the file system gave it) shows U+FFFD where its bytes were not text."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if name else name


RETRY_LOADING_S = 2  # Retry-After while the engine loads or reloads (the page looks again every second)
RERANK_SMALL_DB = 20_000  # above this many rows, only qe is offered by default (the others hold an
                          # N x N kNN pass or graph)


@dataclass
class ServeConfig:
    features_db: str
    model: str | None = None
    index: str = "auto"
    dataset_root: str | None = None
    rerank: tuple[str, ...] | None = None  # None: every method up to RERANK_SMALL_DB rows, else qe
    api_key: str | None = None
    max_upload_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    default_k: int = 12
    max_k: int = 100
    slots: int = 2
    queue: int = 32
    queue_timeout: float = 30.0
    reload_interval: float = 2.0  # seconds between looks at the database file; 0 = never
    thumb_size: int = 256
    thumb_cache: int = 2048  # thumbnails kept in memory (about 15 kB each)
    max_connections: int = 256  # open connections; uvicorn answers 503 beyond (bounds spooled uploads)
    request_timeout: float = 60.0  # seconds to send the headers, and an upload's longest silence; then closed
    min_upload_rate: float = 10_000.0  # bytes/s an upload must average (after request_timeout's grace)
    rotations: bool = False  # uploads described at 0/90/180/270 degrees, each row keeping its best distance
    default_rerank: str = "none"  # the re-ranking of a request that names none (ris-serve --preset accurate: dba+qe)
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered besides localhost and IPs; None = any


def file_stamp(path: str | Path) -> tuple[int, int, int, int]:
    """Identity of the database file: a rename into place (ris-extract) changes the inode."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class StableIds:
    """Rows <-> the database's stable image ids (README "Collections change"): what the API calls
    ``id``, so a shared ``/#id=N`` or a result clicked after ``--sync`` removed earlier images still
    names the same image, and a removed image's id names none. Read on first use (8 bytes a row)."""

    def __init__(self, db) -> None:
        self._db, self._ids, self._lock = db, None, threading.Lock()

    def _array(self) -> np.ndarray:
        with self._lock:
            if self._ids is None:  # increasing: FeatureDB.row_ids refuses a database where they are not
                self._ids = np.asarray(self._db.row_ids, np.int64)
            return self._ids

    def of_rows(self, rows) -> list[int]:
        return self._array()[np.asarray(rows, np.int64)].tolist()

    def row(self, image_id: int) -> int | None:
        ids = self._array()
        at = int(np.searchsorted(ids, image_id))
        return at if at < len(ids) and ids[at] == image_id else None


@dataclass
class Generation:
    engine: Any
    number: int
    stamp: tuple
    loaded_at: float
    rerank: tuple[str, ...]
    seconds: float
    ids: StableIds | None = None
    withdrawn: bool = False  # its file was rewritten in place: its engine is closed


@dataclass
class SearchService:
    cfg: ServeConfig
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        self.current: Generation | None = None
        self.error: str | None = None  # why the first load failed
        self.reload_error: str | None = None
        self.reloading = False
        self.withdrawn: str | None = None  # why no generation is served while the file is reloaded
        self._failed_stamp: tuple | None = None
        self._reload_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------
    def _offered(self, n: int) -> tuple[str, ...]:
        from ris.rerank import RERANKERS

        if self.cfg.rerank is not None:
            offered = tuple(m for m in RERANKERS if m == "none" or m in self.cfg.rerank)
        else:
            offered = tuple(RERANKERS) if n <= RERANK_SMALL_DB else ("none", "qe")
        if self.cfg.rotations:  # scores normalised per query cannot be compared across the turned copies
            offered = tuple(m for m in offered if m == "none" or RERANKERS[m].comparable_scores)
        if self.cfg.default_rerank not in offered:  # asked for by name: offered at any size
            offered = tuple(m for m in RERANKERS if m in offered or m == self.cfg.default_rerank)
        return offered

    @staticmethod
    def _turnable(methods: tuple[str, ...]) -> list[str]:
        """The re-rankings a search with turned copies may use (the page greys out the others)."""
        from ris.rerank import RERANKERS

        return [m for m in methods if RERANKERS[m].comparable_scores]

    def _install(self, engine, stamp: tuple, t0: float) -> Generation:
        number = self.current.number + 1 if self.current else 1
        gen = Generation(engine, number, stamp, time.time(), self._offered(len(engine.image_ids)),
                         round(time.perf_counter() - t0, 2), StableIds(engine.db))
        self.current = gen  # one assignment: requests see the old or the new generation, never a mix
        return gen

    def load(self) -> Generation:
        """Load backbone, head, vectors and index (the slow start); raises RisError on bad input."""
        from ris.search import SearchEngine

        t0 = time.perf_counter()
        stamp = file_stamp(self.cfg.features_db)  # before reading: a change during the load is seen later
        engine = SearchEngine(self.cfg.features_db, self.cfg.model, index=self.cfg.index,
                              dataset_root=self.cfg.dataset_root, rotations=self.cfg.rotations,
                              log=lambda line: self.log(f"ris-serve: {line}"))  # a thumbnail's damaged JPEG
        return self._install(engine, stamp, t0)

    def use_engine(self, engine) -> Generation:
        """Serve an engine made elsewhere (tests, benchmarks)."""
        return self._install(engine, file_stamp(self.cfg.features_db), time.perf_counter())

    def poll(self) -> bool:
        """Reload if the database file changed since the current generation; True if swapped.

        A failed reload keeps the current generation and is not retried until the file changes
        again; a file rewritten in place is another matter (``_reload_in_place``).
        """
        gen = self.current
        if (gen is None and self.withdrawn is None) or not self._reload_lock.acquire(blocking=False):
            return False
        try:
            try:
                stamp = file_stamp(self.cfg.features_db)
            except OSError:
                return False  # being replaced right now: look again next time
            if gen is None or stamp[:2] == gen.stamp[:2] and stamp != gen.stamp:
                if gen is None and stamp == self._failed_stamp:
                    return False  # the same bytes failed to load: wait for the file to change again
                return self._reload_in_place(gen, stamp)
            if stamp == gen.stamp or stamp == self._failed_stamp:
                return False
            self.reloading = True
            t0 = time.perf_counter()
            try:
                engine = gen.engine.refreshed(self.cfg.model, self.cfg.index, self.cfg.dataset_root)
            except Exception as exc:  # keep serving the old generation
                self._failed_stamp, self.reload_error = stamp, f"{type(exc).__name__}: {exc}"
                self.log(f"ris-serve: reload of {self.cfg.features_db} failed, still serving the old rows: {exc}")
                return False
            new = self._install(engine, stamp, t0)
            self.reload_error = None
            self.log(f"ris-serve: reloaded {self.cfg.features_db}: {len(engine.image_ids)} rows "
                     f"(was {len(gen.engine.image_ids)}), {new.seconds} s")
            return True
        finally:
            self.reloading = False
            self._reload_lock.release()

    def _reload_in_place(self, gen: Generation | None, stamp: tuple) -> bool:
        """The file was rewritten in place (``cp new.h5 feats.h5``: same inode), not renamed into
        place as ris-extract does. The served rows are read lazily from that file, so they are no
        longer the rows the index holds: they are withdrawn (503 meanwhile) and the engine closed
        (HDF5 would give a new open of the same file the old one's cached metadata), then the file
        is loaded afresh, and tried again whenever the file changes until it loads (a copy may be
        under way)."""
        if gen is not None:
            self.withdrawn = "the database file was rewritten in place; reloading it"
            self.current = None
            self.log(f"ris-serve: {self.cfg.features_db} was rewritten in place (same inode): its rows are "
                     "withdrawn until it is loaded again (rename a new database into place to swap without a gap)")
            gen.withdrawn = True
            gen.engine.close()
        self.reloading = True
        try:
            self.load()
        except Exception as exc:
            self._failed_stamp, self.reload_error = stamp, f"{type(exc).__name__}: {exc}"
            self.withdrawn = f"the database file was rewritten in place and does not load yet: {exc}"
            return False
        self.withdrawn = self.reload_error = None
        self.log(f"ris-serve: reloaded {self.cfg.features_db}: {len(self.current.engine.image_ids)} rows")
        return True

    # -- state ---------------------------------------------------------------------------
    def generation(self) -> Generation:
        gen = self.current
        if gen is None:
            if self.withdrawn is not None:
                raise ServeError(503, f"{self._public(self.withdrawn)}; retry in a few seconds", RETRY_LOADING_S)
            if self.error is None:
                raise ServeError(503, "the search engine is still loading; retry in a few seconds", RETRY_LOADING_S)
            raise ServeError(503, f"the search engine failed to load: {self.error}")
        return gen

    def health(self) -> dict:
        gen = self.current
        state = "failed" if self.error else "reloading" if self.withdrawn else "loading"
        base = {"status": "ready" if gen else state, "ready": gen is not None,
                "max_upload_bytes": self.cfg.max_upload_bytes, "max_pixels": self.cfg.max_pixels,
                "default_k": self.cfg.default_k, "max_k": self.cfg.max_k, "auth": bool(self.cfg.api_key),
                "default_rerank": self.cfg.default_rerank}
        if gen is None:
            return {**base, "error": self._public(self.error or self.withdrawn)}
        e = gen.engine
        index = type(e.index).__name__
        return {**base, "rows": len(e.image_ids), "model": e.db.attrs.get("model"),
                "head": Path(self.cfg.model).name if self.cfg.model else None,
                "dimension": int(e.vectors.shape[-1]), "metric": e.metric,
                "index": {"ExactIndex": "exact", "HnswIndex": "hnsw", "IvfPqIndex": "ivfpq", "MilvusIndex": "milvus"}.get(index, index),
                "rerank": list(gen.rerank), "rerank_rotations": self._turnable(gen.rerank),
                "rotations": bool(getattr(e, "rotations", False)),
                "labels": e.labels.any() if hasattr(e.labels, "any") else any(e.labels), "generation": gen.number,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(gen.loaded_at)),
                "load_seconds": gen.seconds, "reloading": self.reloading, "reload_error": self._public(self.reload_error),
                "database": Path(self.cfg.features_db).name}

    def _public(self, message: str | None) -> str | None:
        """A load or reload error as /api/health shows it: the server's folders left out (the
        database by its name, as the server log names it in full)."""
        if not message:
            return message
        db = Path(self.cfg.features_db)
        for where in {str(db.resolve()), str(db.absolute()), str(db)}:
            message = message.replace(where, db.name)
        if self.cfg.dataset_root:
            root = Path(self.cfg.dataset_root)
            for where in {str(root.resolve()), str(root.absolute()), str(root)}:
                message = message.replace(where, root.name or ".")
        return message

    # -- searching -----------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _answering(gen: Generation) -> Iterator[None]:
        """A request answered from ``gen`` whose rows were withdrawn meanwhile (the file rewritten
        in place, the engine closed under it) is the withdrawn rows' 503, not a 500 or an answer
        read out of the rewritten file."""
        meanwhile = ServeError(503, "the database file was rewritten in place while this request was answered; "
                                    "retry in a few seconds", RETRY_LOADING_S)
        try:
            yield
        except ServeError:
            raise
        except Exception:
            if gen.withdrawn:
                raise meanwhile from None
            raise
        if gen.withdrawn:
            raise meanwhile

    def _check(self, gen: Generation, k: int, rerank: str) -> None:
        if not 1 <= k <= self.cfg.max_k:
            raise ServeError(422, f"k must be between 1 and {self.cfg.max_k}, not {k}.")
        if rerank not in gen.rerank:
            raise ServeError(400, f"rerank {rerank!r} is not offered here; choose one of {', '.join(gen.rerank)}.")

    def _answer(self, gen: Generation, dist, rows, query: dict, k: int, rerank: str, timing: dict,
                rotations: bool = False) -> dict:  # an id's search: its stored vector, no turned copies
        e = gen.engine
        hits = e.hits(dist, rows)  # names: one read
        results = [{"rank": h.rank, "id": i, "path": shown_text(h.image_id), "distance": round(h.distance, 6) + 0.0,  # + 0.0: never -0.0
                    "label": shown_text(h.label) or None, "image_url": f"/api/images/{i}",
                    "thumb_url": f"/api/thumbs/{i}"} for h, i in zip(hits, gen.ids.of_rows([h.row for h in hits]))]
        return {"query": query, "k": k, "rerank": rerank,
                "score": "distance" if rerank == "none" else "re-ranking score (smaller = better)",
                "metric": e.metric, "results": results, "timing_ms": {n: round(v * 1000, 2) for n, v in timing.items()},
                "database": {"rows": len(e.image_ids), "generation": gen.number}, "rotations": rotations}

    def search_upload(self, data: bytes, filename: str | None, k: int, rerank: str | None = None,
                      rotations: bool | None = None) -> dict:
        """``rerank``: None = the service's default re-ranking. ``rotations``: describe this upload
        at 0/90/180/270 degrees too (None: the service's --rotations); refused with a re-ranker
        whose scores cannot be compared across the copies."""
        rerank = self.cfg.default_rerank if rerank is None else rerank
        gen = self.generation()
        self._check(gen, k, rerank)
        e = gen.engine
        rotations = bool(getattr(e, "rotations", False) if rotations is None else rotations)
        if rotations:
            from ris.rotations import check_rerank

            try:
                check_rerank(rerank)
            except RisError:
                raise ServeError(400, f"rerank {rerank!r} cannot rank turned copies (its scores are normalised "
                                      "per query); search without turned copies or choose another re-ranking.") from None
        t0 = time.perf_counter()
        rgb, facts = decode_upload(data, e.query_size, self.cfg.max_pixels, filename)
        t1 = time.perf_counter()
        for warning in facts.get("warnings", ()):  # libjpeg's, named as ris-extract names them
            self.log(f"ris-serve: warning: {display_name(filename, 'upload')}: {warning}")
        with self._answering(gen):
            vec = e.embed_array(rgb, rotations=rotations)
            t2 = time.perf_counter()
            try:
                dist, rows = e.neighbours(vec, k, rerank)
            except BadImage as exc:
                raise ServeError(422, f"{display_name(filename)}: {exc}.") from None
            t3 = time.perf_counter()
            query = {"kind": "upload", "filename": display_name(filename, "upload"), **facts}
            return self._answer(gen, dist, rows, query, k, rerank,
                                {"decode": t1 - t0, "embed": t2 - t1, "search": t3 - t2, "total": t3 - t0}, rotations)

    def search_row(self, image_id: int, k: int, rerank: str | None = None) -> dict:
        """"More like this": the image whose stable id is ``image_id`` queries the rest."""
        rerank = self.cfg.default_rerank if rerank is None else rerank
        gen = self.generation()
        self._check(gen, k, rerank)
        e = gen.engine
        row = self._row_of(gen, image_id)
        t0 = time.perf_counter()
        with self._answering(gen):
            dist, rows = e.neighbours(e.row_vector(row), k, rerank, exclude_row=row)
            t1 = time.perf_counter()
            query = {"kind": "id", "id": image_id, "path": shown_text(e.image_ids[row]),
                     "label": shown_text(e.labels[row]) or None,
                     "image_url": f"/api/images/{image_id}", "thumb_url": f"/api/thumbs/{image_id}"}
            return self._answer(gen, dist, rows, query, k, rerank, {"search": t1 - t0, "total": t1 - t0})

    # -- database files ------------------------------------------------------------------
    @staticmethod
    def _row_of(gen: Generation, image_id: int) -> int:
        row = gen.ids.row(image_id)
        if row is None:
            raise ServeError(404, f"no image with id {image_id} in the database (removed, or never added).")
        return row

    def image_path(self, image_id: int) -> tuple[Path, Path, str]:
        """(collection root, checked path, stored relative path) of an image, by its stable id."""
        gen = self.generation()
        with self._answering(gen):
            rel = gen.engine.image_ids[self._row_of(gen, image_id)]
        root = Path(gen.engine.root)
        return root, row_file(root, rel, image_id), rel

    def image(self, image_id: int) -> tuple[int, int, str, str]:
        """(open fd, size, media type, file name) of an image of the database, by its stable id, checked."""
        root, path, rel = self.image_path(image_id)
        fd, size = open_regular(root, path, rel, image_id)
        return fd, size, media_type(path), Path(rel).name

    def thumbnail(self, image_id: int) -> bytes:
        root, path, rel = self.image_path(image_id)
        fd, _ = open_regular(root, path, rel, image_id)  # the file as opened is the one cached (fstat)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (str(path), st.st_size, st.st_mtime_ns, self.cfg.thumb_size)
            with self._thumbs_lock:
                if key in self._thumbs:
                    self._thumbs.move_to_end(key)
                    return self._thumbs[key]
            data = fh.read(MAX_FILE_BYTES)
        jpeg = thumbnail_jpeg(data, self.cfg.thumb_size, rel, image_id)
        with self._thumbs_lock:
            self._thumbs[key] = jpeg
            while len(self._thumbs) > self.cfg.thumb_cache:
                self._thumbs.popitem(last=False)
        return jpeg
