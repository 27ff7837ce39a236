"""Re-ranking of retrieval results: query expansion, diffusion and k-reciprocal re-ranking.

``RERANKERS`` maps each method's name to its class (a ``Method``: its parameters' defaults, its
offline preparation and its scores). Adding a re-ranker is one class and one entry there, plus
its test in tests/test_rerank.py; ``ris-search``/``ris-eval --rerank`` offer it from that dict.

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

from ris.errors import BadChoice, RisError
from ris.topk import METRICS, blockwise_topk, l2_normalize, pairwise_distances

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


def _check_rows(n: int) -> None:
    """Re-ranking compares each row with its neighbours: a database of one image has none (the
    user's database, not a bug, hence a RisError)."""
    if n < 2:
        raise RisError(f"re-ranking (--rerank) needs at least two images in the database; it has {n}")


def dba_database(database: np.ndarray, n: int = 2, alpha: float = 3.0, index=None,
                 chunk: int = 65536) -> np.ndarray:
    """The whole database after alpha-DBA: one kNN pass over it, which is why ``ris-search`` caches
    the result beside the database.

    Exact by default (O(N^2 D) time in bounded memory). ``index`` (an ``HnswIndex`` over the same
    rows, e.g. the one ``ris-search`` already keeps for large collections) finds the neighbours
    approximately in near-linear time; their similarities are then computed exactly. It must rank
    like cosine similarity: a cosine index, or a euclidean one over L2-normalised rows."""
    vectors = np.asarray(database, np.float32)
    _check_rows(len(vectors))
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


# --- the methods: RERANKERS ---------------------------------------------------------------------

class Method:
    """One re-ranking method, prepared once for a database (its offline structures, in
    ``__init__``), then asked for (b, N) score blocks, smaller = better (module docstring).

    ``defaults``: every parameter the method takes, with its default; ``help``: one line for
    ``--help``. ``augmented`` is an earlier ``dba_database`` result that only dba+qe uses.
    ``comparable_scores``: scores of different queries are on one scale (not normalised per
    query), so copies of one query can be merged by their best score (``--rotations``)."""

    defaults: dict[str, float] = {}
    help = ""
    comparable_scores = False

    def __init__(self, database: np.ndarray, metric: str, p: dict[str, float],
                 augmented: np.ndarray | None = None):
        self.db, self.metric, self.p, self.n = database, metric, p, len(database)

    def scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(b, N) scores of queries ``q``; ``rows[i] >= 0`` is the database row query ``i`` is."""
        raise NotImplementedError


class Plain(Method):
    help = "no re-ranking"
    comparable_scores = True

    def scores(self, q, rows):
        return pairwise_distances(q, self.db, self.metric)


class QueryExpansion(Method):
    """alpha-QE (Radenovic et al. TPAMI 2018, alpha=3), with a small n that suits small relevant sets."""

    defaults = {"n": 2, "alpha": 3.0}
    help = "alpha query expansion"
    comparable_scores = True  # cosine distances of the expanded query

    def __init__(self, database, metric, p, augmented=None):
        super().__init__(database, metric, p)
        self.unit = l2_normalize(database)

    def scores(self, q, rows):
        uq = l2_normalize(q)
        sim = uq @ self.unit.T
        n = int(min(self.p["n"], self.n - 1))
        own = np.nonzero(rows >= 0)[0]
        sim[own, rows[own]] = -np.inf  # the query's copy is not an expansion neighbour
        nbr = np.argpartition(-sim, n - 1, axis=1)[:, :n] if n > 0 else np.empty((len(q), 0), np.int64)
        return 1.0 - alpha_qe(uq, self.unit, nbr, n, self.p["alpha"]) @ self.unit.T


class DbaQueryExpansion(QueryExpansion):
    """alpha-DBA, then alpha-QE on the augmented database (same paper and defaults)."""

    defaults = {"n": 2, "alpha": 3.0, "dba_n": 2, "dba_alpha": 3.0}
    help = "database-side augmentation plus qe"

    def __init__(self, database, metric, p, augmented=None):
        super().__init__(database, metric, p)
        if augmented is not None and np.shape(augmented) == self.unit.shape:
            self.unit = np.ascontiguousarray(augmented, dtype=np.float32)
        else:
            self.unit = dba_database(self.unit, int(p["dba_n"]), p["dba_alpha"])


class Diffusion(Method):
    """Iscen et al. CVPR 2017 (k=50, kq=10, gamma=3, CG 20 iterations) but alpha=0.9, not 0.99: at
    0.99 a walk lasts ~100 steps and drifts far beyond small relevant sets (MobileNetV2 GAP,
    UKBench-1000 N-S 3.94 plain, 3.89 at 0.9, 3.64 at 0.99; Corel-1k mAP 0.89 plain, 0.96 at 0.9,
    0.92 at 0.99). Chosen on all images of those two collections, held-out objects included, so its
    scores there are somewhat optimistic; it is in no preset."""

    defaults = {"graph_k": 50, "query_k": 10, "gamma": 3.0, "alpha": 0.9, "iters": 20, "tol": 1e-6}
    help = "kNN-graph diffusion"

    def __init__(self, database, metric, p, augmented=None):
        super().__init__(database, metric, p)
        self.unit = l2_normalize(database)
        self.graph = diffusion_graph(self.unit, int(p["graph_k"]), p["gamma"])

    def scores(self, q, rows):
        """Seed with the query's kNN similarities, spread over the offline graph."""
        sim = l2_normalize(q) @ self.unit.T
        kq = int(min(self.p["query_k"], self.n))
        top = np.argpartition(-sim, kq - 1, axis=1)[:, :kq]
        y = np.zeros((self.n, len(q)), np.float32)
        y[top, np.arange(len(q))[:, None]] = np.maximum(np.take_along_axis(sim, top, 1), 0.0) ** self.p["gamma"]
        f = diffuse(self.graph, y, self.p["alpha"], int(self.p["iters"]), self.p["tol"]).T
        fmax = np.maximum(f.max(axis=1, keepdims=True), 1e-30)
        return np.where(f > 0, 1.0 - f / fmax, 1.0 + (1.0 - sim) / 2.0).astype(np.float32)


class KReciprocal(Method):
    """Zhong et al. CVPR 2017 (k1=20, k2=6, lambda=0.3); the encoding lives in ``ris.kreciprocal``."""

    defaults = {"k1": 20, "k2": 6, "lam": 0.3}
    help = "k-reciprocal re-ranking"

    def __init__(self, database, metric, p, augmented=None):
        from ris.kreciprocal import KReciprocalIndex

        super().__init__(database, metric, p)
        self.kr = KReciprocalIndex(database, metric, int(p["k1"]), int(p["k2"]), p["lam"])

    def scores(self, q, rows):
        return self.kr.scores(q, rows)


RERANKERS: dict[str, type[Method]] = {
    "none": Plain,
    "qe": QueryExpansion,
    "dba+qe": DbaQueryExpansion,
    "diffusion": Diffusion,
    "kreciprocal": KReciprocal,
}


# --- the entry points --------------------------------------------------------------------------

def check_method(method: str) -> None:
    """Refuse a name that is no re-ranking method (also before a database is opened to re-rank)."""
    if method not in RERANKERS:
        raise BadChoice(f"unknown re-ranking method {method!r}; choose one of {', '.join(RERANKERS)}")


class Reranker:
    """A database prepared once for one re-ranking method (offline graphs, DBA), then searched."""

    def __init__(self, database: np.ndarray, method: str = "none", metric: str = "euclidean",
                 augmented: np.ndarray | None = None, **params):
        """``augmented``: for dba+qe, the database after alpha-DBA made earlier with the same
        parameters (``dba_database``), e.g. loaded from a cache file; skips its kNN pass."""
        check_method(method)
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        defaults = RERANKERS[method].defaults
        unknown = set(params) - set(defaults)
        if unknown:
            raise BadChoice(f"{method}: unknown parameter(s) {sorted(unknown)}; known: {sorted(defaults)}")
        self.method, self.metric = method, metric
        self.p = {**defaults, **params}
        self.db = np.ascontiguousarray(database, dtype=np.float32)
        self.n = len(self.db)
        _check_rows(self.n)
        self.impl = RERANKERS[method](self.db, metric, self.p, augmented)

    def search(self, queries: np.ndarray, k: int, query_rows: np.ndarray | None = None,
               block: int = 256, variants: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(score, idx) of the best ``k`` database rows per query, sorted (smaller = better).

        ``query_rows[i]`` (or -1) is the database row that query ``i`` is; it is left out of the
        results and treated as the query's node (see the module docstring). ``variants``: every
        query is that many consecutive rows of ``queries`` (its turned copies, ``ris.rotations``),
        and each database row keeps its best score over them; only for ``comparable_scores``."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        variants = int(variants)
        if variants > 1 and not self.impl.comparable_scores:
            raise RisError(f"{self.method}: its scores are normalised per query; copies of a query cannot be merged")
        if variants < 1 or len(q) % variants:
            raise ValueError(f"{len(q)} query rows are not groups of {variants} variants")
        nq = len(q) // variants
        rows = np.full(nq, -1, np.int64) if query_rows is None else np.asarray(query_rows, np.int64)
        k = int(max(0, min(k, self.n - (1 if (rows >= 0).any() else 0))))
        out_s = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        if k == 0:
            return out_s, out_i
        b = _query_block(self.n * variants, block)
        for s in range(0, nq, b):
            e = min(s + b, nq)
            score = self.impl.scores(q[s * variants : e * variants], np.repeat(rows[s:e], variants))
            if variants > 1:
                score = score.reshape(e - s, variants, self.n).min(axis=1)
            own = np.nonzero(rows[s:e] >= 0)[0]
            score[own, rows[s:e][own]] = np.inf
            out_s[s:e], out_i[s:e] = _topk_sorted(score, k)
        return out_s, out_i


def rerank(queries: np.ndarray, database: np.ndarray, method: str, k: int, metric: str = "euclidean",
           *, query_rows: np.ndarray | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (score, idx) per query after re-ranking, sorted best first (smaller = better;
    see the module docstring for what the score is per method). ``method`` in ``RERANKERS``;
    ``params`` override ``RERANKERS[method].defaults``. Build a ``Reranker`` to search one database often."""
    return Reranker(database, method, metric, **params).search(queries, k, query_rows=query_rows)
