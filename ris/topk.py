"""Exact nearest-neighbour search in row blocks.

The database may be a NumPy array or an h5py dataset: it is read ``block_rows`` rows at a
time, so memory stays at O(block_rows x dim + queries x k) and no N x N matrix is ever built.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Metric = Literal["euclidean", "cosine"]
METRICS: tuple[str, ...] = ("euclidean", "cosine")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def pairwise_distances(q: np.ndarray, d: np.ndarray, metric: Metric) -> np.ndarray:
    """Distances between every row of ``q`` and every row of ``d`` (one GEMM)."""
    q = np.asarray(q, dtype=np.float32)
    d = np.asarray(d, dtype=np.float32)
    if metric == "cosine":
        return 1.0 - l2_normalize(q) @ l2_normalize(d).T
    if metric == "euclidean":
        sq = (q * q).sum(1)[:, None] - 2.0 * (q @ d.T) + (d * d).sum(1)[None, :]
        return np.sqrt(np.maximum(sq, 0.0))
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def _merge_topk(best_d, best_i, new_d, new_i, k):
    cat_d = np.concatenate([best_d, new_d], axis=1)
    cat_i = np.concatenate([best_i, new_i], axis=1)
    sel = np.argpartition(cat_d, min(k, cat_d.shape[1]) - 1, axis=1)[:, :k]
    return np.take_along_axis(cat_d, sel, 1), np.take_along_axis(cat_i, sel, 1)


def blockwise_topk(
    queries: np.ndarray,
    database,
    k: int,
    metric: Metric = "euclidean",
    block_rows: int = 65536,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (distances, indices) of the ``k`` nearest database rows for every query, sorted.

    Ties are broken by the lower database index, so results are deterministic.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    n = int(database.shape[0])
    k = int(min(k, n))
    nq = queries.shape[0]
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if k == 0:
        return out_d, out_i
    for start in range(0, n, block_rows):
        block = np.asarray(database[start : start + block_rows], dtype=np.float32)
        for qs in range(0, nq, query_block):
            qe = min(qs + query_block, nq)
            dist = pairwise_distances(queries[qs:qe], block, metric)
            kk = min(k, dist.shape[1])
            part = np.argpartition(dist, kk - 1, axis=1)[:, :kk]
            bd = np.take_along_axis(dist, part, 1)
            out_d[qs:qe], out_i[qs:qe] = _merge_topk(out_d[qs:qe], out_i[qs:qe], bd, part + start, k)
    # final sort by (distance, index) for deterministic order
    rows = np.arange(nq)[:, None]
    order = np.argsort(out_i, axis=1, kind="stable")
    out_d, out_i = out_d[rows, order], out_i[rows, order]
    order = np.argsort(out_d, axis=1, kind="stable")
    return out_d[rows, order], out_i[rows, order]
