"""Querying: any image -> the same features as the database -> (head) -> ranked neighbours."""
from __future__ import annotations

import hashlib
import os
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
    from ris.rerank import RERANKERS, dba_database

    p = RERANKERS["dba+qe"].defaults
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
