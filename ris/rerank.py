"""Re-ranking of retrieval results: query expansion, diffusion and k-reciprocal re-ranking.

Memory stays bounded: the database is held in RAM as an (N, D) float32 array, the offline
structures are sparse kNN graphs (O(N x k) entries), and queries go through in blocks of ``b``
rows whose (b, N) score block is the largest dense array (``b x N <= 2**20`` entries). No N x N
matrix is ever built.

Closed set (queries are database rows): pass ``query_rows`` (the database row of each query).
That row is left out of the query's own results, and each method treats the query as *being* that
node: QE does not pick the query's copy as an expansion neighbour (it already has weight 1),
diffusion seeds from the query's kNN, its own node included (like an out-of-database query with an
exact copy in the database), and k-reciprocal uses the node's own encoding, as in Zhong et al.
Out-of-database queries need no flag (k-reciprocal then treats the query as inserted).

Score convention (every method: smaller = better, rows sorted by (score, index)):
- ``none``: the ``metric`` distance (``pairwise_distances``, as ``evaluate_retrieval`` ranks);
- ``qe``, ``dba+qe``: cosine distance ``1 - <q', d'>`` of the expanded query to the (augmented,
  for DBA) L2-normalised database vectors;
- ``diffusion``: ``1 - f / max(f)`` for nodes the diffusion reaches (in [0, 1)); unreached nodes
  (other graph components) follow in their base order with ``1 + cosine distance / 2`` (in [1, 2]);
- ``kreciprocal``: Zhong et al.'s final distance ``(1 - lam) * Jaccard + lam * d / max(d)``.

QE, DBA and diffusion are defined on L2-normalised descriptors with dot-product similarity (as in
the papers) and normalise internally; ``metric`` drives ``none`` and the k-reciprocal distances
(squared euclidean, as in the original code, or cosine). For L2-normalised features both metrics
rank identically.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from ris.metrics import RetrievalScores, _Tally, labelled_queries  # noqa: F401
from ris.topk import METRICS, blockwise_topk, l2_normalize, pairwise_distances

from ris.options import RERANK_METHODS as METHODS  # noqa: E402

# Literature defaults: alpha-QE / alpha-DBA (Radenovic et al. TPAMI 2018, alpha=3) with a small n
# that suits small relevant sets; diffusion (Iscen et al. CVPR 2017: k=50, kq=10, gamma=3, CG 20
# iterations) but alpha=0.9, not 0.99: at 0.99 a walk lasts ~100 steps and drifts far beyond small
# relevant sets (MobileNetV2 GAP, UKBench-1000 N-S 3.94 plain, 3.89 at 0.9, 3.64 at 0.99; Corel-1k
# mAP 0.89 plain, 0.96 at 0.9, 0.92 at 0.99);
# k-reciprocal (Zhong et al. CVPR 2017: k1=20, k2=6, lambda=0.3).
DEFAULTS: dict[str, dict[str, float]] = {
    "none": {},
    "qe": {"n": 2, "alpha": 3.0},
    "dba+qe": {"n": 2, "alpha": 3.0, "dba_n": 2, "dba_alpha": 3.0},
    "diffusion": {"graph_k": 50, "query_k": 10, "gamma": 3.0, "alpha": 0.9, "iters": 20, "tol": 1e-6},
    "kreciprocal": {"k1": 20, "k2": 6, "lam": 0.3},
}

BLOCK_ENTRIES = 1 << 20  # largest (queries x N) dense block
# kNN graphs: small database blocks let blockwise_topk skip most of each block after the first
# (its candidate filter), ~3x faster than one whole-database block at N = 20k, 40 MiB peak.
KNN_BLOCKS = {"block_rows": 2048, "query_block": 512}


# --- building blocks ---------------------------------------------------------------------------

def alpha_qe(queries: np.ndarray, database: np.ndarray, k_init_idx: np.ndarray, n: int = 2,
             alpha: float = 3.0) -> np.ndarray:
    """alpha-QE: ``L2norm(q + sum_i max(<q, d_i>, 0)^alpha d_i)`` over the first ``n`` columns of
    ``k_init_idx`` (the initial neighbours, best first). ``database`` must be L2-normalised.

    The weights fade out neighbours that are not close, so a wrong neighbour costs little."""
    q = l2_normalize(queries)
    if n <= 0 or k_init_idx.shape[1] == 0:
        return q
    nb = database[np.asarray(k_init_idx)[:, :n]]  # (b, n, D)
    w = np.maximum(np.einsum("bd,bnd->bn", q, nb), 0.0) ** alpha
    return l2_normalize(q + np.einsum("bn,bnd->bd", w, nb))


def alpha_dba(database: np.ndarray, knn_idx: np.ndarray, knn_sim: np.ndarray, n: int = 2,
              alpha: float = 3.0, chunk: int = 4096) -> np.ndarray:
    """alpha-DBA: every (L2-normalised) database vector becomes
    ``L2norm(d + sum_i max(sim_i, 0)^alpha d_i)`` over its first ``n`` neighbours (self excluded
    from ``knn_idx``/``knn_sim``), so that near duplicates move together before querying."""
    out = np.empty_like(database, dtype=np.float32)
    for s in range(0, len(database), chunk):
        e = min(s + chunk, len(database))
        w = np.maximum(knn_sim[s:e, :n], 0.0) ** alpha
        out[s:e] = l2_normalize(database[s:e] + np.einsum("bn,bnd->bd", w, database[knn_idx[s:e, :n]]))
    return out


def neighbours_without_self(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, cosine similarity) of the ``k`` nearest other rows of ``x``, best first."""
    k = min(k, len(x) - 1)
    d, i = blockwise_topk(x, x, k + 1, "cosine", **KNN_BLOCKS)
    keep = i != np.arange(len(x))[:, None]
    keep[keep.all(1), -1] = False  # self tied out of the list by a duplicate: drop the last one
    return i[keep].reshape(-1, k), (1.0 - d[keep]).reshape(-1, k)


