"""The alpha-DBA database of ``--rerank dba+qe``, cached beside the vectors' file (a storage concern
kept out of ``ris.rerank``, which holds the methods)."""
from __future__ import annotations

import numpy as np

from ris.rerank import RERANKERS, dba_database


def cached_dba(vectors_path: str, vectors: np.ndarray, index=None, key: str | None = None) -> np.ndarray:
    """The alpha-DBA database for ``--rerank dba+qe``, made once and kept beside the vectors' file.

    Why: DBA needs every row's nearest neighbours, an O(N^2) pass that would otherwise run on every
    search. The cache is keyed on ``key`` (the content key of the vectors: any change of the
    database or head makes a new one; default: the file's size, mtime and inode) plus the DBA
    parameters, so it is rebuilt, never reused, when either changes. With an HNSW index (large
    collections) the neighbours come from it instead of an exact pass.
    """
    from ris.index import HnswIndex
    from ris.sidecars import dba_path, read_h5_cache, stat_key, write_h5_cache

    p = RERANKERS["dba+qe"].defaults
    n, alpha = int(p["dba_n"]), float(p["dba_alpha"])
    sample = vectors[:: max(1, len(vectors) // 1000)]
    ranks_like_cosine = getattr(index, "metric", "") == "cosine" or np.allclose(
        np.linalg.norm(sample, axis=1), 1.0, atol=1e-3)
    if not (isinstance(index, HnswIndex) and len(index) == len(vectors) and ranks_like_cosine):
        index = None
    neighbours = "hnsw" if index is not None else "exact"
    full_key = (f"{key or stat_key(vectors_path)}|{vectors.shape[0]}x{vectors.shape[1]}"
                f"|dba n={n} alpha={alpha:g}|{neighbours}")
    cache = dba_path(vectors_path, n, alpha)
    cached = read_h5_cache(cache, full_key)
    if cached is not None and "embeddings" in cached:
        return cached["embeddings"]
    augmented = dba_database(vectors, n, alpha, index=index)
    try:
        write_h5_cache(cache, full_key, {"dba_n": n, "dba_alpha": alpha, "neighbours": neighbours},
                       embeddings=augmented)
    except OSError:  # read-only next to the database: it still serves this run
        pass
    return augmented
