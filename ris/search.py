"""Querying: any image -> the same features as the database -> (head) -> ranked neighbours."""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from ris.errors import BadChoice, BadImage, DatabaseError, yes_no
from ris.jpeg_noise import said
from ris.query_input import IN_MEMORY, QueryImage, encoded, file_name, pil_pixels
from ris.row_views import RowLabels
from ris.rotations import check_rerank
from ris.topk import warn_nonfinite


@dataclass
class Hit:
    """One result: ``rank`` 1 = nearest; ``distance`` smaller = more alike (a re-ranking's score with
    ``rerank``); ``image_id`` as stored (its path under the dataset folder); ``label`` '' if none."""

    rank: int
    distance: float
    image_id: str
    path: str
    label: str


class SearchEngine:
    """Holds the extractor, optional head and the (embedded) database for repeated queries.

    Keeps HDF5 files open for streamed reads: ``close()`` them, or use it as a context manager.
    ``rotations``: describe every query image at 0/90/180/270 degrees and let each database image
    keep its best distance (``ris.rotations``; four forward passes per query).
    """

    def __init__(self, features_db: str | Path, model: str | Path | None = None, index: str = "auto",
                 dataset_root: str | Path | None = None, rerank: str = "none",
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), rotations: bool = False):
        from ris.featuredb import FeatureDB
        from ris.index import check_kind
        from ris.rerank import check_method

        check_method(rerank)  # misspelt names refused before anything is opened (ris.open_database)
        check_kind(index)
        self.rotations, self.log = yes_no("rotations", rotations), log  # log: a query file's warnings too (embed_query)
        if self.rotations:
            check_rerank(rerank)
        self._files: list = []  # cache files opened for streamed reads
        self.db = FeatureDB(features_db)
        try:
            self._setup(features_db, model, index, dataset_root, rerank, log)
        except BaseException:
            self.close()
            raise

    def _setup(self, features_db, model, index, dataset_root, rerank, log) -> None:
        from ris.extractor import FeatureExtractor

        self.root = Path(dataset_root or self.db.dataset_root or ".")
        self.head = None
        self.meta: dict = {}
        self.metric = "euclidean"
        if model is not None:
            from ris.modelio import check_compatible, load_model

            self.head, meta = load_model(model)
            self.meta = meta
            check_compatible(meta, self.db.fingerprint(), str(features_db))
            self.metric = meta.get("distance", "euclidean")
        self.extractor = FeatureExtractor.from_attrs(self.db.attrs)
        self.vectors, vectors_path, source = self._database_vectors(model)
        self.vectors_path = vectors_path  # the database, or a head's embedding cache: indexes live beside it
        from ris.index import open_search_index
        from ris.index_state import source_of

        self.index = open_search_index(vectors_path, self.vectors, self.metric, kind=index,
                                       source=source_of(self.db, source))  # stable ids: follows removals
        self.reranker = None
        if rerank != "none":  # graph/DBA methods prepare the whole database once, in memory
            from ris.dba_cache import cached_dba
            from ris.rerank import Reranker

            vectors = np.asarray(self.vectors[:], np.float32)
            augmented = (cached_dba(vectors_path, vectors, self.index, key=source["key"])
                         if rerank == "dba+qe" else None)
            self.reranker = Reranker(vectors, rerank, self.metric, augmented=augmented)
        self.image_ids = self.db.row_names()  # read on demand: ~1 GB as a list at 10M rows
        self.unrankable = warn_nonfinite(self.vectors, self.image_ids, str(features_db), log)
        self.labels = RowLabels(self.db.labels, self.db.label_names)

    def close(self) -> None:
        """Closes its files (and a Milvus client); a second close does nothing, a query then is a RisError."""
        self.closed = True
        rows = self.__dict__.pop("_rows", None)
        if rows is not None:
            rows.close()
        index, self.index = self.__dict__.get("index"), None
        if hasattr(index, "close"):  # a Milvus client: Milvus Lite locks its file until closed
            index.close()
        for f in self._files:
            f.close()
        self._files.clear()
        self.db.close()

    def __enter__(self) -> "SearchEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _database_vectors(self, model):
        """(vectors, path their index is saved beside, their content key): raw (pooled) database
        features, or their head embeddings, cached beside the database under the database's
        content key and the model file's hash (a re-extracted database never reuses them)."""
        import h5py

        from ris.sidecars import embeddings_path, file_hash, write_h5_cache
        from ris.embed import embed_features, raw_descriptors

        feats = self.db.features
        source = {"content_id": self.db.content_id, "history": self.db.content_history, "vectors": "raw",
                  "key": self.db.content_key}
        if self.head is None:
            # stored conv maps are GAP-pooled in memory: store pooled features for large collections
            return (raw_descriptors(np.asarray(feats)) if feats.ndim == 4 else feats), str(self.db.path), source
        model_hash = file_hash(model)
        cache = embeddings_path(self.db.path, model_hash)
        source.update(vectors=f"emb-{model_hash}", key=f"{self.db.content_key}|model={model_hash}", model=str(model))
        if cache.is_file():
            try:
                f = h5py.File(cache, "r")
            except OSError:  # damaged: rebuilt below
                f = None
            if f is not None and f.attrs.get("cache_key") == source["key"] and "embeddings" in f:
                self._files.append(f)
                return f["embeddings"], str(cache), source
            if f is not None:
                f.close()
        shallow = int(self.meta.get("config", {}).get("shallow", 0) or 0)
        if shallow:
            from ris.thumbs import database_thumbnails, with_thumbnails

            thumbs = database_thumbnails(self.db, shallow, self.root, log=self.log)
            emb = np.concatenate([embed_features(self.head, with_thumbnails(feats[s : s + 4096], thumbs[s : s + 4096]))
                                  for s in range(0, len(self.db), 4096)])
        else:
            emb = embed_features(self.head, feats)
        try:
            write_h5_cache(cache, source["key"], embeddings=emb)
        except OSError:  # read-only next to the database: use them uncached
            return emb, str(cache), source
        f = h5py.File(cache, "r")
        self._files.append(f)
        return f["embeddings"], str(cache), source

    def _copies(self, img: np.ndarray, rotations: bool | None = None) -> np.ndarray:
        """(1 or 4, S, S, 3): the square query image, and its turned copies with ``rotations``
        (None: the engine's own setting)."""
        if not (self.rotations if rotations is None else rotations):
            return img[None]
        from ris.rotations import turned

        return turned(img[None])

    def _describe(self, img: np.ndarray, thumb_of: Callable[[int], np.ndarray],
                  rotations: bool | None = None) -> np.ndarray:
        """Query vector(s) of the network input ``img`` (its turned copies too with ``rotations``);
        ``thumb_of(side)``: the same image at ``side`` px for a head with a thumbnail branch."""
        from ris.embed import embed_features, raw_descriptors

        vec = self.extractor.embed(self._copies(img, rotations))
        if self.vectors.ndim == 2 and vec.ndim == 4 and self.head is None:
            vec = raw_descriptors(vec)
        if self.head is not None:
            shallow = int(self.meta.get("config", {}).get("shallow", 0) or 0)
            if shallow:
                from ris.thumbs import with_thumbnails

                vec = with_thumbnails(vec, self._copies(thumb_of(shallow), rotations))
            vec = embed_features(self.head, vec)
        return vec

    def embed_query(self, image_path: str | bytes | Path | BinaryIO) -> np.ndarray:
        """(1, D) query vector, or (4, D) with ``rotations`` (turned by 0/90/180/270 degrees), of an image
        file named (bytes: as ``os.listdir(b'.')`` names it) or given as its bytes or a binary file object
        (``ris.query_input``). libjpeg's warnings are said through ``log`` (``ris.jpeg_noise.said``)."""
        from ris.images import load_image

        self._check_open()
        data = encoded(image_path)
        name = IN_MEMORY if data is not None else file_name(image_path)
        with said(name, self.log):
            return self._describe(load_image(name, self.extractor.max_size, self.extractor.aspect, data),
                                  lambda side: load_image(name, side, data=data))

    def _query_vector(self, image) -> np.ndarray:  # embed_array of an array or a PIL Image's pixels
        image = image if (pixels := pil_pixels(image)) is None else pixels
        return self.embed_array(image) if isinstance(image, np.ndarray) else self.embed_query(image)

    def _search_vectors(self, vec: np.ndarray, k: int, reranker=None,
                        query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(1, k) distances and rows of ONE query given as its (V, D) copies: V = 1, or the turned
        copies, each row keeping its best distance over them (``ris.rotations.merge_best``)."""
        variants = len(vec)
        if reranker is not None:
            return reranker.search(vec, k, query_rows=query_rows, variants=variants)
        from ris.rotations import merge_best
        from ris.topk import exact_shown

        dist, idx = self.index.search(vec, k) if variants == 1 else merge_best(*self.index.search(vec, k), k)
        if getattr(self.index, "exact_distances", False):  # IVF-PQ re-ranked them already
            return dist, idx
        return exact_shown(vec, dist, idx, self._stored_rows().read, self.metric)

    def _stored_rows(self):
        """A pread reader of the vectors' rows, made on first use (``ris.stored_rows``)."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            from ris.stored_rows import StoredRows

            rows = self.__dict__["_rows"] = StoredRows(self.vectors)
        return rows

    def _check_open(self) -> None:
        if self.__dict__.get("closed"):
            raise DatabaseError(f"{self.db.path}: this SearchEngine is closed; open the database again")

    def _usable(self, k) -> int:
        """``k`` as a count of results, and the engine still open; else a RisError saying which."""
        self._check_open()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadChoice(f"k must be a whole number of results, 1 or more, not {k!r}")
        return int(k)

    def query(self, image_path: QueryImage, k: int = 12) -> list[RowHit]:
        """The ``k`` nearest database images (never rows without finite features) to an image: a file name,
        its bytes, a binary file object, a PIL Image or an RGB uint8 array (``ris.query_input``)."""
        k = self._usable(k)
        vec = self._query_vector(image_path)
        if not np.isfinite(vec).all():
            named = isinstance(image_path, (str, os.PathLike))
            raise BadImage(f"{image_path if named else 'the query image'}: its features are not finite (NaN/inf); "
                           "it cannot be ranked")
        dist, idx = self._search_vectors(vec, k, self.reranker)
        keep = [(float(d), int(i)) for d, i in zip(dist[0], idx[0]) if i >= 0 and np.isfinite(d)]
        names = _names_of(self.image_ids, [i for _, i in keep])
        return [RowHit(r, d, name, str(self.root / name), self.labels[i], i)
                for r, ((d, i), name) in enumerate(zip(keep, names), 1)]

    # --- serving (ris-serve): queries by decoded image or database row; a grown database -------
    def embed_array(self, rgb: np.ndarray, rotations: bool | None = None) -> np.ndarray:
        """The query vector of an already decoded RGB uint8 image (H, W, 3), made as ``embed_query``
        makes it from a file. Why: the HTTP service decodes uploads itself, after its own checks,
        and never writes them to disk. Decode JPEGs with ``target=self.query_size`` to match.
        ``rotations``: this query's turned copies too, or not (None: the engine's setting)."""
        from ris.aspect import resize_input
        from ris.images import checked_rgb, resize_square

        self._check_open()
        rgb = checked_rgb(rgb)
        return self._describe(resize_input(rgb, self.extractor.max_size, self.extractor.aspect),
                              lambda side: resize_square(rgb, side), rotations)

    @property
    def query_size(self) -> int:
        """Side (px) a query image is decoded at (reduced JPEG decoding stops at it)."""
        return int(self.extractor.max_size)

    def row_vector(self, row: int) -> np.ndarray:
        """(1, D) search vector of database row ``row`` (its head embedding with a model)."""
        self._check_open()
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):  # int(5.5) would answer for row 5
            raise BadChoice(f"row must be a whole number, a database row, not {row!r}")
        row = int(row)
        if not 0 <= row < len(self.image_ids):
            raise BadChoice(f"row {row} is not in the database (0..{len(self.image_ids) - 1})")
        return np.asarray(self.vectors[row : row + 1], dtype=np.float32)

    def reranker_for(self, method: str):
        """The database prepared for re-ranking method ``method`` (None for 'none'): made on first
        use and kept, so one engine can serve every method a request asks for."""
        if method == "none":
            return None
        if self.rotations:
            check_rerank(method)
        if self.reranker is not None and self.reranker.method == method:
            return self.reranker
        with _SERVE_LOCK:
            cache = self.__dict__.setdefault("_rerankers", {})
            if method not in cache:
                import h5py

                from ris.dba_cache import cached_dba
                from ris.rerank import Reranker

                vectors = np.asarray(self.vectors[:], np.float32)
                augmented = None
                if method == "dba+qe":  # the cache ris-search uses: same file, same content key
                    on_disk = isinstance(self.vectors, h5py.Dataset)
                    path = self.vectors.file.filename if on_disk else str(self.db.path)
                    key = self.vectors.file.attrs.get("cache_key") if on_disk and path != str(self.db.path) else None
                    augmented = cached_dba(path, vectors, self.index, key=key or self.db.content_key)
                cache[method] = Reranker(vectors, method, self.metric, augmented=augmented)
            return cache[method]

    def neighbours(self, vec: np.ndarray, k: int, rerank: str = "none",
                   exclude_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows), best first, of one query vector (or its (4, D) turned copies, made with
        ``rotations``); ``exclude_row`` (the query's own row in a search by row) is left out of
        the results, as are rows without finite features. A query vector that is not finite is a
        ``BadImage``: no distance to it means anything."""
        k = self._usable(k)
        if not np.isfinite(vec).all():
            raise BadImage("the query's features are not finite (NaN/inf); it cannot be ranked")
        if len(np.atleast_2d(vec)) > 1:  # turned copies, asked for by this query
            check_rerank(rerank)
        n = len(self.image_ids)
        k = max(0, min(k, n - (exclude_row is not None)))
        if k == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        reranker = self.reranker_for(rerank)
        rows = None if exclude_row is None else np.array([exclude_row])
        dist, idx = self._search_vectors(np.atleast_2d(vec), k if reranker is not None else k + (exclude_row is not None),
                                         reranker, rows)
        dist, idx = np.asarray(dist[0], np.float32), np.asarray(idx[0], np.int64)
        keep = (idx >= 0) & np.isfinite(dist)
        if exclude_row is not None:
            keep &= idx != exclude_row
        return dist[keep][:k], idx[keep][:k]

    def hits(self, dist: np.ndarray, rows: np.ndarray) -> list["RowHit"]:
        names = _names_of(self.image_ids, rows)
        return [RowHit(r, float(d), name, str(self.root / name), self.labels[int(i)], int(i))
                for r, (d, i, name) in enumerate(zip(dist, rows, names), 1)]

    def search(self, image, k: int = 12, rerank: str = "none") -> list["RowHit"]:
        """Top ``k`` for any image ``query`` takes (in-process ``ris-serve``), re-ranked by ``rerank``."""
        vec = self._query_vector(image)
        return self.hits(*self.neighbours(vec, k, rerank))

    def search_row(self, row: int, k: int = 12, rerank: str = "none") -> list["RowHit"]:
        """Top ``k`` other rows for database row ``row`` ("more like this"; no image decoding)."""
        return self.hits(*self.neighbours(self.row_vector(row), k, rerank, exclude_row=int(row)))

    def refreshed(self, model: str | Path | None = None, index: str = "auto",
                  dataset_root: str | Path | None = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> "SearchEngine":
        """A new engine over the database file as it is now (after ``ris-extract --append``),
        sharing this one's backbone and head, the slow parts to load; a saved HNSW index follows
        as in ``__init__``. ``model``, ``index``, ``dataset_root``: as this engine was made with."""
        from ris.featuredb import FeatureDB
        from ris.index import open_search_index
        from ris.index_state import source_of

        db = FeatureDB(self.db.path)
        if db.fingerprint() != self.db.fingerprint():
            db.close()
            raise DatabaseError(f"{self.db.path}: the database was rebuilt with different features; restart")
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_rerankers", "_rows", "closed")})
        new.db, new._files, new.index = db, [], None  # its own files and index: closing one engine never closes the other's
        try:
            new.root = Path(dataset_root or db.dataset_root or ".")
            new.vectors, vectors_path, source = new._database_vectors(model)
            new.vectors_path = vectors_path
            new.index = open_search_index(vectors_path, new.vectors, new.metric, kind=index,
                                          source=source_of(db, source))  # stable ids, as in __init__
            new.reranker = None
            if self.reranker is not None:
                new.reranker = new.reranker_for(self.reranker.method)
            new.image_ids = db.row_names()
            new.unrankable = warn_nonfinite(new.vectors, new.image_ids, str(db.path), log)
            new.labels = RowLabels(db.labels, db.label_names)
        except BaseException:
            new.close()
            raise
        return new


def _names_of(image_ids, rows) -> list[str]:
    """Names of ``rows``: one read from a database's ``RowNames``, or a plain list's items."""
    many = getattr(image_ids, "many", None)
    return many(rows) if many is not None else [image_ids[int(i)] for i in rows]


def hits_to_dicts(hits: list[Hit]) -> list[dict]:
    return [asdict(h) for h in hits]


_SERVE_LOCK = threading.Lock()  # lazily prepared re-rankers of every engine


@dataclass
class RowHit(Hit):
    """A hit with its database row (what ``ris-serve`` links thumbnails and "more like this" by)."""

    row: int = -1
