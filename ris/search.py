"""Querying: any image -> the same features as the database -> (head) -> ranked neighbours."""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np



@dataclass
class Hit:
    rank: int
    distance: float
    image_id: str
    path: str
    label: str


class SearchEngine:
    """Holds the extractor, optional head and the (embedded) database for repeated queries."""

    def __init__(self, features_db: str | Path, model: str | Path | None = None, index: str = "auto",
                 dataset_root: str | Path | None = None, rerank: str = "none"):
        from ris.extract import FeatureExtractor
        from ris.featuredb import FeatureDB

        self.db = FeatureDB(features_db)
        self.root = Path(dataset_root or self.db.dataset_root or ".")
        self.head = None
        self.meta: dict = {}
        self.metric = "euclidean"
        if model is not None:
            from ris.train import check_compatible, load_model

            self.head, meta = load_model(model)
            self.meta = meta
            check_compatible(meta, self.db.fingerprint(), str(features_db))
            self.metric = meta.get("distance", "euclidean")
        self.extractor = FeatureExtractor.from_attrs(self.db.attrs)
        self.vectors, vectors_path = self._database_vectors(model)
        from ris.index import open_search_index

        self.index = open_search_index(vectors_path, self.vectors, self.metric, kind=index)
        self.reranker = None
        if rerank != "none":  # graph/DBA methods prepare the whole database once, in memory
            from ris.rerank import Reranker

            vectors = np.asarray(self.vectors[:], np.float32)
            augmented = _cached_dba(vectors_path, vectors, self.index) if rerank == "dba+qe" else None
            self.reranker = Reranker(vectors, rerank, self.metric, augmented=augmented)
        self.image_ids = self.db.image_ids
        names = self.db.label_names
        self.labels = [names[l] if 0 <= l < len(names) else "" for l in self.db.labels]

    def _database_vectors(self, model):
        """(vectors, path their index is saved beside): raw (pooled) database features, or their
        head embeddings, cached beside the database."""
        import h5py

        from ris.train import embed_features, raw_descriptors

        feats = self.db.features
        if self.head is None:
            # stored conv maps are GAP-pooled in memory: store pooled features for large collections
            return (raw_descriptors(np.asarray(feats)) if feats.ndim == 4 else feats), str(self.db.path)
        cache = self._embedding_cache_path(model)
        if cache.exists():
            f = h5py.File(cache, "r")
            if f["embeddings"].shape[0] == len(self.db):
                return f["embeddings"], str(cache)
            f.close()
        shallow = int(self.meta.get("config", {}).get("shallow", 0) or 0)
        if shallow:
            from ris.thumbs import database_thumbnails, with_thumbnails

            thumbs = database_thumbnails(self.db, shallow, self.root)
            emb = np.concatenate([embed_features(self.head, with_thumbnails(feats[s : s + 4096], thumbs[s : s + 4096]))
                                  for s in range(0, len(self.db), 4096)])
        else:
            emb = embed_features(self.head, feats)
        _write_h5_atomic(cache, emb)
        return h5py.File(cache, "r")["embeddings"], str(cache)

    def _embedding_cache_path(self, model) -> Path:
        h = hashlib.sha1(Path(model).read_bytes()).hexdigest()[:12]
        return Path(f"{self.db.path}.emb-{h}.h5")

    def embed_query(self, image_path: str | Path) -> np.ndarray:
        from ris.images import load_image
        from ris.train import embed_features

        img = load_image(image_path, self.extractor.max_size)
        vec = self.extractor.embed(img[None])
        if self.vectors.ndim == 2 and vec.ndim == 4 and self.head is None:
            from ris.train import raw_descriptors

            vec = raw_descriptors(vec)
        if self.head is not None:
            shallow = int(self.meta.get("config", {}).get("shallow", 0) or 0)
            if shallow:
                from ris.thumbs import with_thumbnails

                vec = with_thumbnails(vec, load_image(image_path, shallow)[None])
            vec = embed_features(self.head, vec)
        return vec

    def query(self, image_path: str | Path, k: int = 12) -> list[Hit]:
        vec = self.embed_query(image_path)
        if self.reranker is not None:
            dist, idx = self.reranker.search(vec, k)
        else:
            dist, idx = self.index.search(vec, k)
        hits = []
        for r, (d, i) in enumerate(zip(dist[0], idx[0]), 1):
            if i < 0:
                continue
            image_id = self.image_ids[int(i)]
            hits.append(Hit(r, float(d), image_id, str(self.root / image_id), self.labels[int(i)]))
        return hits

    # --- serving (ris-serve): queries by decoded image or database row; a grown database -------
    def embed_array(self, rgb: np.ndarray) -> np.ndarray:
        """The query vector of an already decoded RGB uint8 image (H, W, 3), made as ``embed_query``
        makes it from a file. Why: the HTTP service decodes uploads itself, after its own checks,
        and never writes them to disk. Decode JPEGs with ``target=self.query_size`` to match."""
        from ris.images import resize_square
        from ris.train import embed_features, raw_descriptors

        rgb = np.asarray(rgb, dtype=np.uint8)
        vec = self.extractor.embed(resize_square(rgb, self.extractor.max_size)[None])
        if self.vectors.ndim == 2 and vec.ndim == 4 and self.head is None:
            vec = raw_descriptors(vec)
        if self.head is not None:
            shallow = int(self.meta.get("config", {}).get("shallow", 0) or 0)
            if shallow:
                from ris.thumbs import with_thumbnails

                vec = with_thumbnails(vec, resize_square(rgb, shallow)[None])
            vec = embed_features(self.head, vec)
        return vec

    @property
    def query_size(self) -> int:
        """Side (px) a query image is decoded at (reduced JPEG decoding stops at it)."""
        return int(self.extractor.max_size)

    def row_vector(self, row: int) -> np.ndarray:
        """(1, D) search vector of database row ``row`` (its head embedding with a model)."""
        row = int(row)
        if not 0 <= row < len(self.image_ids):
            raise IndexError(f"row {row} is not in the database (0..{len(self.image_ids) - 1})")
        return np.asarray(self.vectors[row : row + 1], dtype=np.float32)

    def reranker_for(self, method: str):
        """The database prepared for re-ranking method ``method`` (None for 'none'): made on first
        use and kept, so one engine can serve every method a request asks for."""
        if method == "none":
            return None
        if self.reranker is not None and self.reranker.method == method:
            return self.reranker
        with _SERVE_LOCK:
            cache = self.__dict__.setdefault("_rerankers", {})
            if method not in cache:
                import h5py

                from ris.rerank import Reranker

                vectors = np.asarray(self.vectors[:], np.float32)
                path = self.vectors.file.filename if isinstance(self.vectors, h5py.Dataset) else str(self.db.path)
                augmented = _cached_dba(path, vectors, self.index) if method == "dba+qe" else None
                cache[method] = Reranker(vectors, method, self.metric, augmented=augmented)
            return cache[method]

    def neighbours(self, vec: np.ndarray, k: int, rerank: str = "none",
                   exclude_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows), best first, of one query vector; ``exclude_row`` (the query's own
        row in a search by row) is left out of the results."""
        n = len(self.image_ids)
        k = max(0, min(int(k), n - (exclude_row is not None)))
        if k == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        reranker = self.reranker_for(rerank)
        if reranker is not None:
            rows = None if exclude_row is None else np.array([exclude_row])
            dist, idx = reranker.search(vec, k, query_rows=rows)
        else:
            dist, idx = self.index.search(vec, k + (exclude_row is not None))
        dist, idx = np.asarray(dist[0], np.float32), np.asarray(idx[0], np.int64)
        keep = idx >= 0 if exclude_row is None else (idx >= 0) & (idx != exclude_row)
        return dist[keep][:k], idx[keep][:k]

    def hits(self, dist: np.ndarray, rows: np.ndarray) -> list["RowHit"]:
        return [RowHit(r, float(d), self.image_ids[int(i)], str(self.root / self.image_ids[int(i)]),
                       self.labels[int(i)], int(i)) for r, (d, i) in enumerate(zip(dist, rows), 1)]

    def search(self, image, k: int = 12, rerank: str = "none") -> list["RowHit"]:
        """Top ``k`` for an image file path or a decoded RGB array (in-process ``ris-serve``)."""
        if isinstance(image, np.ndarray):
            vec = self.embed_array(image)
        else:
            vec = self.embed_query(image)
        return self.hits(*self.neighbours(vec, k, rerank))

    def search_row(self, row: int, k: int = 12, rerank: str = "none") -> list["RowHit"]:
        """Top ``k`` other rows for database row ``row`` ("more like this"; no image decoding)."""
        return self.hits(*self.neighbours(self.row_vector(row), k, rerank, exclude_row=int(row)))

    def refreshed(self, model: str | Path | None = None, index: str = "auto",
                  dataset_root: str | Path | None = None) -> "SearchEngine":
        """A new engine over the database file as it is now (after ``ris-extract --append``),
        sharing this one's backbone and head, the slow parts to load; a saved HNSW index follows
        as in ``__init__``. ``model``, ``index``, ``dataset_root``: as this engine was made with."""
        from ris.errors import DatabaseError
        from ris.featuredb import FeatureDB
        from ris.index import open_search_index

        db = FeatureDB(self.db.path)
        if db.fingerprint() != self.db.fingerprint():
            db.close()
            raise DatabaseError(f"{self.db.path}: the database was rebuilt with different features; restart")
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_rerankers"})
        new.db = db
        new.root = Path(dataset_root or db.dataset_root or ".")
        new.vectors, vectors_path = new._database_vectors(model)
        new.index = open_search_index(vectors_path, new.vectors, new.metric, kind=index)
        new.reranker = None
        if self.reranker is not None:
            new.reranker = new.reranker_for(self.reranker.method)
        new.image_ids = db.image_ids
        names = db.label_names
        new.labels = [names[l] if 0 <= l < len(names) else "" for l in db.labels]
        return new


def _write_h5_atomic(path: Path, data: np.ndarray, attrs: dict | None = None) -> None:
    import h5py

    tmp = Path(str(path) + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=data, chunks=True)
        f.attrs.update(attrs or {})
    os.replace(tmp, path)


def _cached_dba(vectors_path: str, vectors: np.ndarray, index=None) -> np.ndarray:
    """The alpha-DBA database for ``--rerank dba+qe``, made once and kept beside the vectors' file.

    Why: DBA needs every row's nearest neighbours, an O(N^2) pass that would otherwise run on every
    search. The cache is keyed by the DBA parameters and stamped with the source file's size and
    modification time and the row count, so ``ris-extract --append`` (or a new head) rebuilds it.
    With an HNSW index (large collections) the neighbours come from it instead of an exact pass.
    """
    import h5py

    from ris.index import HnswIndex
    from ris.rerank import DEFAULTS, dba_database

    p = DEFAULTS["dba+qe"]
    n, alpha = int(p["dba_n"]), float(p["dba_alpha"])
    sample = vectors[:: max(1, len(vectors) // 1000)]
    ranks_like_cosine = getattr(index, "metric", "") == "cosine" or np.allclose(
        np.linalg.norm(sample, axis=1), 1.0, atol=1e-3)
    if not (isinstance(index, HnswIndex) and len(index) == len(vectors) and ranks_like_cosine):
        index = None
    st = os.stat(vectors_path)
    stamp = (f"{vectors.shape[0]}x{vectors.shape[1]}:{st.st_size}:{st.st_mtime_ns}:"
             f"{'hnsw' if index is not None else 'exact'}")
    cache = Path(f"{vectors_path}.dba-n{n}-a{alpha:g}.h5")
    if cache.exists():
        try:
            with h5py.File(cache, "r") as f:
                if f.attrs.get("source_stamp") == stamp:
                    return f["embeddings"][:]
        except OSError:  # damaged cache: rebuild it
            pass
    augmented = dba_database(vectors, n, alpha, index=index)
    _write_h5_atomic(cache, augmented, {"source_stamp": stamp, "dba_n": n, "dba_alpha": alpha,
                                        "neighbours": "hnsw" if index is not None else "exact"})
    return augmented


def hits_to_dicts(hits: list[Hit]) -> list[dict]:
    return [asdict(h) for h in hits]


_SERVE_LOCK = threading.Lock()  # lazily prepared re-rankers of every engine


@dataclass
class RowHit(Hit):
    """A hit with its database row (what ``ris-serve`` links thumbnails and "more like this" by)."""

    row: int = -1