def dba_database(database: np.ndarray, n: int = 2, alpha: float = 3.0, index=None,
                 chunk: int = 65536) -> np.ndarray:
    """The whole database after alpha-DBA: one kNN pass over it, which is why ``ris-search`` caches
    the result beside the database.

    Exact by default (O(N^2 D) time in bounded memory). ``index`` (an ``HnswIndex`` over the same
    rows, e.g. the one ``ris-search`` already keeps for large collections) finds the neighbours
    approximately in near-linear time; their similarities are then computed exactly. It must rank
    like cosine similarity: a cosine index, or a euclidean one over L2-normalised rows."""
    vectors = np.asarray(database, np.float32)
    unit = l2_normalize(vectors)
    if index is None:
        idx, sim = neighbours_without_self(unit, n)
    else:
        idx = _index_neighbours(vectors, index, n, chunk)
        sim = np.einsum("nd,nkd->nk", unit, unit[idx]) if len(idx) else np.zeros((0, n), np.float32)
    return alpha_dba(unit, idx, sim, n, alpha)


def _index_neighbours(vectors: np.ndarray, index, n: int, chunk: int) -> np.ndarray:
    """The ``n`` nearest other rows of every row, from an approximate index (self dropped; when the
    index misses the row itself, its last neighbour is dropped instead)."""
    rows = len(vectors)
    n = min(n, rows - 1)
    out = np.empty((rows, n), np.int64)
    for s in range(0, rows, chunk):
        e = min(s + chunk, rows)
        _, i = index.search(vectors[s:e], n + 1)
        keep = i != np.arange(s, e)[:, None]
        keep[keep.all(1), -1] = False
        out[s:e] = i[keep].reshape(-1, n)
    return out


