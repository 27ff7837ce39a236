"""Zhong et al.'s k-reciprocal re-ranking (CVPR 2017) on kNN lists: the index behind
``ris.rerank``'s ``kreciprocal`` method, in bounded memory (no N x N matrix)."""
from __future__ import annotations

import numpy as np
from scipy import sparse

from ris.rerank import KNN_BLOCKS, _query_block, _topk_sorted
from ris.topk import blockwise_topk, l2_normalize, pairwise_distances


class KReciprocalIndex:
    """Zhong et al.'s k-reciprocal encoding, on kNN lists instead of the full distance matrix.

    Offline, every database row gets its sparse encoding ``V`` (weights on its expanded
    k-reciprocal set) from its top ``k1 + 1`` list; a query only needs its own (b, N) distance row,
    so the Jaccard distance is exact against every database item (items sharing no neighbour get 1).
    A database row as query reproduces the full-matrix algorithm. An out-of-database query is
    treated as inserted (``_inserted_sum_min``): ``q`` is reciprocal to ``g`` when it would enter
    ``g``'s top ``k1 + 1`` list, i.e. ``d(g, q) <= d(g, g's k1-th neighbour)``.
    """

    def __init__(self, database: np.ndarray, metric: str = "euclidean", k1: int = 20, k2: int = 6,
                 lam: float = 0.3):
        self.db, self.metric, self.lam = database, metric, float(lam)
        n = len(database)
        self.k1 = int(min(k1, n - 1))
        self.kh = int(min(max(1, round(k1 / 2)), self.k1))
        self.k2 = int(max(1, min(k2, self.k1 + 1)))
        self.knn, self.knn_d, self.rowmax = self._knn_and_rowmax(self.k1 + 1)
        recip = self._reciprocal(self.k1)
        half_fwd = self.knn[:, : self.kh + 1]
        self.half = np.where(self._reciprocal(self.kh), half_fwd, -1)  # R(c, k1/2), -1 padded
        enc = [self._encode(self.knn[i][recip[i]], self._pair_dist(i)) for i in range(n)]
        self.z = np.array([w.sum() for _, w in enc], np.float32)  # normalisers, for inserted queries
        self.v0 = _rows_to_csr([(c, w / max(float(w.sum()), 1e-12)) for c, w in enc], n)
        self.v0_csc = self.v0.tocsc()
        # local query expansion: mean encoding over the top k2 (self included)
        self.qe = sparse.csr_matrix((np.full(n * self.k2, 1.0 / self.k2, np.float32),
                                     (np.repeat(np.arange(n), self.k2), self.knn[:, : self.k2].ravel())), shape=(n, n))
        self.qe_csc = self.qe.tocsc()  # which rows average a given row
        self.v = (self.qe @ self.v0).tocsr()
        self.v_csc = self.v.tocsc()

    def dist(self, q: np.ndarray) -> np.ndarray:
        """The re-ranking distance: squared euclidean (original code) or cosine."""
        d = pairwise_distances(q, self.db, self.metric)
        return d * d if self.metric == "euclidean" else d

    def _knn_and_rowmax(self, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``k`` lists (self included) and each row's largest distance, which scales it."""
        n = len(self.db)
        dd, idx = blockwise_topk(self.db, self.db, k, self.metric, **KNN_BLOCKS)
        if self.metric == "euclidean":
            dd = dd * dd
        rowmax = np.empty(n, np.float32)
        b = _query_block(n, block)
        if self.metric == "euclidean":  # max_j |x_i - x_j|^2 = |x_i|^2 + max_j (|x_j|^2 - 2 x_i.x_j)
            sq = np.einsum("ij,ij->i", self.db, self.db)
            for s in range(0, n, b):
                g = self.db[s : s + b] @ self.db.T
                g *= -2.0
                g += sq
                rowmax[s : s + b] = g.max(axis=1) + sq[s : s + b]
        else:
            unit = l2_normalize(self.db)
            for s in range(0, n, b):
                rowmax[s : s + b] = 1.0 - (unit[s : s + b] @ unit.T).min(axis=1)
        return idx, dd, np.maximum(rowmax, 1e-12)

    def _reciprocal(self, k: int, chunk: int = 2048) -> np.ndarray:
        """mask[i, j]: is ``i`` in the top ``k + 1`` list of its ``j``-th neighbour?"""
        n = len(self.knn)
        fwd = self.knn[:, : k + 1]
        out = np.empty(fwd.shape, bool)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out[s:e] = (self.knn[fwd[s:e], : k + 1] == np.arange(s, e)[:, None, None]).any(axis=2)
        return out

    def _pair_dist(self, row: int):
        """Normalised distances from one database row to a few others."""
        def dist(cols: np.ndarray) -> np.ndarray:
            a, b = self.db[row], self.db[cols]
            if self.metric == "euclidean":
                d = ((b - a[None, :]) ** 2).sum(1)
            else:
                d = 1.0 - l2_normalize(b) @ l2_normalize(a)
            return d / self.rowmax[row]
        return dist

    def _encode(self, recip_set: np.ndarray, dist) -> tuple[np.ndarray, np.ndarray]:
        """(columns, unnormalised weights exp(-d)) over the reciprocal set, grown by every
        candidate's R(c, k1/2) set that lies 2/3 inside it."""
        h = self.half[recip_set]
        valid = h >= 0
        ok = (np.isin(h, recip_set) & valid).sum(1) > (2.0 / 3.0) * valid.sum(1)
        cols = np.unique(np.concatenate([recip_set, h[ok][valid[ok]]]))
        return cols, np.exp(-dist(cols)).astype(np.float32)

    def scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(b, N) final distances; ``rows[i] >= 0`` marks a query that is that database row."""
        d = self.dist(queries)
        dn = d / np.maximum(d.max(axis=1, keepdims=True), 1e-12)
        out = np.empty_like(dn)
        for i in range(len(queries)):
            if rows[i] >= 0:
                enc = self.v[rows[i]]
                smin = self._sum_min(enc.indices, enc.data)
            else:
                smin = self._inserted_sum_min(d[i], dn[i])
            jac = 1.0 - smin / (2.0 - smin)
            out[i] = (1.0 - self.lam) * jac + self.lam * dn[i]
        return out

    def _sum_min(self, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """sum_c min(v[c], V[g, c]) for every database row g, through V's columns (inverted index)."""
        sub = self.v_csc[:, cols]
        mins = np.minimum(sub.data, np.repeat(vals, np.diff(sub.indptr)))
        return np.bincount(sub.indices, weights=mins, minlength=len(self.db))

    def _inserted_sum_min(self, d: np.ndarray, dn: np.ndarray) -> np.ndarray:
        """``_sum_min`` for an out-of-database query, as if it were inserted as one more node:
        it gets its own column (weight exp(0)); its reciprocal neighbours (reciprocity is
        symmetric) gain a weight on that column and are renormalised; rows whose top-k2 list the
        query enters, or that average a changed neighbour, get their expanded encoding recomputed.
        Not updated: other rows' reciprocal sets and expansions, and the row maxima."""
        n = len(self.db)
        top_d, top = _topk_sorted(d[None], self.k1)
        top_d, top = top_d[0], top[0]
        recip_set = top[top_d <= self.knn_d[top, self.k1]]  # q would enter their top k1 + 1
        cols, w = self._encode(recip_set, lambda c: dn[c])
        total = float(w.sum()) + 1.0
        eq = np.exp(-d[recip_set] / self.rowmax[recip_set])
        scale = np.ones(n, np.float32)  # V0 rows renormalised after gaining column q
        scale[recip_set] = self.z[recip_set] / (self.z[recip_set] + eq)
        own = np.zeros(n, np.float32)  # their weight on column q
        own[recip_set] = eq / (self.z[recip_set] + eq)

        v0q = np.zeros(n, np.float32)  # the query's own (not yet expanded) encoding
        v0q[cols] = w / total

        def averaged(lists: np.ndarray, keep: np.ndarray, with_q: np.ndarray,
                     colsel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            """Mean of the updated V0 rows in each list (entries where ``keep``), plus the query's
            own encoding where ``with_q``, over columns ``colsel`` (all if None); and the mean
            weight on column q."""
            m = sparse.csr_matrix(((scale[lists] * keep).ravel(),
                                   (np.repeat(np.arange(len(lists)), lists.shape[1]), lists.ravel())),
                                  shape=(len(lists), n))
            v0, own_q = (self.v0, v0q) if colsel is None else (self.v0_csc[:, colsel], v0q[colsel])
            v = ((m @ v0).toarray() + with_q[:, None] * own_q) / self.k2
            return v, ((own[lists] * keep).sum(1) + with_q / total) / self.k2

        q_list = top[None, : self.k2 - 1]  # with the query itself: its top k2
        vq, vq_own = averaged(q_list, np.ones(q_list.shape, np.float32), np.ones(1, np.float32))
        vq, vq_own = vq[0], float(vq_own[0])
        qcols = np.flatnonzero(vq)
        smin = self._sum_min(qcols, vq[qcols])
        entered = top[top_d < self.knn_d[top, self.k2 - 1]]  # q enters their top-k2 list
        averaging = self.qe_csc[:, recip_set].indices  # they average a renormalised row
        changed = np.unique(np.concatenate([entered, averaging]))
        if len(changed):
            lists = self.knn[changed, : self.k2]
            with_q = np.isin(changed, entered).astype(np.float32)
            keep = np.ones(lists.shape, np.float32)
            keep[:, -1] = 1.0 - with_q  # q pushes the last one out
            vg, vg_own = averaged(lists, keep, with_q, qcols)  # only the query's columns matter
            smin[changed] = np.minimum(vg, vq[qcols]).sum(1) + np.minimum(vg_own, vq_own)
        return smin


def _rows_to_csr(rows: list[tuple[np.ndarray, np.ndarray]], n: int) -> sparse.csr_matrix:
    indptr = np.concatenate([[0], np.cumsum([len(c) for c, _ in rows])])
    return sparse.csr_matrix((np.concatenate([w for _, w in rows]), np.concatenate([c for c, _ in rows]),
                              indptr), shape=(len(rows), n))
