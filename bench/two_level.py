"""Coarse cells by a two-level k-means, for ``bench/index_scale.py --two-level K1`` (bench-side).

faiss trains an IVF index's coarse cells with one k-means of nlist centroids: at 16,384 cells over
262,144 training rows of 192 dimensions that is ~25 x 1.6e12 flops, most of a 1M-row build on one
shared core (bench/README.md, 2026-12-03). Two levels (K1 centroids, then each group's rows split
into a share of the cells proportional to its size) cost ~nlist/K1 times less.
"""
from __future__ import annotations

import time

import numpy as np


def allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` centroids over groups in proportion to their rows (largest remainder), at
    least one and at most its rows per non-empty group."""
    if not (sizes > 0).sum() <= total <= sizes.sum():
        raise ValueError(f"cannot split {total} centroids over {(sizes > 0).sum()} groups of {sizes.sum()} rows")
    share = sizes / sizes.sum() * total
    k = np.minimum(np.maximum(np.floor(share).astype(int), (sizes > 0).astype(int)), sizes)
    order = np.argsort(-(share - np.floor(share)))
    while k.sum() != total:
        step = 1 if k.sum() < total else -1
        for j in (order if step > 0 else order[::-1]):
            if k.sum() == total:
                break
            if (step > 0 and k[j] < sizes[j]) or (step < 0 and k[j] > 1):
                k[j] += step
    return k


def two_level_centroids(x: np.ndarray, nlist: int, k1: int, seed: int = 1) -> np.ndarray:
    """Coarse centroids by a two-level k-means: ``k1`` centroids over ``x``, then each group's rows
    clustered into a share of ``nlist`` proportional to its size. ~nlist/k1 times less work than
    one k-means of ``nlist`` centroids (bench-side; ris trains one flat k-means)."""
    import faiss

    d = x.shape[1]
    top = faiss.Kmeans(d, k1, niter=25, seed=seed)
    top.train(x)
    assign = top.index.search(x, 1)[1][:, 0]
    ks = allocate(np.bincount(assign, minlength=k1), nlist)
    out = []
    for j in range(k1):
        sub = np.ascontiguousarray(x[assign == j])
        if ks[j] == 0:
            continue
        if ks[j] >= len(sub):
            out.append(sub[: ks[j]])
            continue
        km = faiss.Kmeans(d, int(ks[j]), niter=25, seed=seed + 1 + j)
        km.cp.min_points_per_centroid = 1  # ~16 rows per centroid, as in the flat k-means it replaces
        km.train(sub)
        out.append(km.centroids)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def patch_two_level(k1: int, log: dict) -> None:
    """Make ``build_ivfpq`` train its coarse quantizer with ``two_level_centroids``: the OPQ rotation
    is trained first on the same sample, the centroids are added to the (HNSW) quantizer, and faiss's
    own training then skips the coarse k-means (a quantizer already holding nlist centroids) and
    trains only the PQ codebooks on the residuals."""
    import ris.faiss_index as fi

    faiss = fi._faiss()
    tuned, sample_rows, held = fi._tuned, fi._sample_rows, {}

    def _tuned(index):
        held["index"] = tuned(index)
        return held["index"]

    def _sample_rows(features, n_rows, seed=0):
        x = sample_rows(features, n_rows, seed)
        index, t0 = held["index"], time.perf_counter()
        xt = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                vt = index.chain.at(i)
                if not vt.is_trained:
                    vt.train(xt)
                xt = np.ascontiguousarray(vt.apply(xt), dtype=np.float32)
        log["transform_seconds"] = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        t0 = time.perf_counter()
        cents = two_level_centroids(xt, int(ivf.nlist), k1)
        ivf.quantizer.add(cents)
        log["coarse_seconds"] = time.perf_counter() - t0
        log["coarse_centroids"] = int(ivf.quantizer.ntotal)
        return x

    fi._tuned, fi._sample_rows = _tuned, _sample_rows