def diffusion_graph(unit: np.ndarray, k: int = 50, gamma: float = 3.0) -> sparse.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` of the mutual kNN graph, ``W_ij = max(<x_i, x_j>, 0)^gamma``.

    Mutual neighbours only (Iscen et al.): hubs cannot pull unrelated images together."""
    n = len(unit)
    idx, sim = neighbours_without_self(unit, k)
    a = sparse.csr_matrix((np.maximum(sim, 0.0).ravel() ** gamma, (np.repeat(np.arange(n), idx.shape[1]),
                                                                   idx.ravel())), shape=(n, n))
    w = a.minimum(a.T).tocsr()
    w.eliminate_zeros()
    deg = np.asarray(w.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-30)), 0.0)
    return (sparse.diags(dinv) @ w @ sparse.diags(dinv)).tocsr().astype(np.float32)


def diffuse(s: sparse.csr_matrix, y: np.ndarray, alpha: float = 0.9, iters: int = 20,
            tol: float = 1e-6) -> np.ndarray:
    """Solve ``(I - alpha S) F = Y`` for every column of ``Y`` (N, b) by conjugate gradient.

    The system is symmetric positive definite (``|eig(S)| <= 1``), and CG touches only the sparse
    graph, so one query block costs O(iters x nnz(S) x b) time and O(N x b) memory."""
    x = np.zeros_like(y)
    r = y.copy()
    p = r.copy()
    rs = (r * r).sum(0)
    stop = (tol ** 2) * rs
    for _ in range(iters):
        active = rs > stop
        if not active.any():
            break
        ap = p - alpha * (s @ p)
        pap = (p * ap).sum(0)
        a = np.where(active, rs / np.where(pap > 0, pap, 1.0), 0.0).astype(y.dtype)
        x += a * p
        r -= a * ap
        rs_new = (r * r).sum(0)
        beta = np.where(active, rs_new / np.where(rs > 0, rs, 1.0), 0.0).astype(y.dtype)
        p = r + beta * p
        rs = rs_new
    return x


def _topk_sorted(score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest entries of every row, sorted by (score, column)."""
    k = min(k, score.shape[1])
    part = np.argpartition(score, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(score, part, 1)
    order = np.lexsort((part, ps), axis=1)
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


def _query_block(n: int, block: int = 256) -> int:
    return max(1, min(block, BLOCK_ENTRIES // max(n, 1)))


# --- k-reciprocal ------------------------------------------------------------------------------

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


# --- the entry points --------------------------------------------------------------------------

class Reranker:
    """A database prepared once for one re-ranking method (offline graphs, DBA), then searched."""

    def __init__(self, database: np.ndarray, method: str = "none", metric: str = "euclidean",
                 augmented: np.ndarray | None = None, **params):
        """``augmented``: for dba+qe, the database after alpha-DBA made earlier with the same
        parameters (``dba_database``), e.g. loaded from a cache file; skips its kNN pass."""
        if method not in METHODS:
            raise ValueError(f"unknown re-ranking method {method!r}; choose one of {METHODS}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        unknown = set(params) - set(DEFAULTS[method])
        if unknown:
            raise ValueError(f"{method}: unknown parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS[method])}")
        self.method, self.metric = method, metric
        self.p = {**DEFAULTS[method], **params}
        self.db = np.ascontiguousarray(database, dtype=np.float32)
        self.n = len(self.db)
        if self.n < 2:
            raise ValueError("need at least two database rows to re-rank")
        if method in ("qe", "dba+qe", "diffusion"):
            self.unit = l2_normalize(self.db)
        if method == "dba+qe":
            if augmented is not None and np.shape(augmented) == self.unit.shape:
                self.unit = np.ascontiguousarray(augmented, dtype=np.float32)
            else:
                self.unit = dba_database(self.unit, int(self.p["dba_n"]), self.p["dba_alpha"])
        elif method == "diffusion":
            self.graph = diffusion_graph(self.unit, int(self.p["graph_k"]), self.p["gamma"])
        elif method == "kreciprocal":
            self.kr = KReciprocalIndex(self.db, metric, int(self.p["k1"]), int(self.p["k2"]), self.p["lam"])

    def search(self, queries: np.ndarray, k: int, query_rows: np.ndarray | None = None,
               block: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(score, idx) of the best ``k`` database rows per query, sorted (smaller = better).

        ``query_rows[i]`` (or -1) is the database row that query ``i`` is; it is left out of the
        results and treated as the query's node (see the module docstring)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        rows = np.full(len(q), -1, np.int64) if query_rows is None else np.asarray(query_rows, np.int64)
        k = int(max(0, min(k, self.n - (1 if (rows >= 0).any() else 0))))
        out_s = np.empty((len(q), k), np.float32)
        out_i = np.empty((len(q), k), np.int64)
        if k == 0:
            return out_s, out_i
        b = _query_block(self.n, block)
        for s in range(0, len(q), b):
            e = min(s + b, len(q))
            score = self._scores(q[s:e], rows[s:e])
            own = np.nonzero(rows[s:e] >= 0)[0]
            score[own, rows[s:e][own]] = np.inf
            out_s[s:e], out_i[s:e] = _topk_sorted(score, k)
        return out_s, out_i

    def _scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        m = self.method
        if m == "none":
            return pairwise_distances(q, self.db, self.metric)
        if m == "kreciprocal":
            return self.kr.scores(q, rows)
        uq = l2_normalize(q)
        sim = uq @ self.unit.T
        if m in ("qe", "dba+qe"):
            n = int(min(self.p["n"], self.n - 1))
            excl = sim.copy()
            own = np.nonzero(rows >= 0)[0]
            excl[own, rows[own]] = -np.inf  # the query's copy is not an expansion neighbour
            nbr = np.argpartition(-excl, n - 1, axis=1)[:, :n] if n > 0 else np.empty((len(q), 0), np.int64)
            return 1.0 - alpha_qe(uq, self.unit, nbr, n, self.p["alpha"]) @ self.unit.T
        # diffusion: seed with the query's kNN similarities, spread over the offline graph
        kq = int(min(self.p["query_k"], self.n))
        top = np.argpartition(-sim, kq - 1, axis=1)[:, :kq]
        y = np.zeros((self.n, len(q)), np.float32)
        y[top, np.arange(len(q))[:, None]] = np.maximum(np.take_along_axis(sim, top, 1), 0.0) ** self.p["gamma"]
        f = diffuse(self.graph, y, self.p["alpha"], int(self.p["iters"]), self.p["tol"]).T
        fmax = np.maximum(f.max(axis=1, keepdims=True), 1e-30)
        return np.where(f > 0, 1.0 - f / fmax, 1.0 + (1.0 - sim) / 2.0).astype(np.float32)


def rerank(queries: np.ndarray, database: np.ndarray, method: str, k: int, metric: str = "euclidean",
           *, query_rows: np.ndarray | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (score, idx) per query after re-ranking, sorted best first (smaller = better;
    see the module docstring for what the score is per method). ``method`` in ``METHODS``;
    ``params`` override ``DEFAULTS[method]``. Build a ``Reranker`` to search one database often."""
    return Reranker(database, method, metric, **params).search(queries, k, query_rows=query_rows)


def evaluate_reranked(features: np.ndarray, labels: np.ndarray, method: str = "none",
                      metric: str = "euclidean", recall_ks: tuple[int, ...] = (1, 4, 10),
                      precision_ks: tuple[int, ...] = (10,), block: int = 256, ns_k: int = 4,
                      query_rows: np.ndarray | None = None, depth: int | None = None,
                      **params) -> RetrievalScores:
    """``ris.metrics.evaluate_retrieval`` on re-ranked lists (closed set, same conventions).

    Every labelled row (or only ``query_rows``) queries all labelled rows; its own row is forced to
    rank 1 (counted for N-S only). AP is computed over the re-ranked top ``depth`` list, query
    excluded: relevant items beyond ``depth`` count as never retrieved, so AP is exact when
    ``depth = N - 1`` (the default when N <= 5000; 1000 otherwise, then a lower bound).
    ``method="none"`` reproduces ``evaluate_retrieval`` exactly.
    """
    features, labels, qidx, without_relevant = labelled_queries(features, labels, query_rows)
    n, nq = len(labels), len(qidx)
    depth = (n - 1 if n <= 5000 else 1000) if depth is None else int(min(depth, n - 1))
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    if depth < min(max_k, n - 1):  # fewer than k candidates in all: truncate, as evaluate_retrieval does
        raise ValueError(f"depth {depth} is shorter than the metrics need ({max_k})")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    npos_all = counts[inverse] - 1
    reranker = Reranker(features, method, metric, **params)
    tally = _Tally(recall_ks, precision_ks, ns_k)
    ranks = np.arange(1, depth + 1, dtype=np.float64)
    for s in range(0, nq, block):
        rows = qidx[s : s + block]
        _, idx = reranker.search(features[rows], depth, query_rows=rows, block=block)
        top_rel = labels[np.concatenate([rows[:, None], idx], 1)] == labels[rows, None]
        tail = top_rel[:, 1:]
        npos = npos_all[rows]
        prec = np.where(tail, np.cumsum(tail, axis=1) / ranks, 0.0)
        tally.add(top_rel, prec.sum(axis=1) / np.maximum(npos, 1), npos > 0)
    return tally.scores(nq, n, without_relevant)
