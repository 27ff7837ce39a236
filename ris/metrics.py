"""Retrieval metrics computed in query blocks: memory is O(block x N), never N x N.

Conventions (stated in every report):
- N-S score (UKBench): number of the query's group found in the top 4, the query itself counted
  (perfect 4.0 for groups of 4). Top-4 accuracy % = N-S / 4 * 100. Where groups have fewer than 4
  images (Holidays' scenes of 2-13) a perfect search scores less: ``ns_perfect`` says how much.
- mAP, precision@k and recall@k exclude the query from its own ranking.
- recall@k: fraction of queries with at least one relevant item in the top k (the metric-learning
  convention of Song et al. / Musgrave et al.).
- One rule for every metric: a query with no other image of its group in the database has nothing to
  find, so no metric scores it (N-S, top-4, mAP, R@k, P@k alike); their number is reported as
  ``queries_without_relevant``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ris.topk import l2_normalize, pairwise_distances


@dataclass
class RetrievalScores:
    queries: int
    database: int
    ns_score: float  # mean hits in top 4, query counted
    top4_accuracy: float  # % = N-S / 4 * 100
    map: float  # query excluded
    recall_at: dict[int, float] = field(default_factory=dict)
    precision_at: dict[int, float] = field(default_factory=dict)
    queries_without_relevant: int = 0  # queries alone in their group: scored by no metric
    ns_perfect: float = 4.0  # the N-S of a perfect search on these queries: mean min(4, group size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recall_at"] = {str(k): v for k, v in self.recall_at.items()}
        d["precision_at"] = {str(k): v for k, v in self.precision_at.items()}
        return d


class _Tally:
    """Running sums of per-query scores, shared by plain and re-ranked evaluation."""

    def __init__(self, recall_ks: tuple[int, ...], precision_ks: tuple[int, ...], ns_k: int):
        self.recall_ks, self.precision_ks, self.ns_k = recall_ks, precision_ks, ns_k
        self.ns_total = 0.0
        self.ap_total = 0.0
        self.ap_count = 0
        self.recall_hits = {k: 0 for k in recall_ks}
        self.precision_sum = {k: 0.0 for k in precision_ks}

    def add(self, top_rel: np.ndarray, ap: np.ndarray, valid: np.ndarray) -> None:
        """``top_rel``: relevance of each query's ranked list, the query itself in column 0."""
        self.ns_total += top_rel[:, : self.ns_k].sum()
        tail = top_rel[:, 1:]  # query excluded
        for k in self.recall_ks:
            self.recall_hits[k] += int(tail[:, :k].any(axis=1).sum())
        for k in self.precision_ks:
            self.precision_sum[k] += float(tail[:, :k].sum(axis=1).sum() / k)
        self.ap_total += float(ap[valid].sum())
        self.ap_count += int(valid.sum())

    def add_ranked(self, labels: np.ndarray, rows: np.ndarray, idx: np.ndarray, npos_all: np.ndarray) -> None:
        """Queries ``rows`` with their ranked lists ``idx`` (rows of ``labels``, query excluded);
        AP over the list, relevant items beyond it never retrieved (``npos_all``: ``positives``)."""
        top_rel = labels[np.concatenate([rows[:, None], idx], 1)] == labels[rows, None]
        tail = top_rel[:, 1:]
        ranks = np.arange(1, tail.shape[1] + 1, dtype=np.float64)
        prec = np.where(tail, np.cumsum(tail, axis=1) / ranks, 0.0)
        npos = npos_all[rows]
        self.add(top_rel, prec.sum(axis=1) / np.maximum(npos, 1), npos > 0)

    def scores(self, nq: int, n: int, without_relevant: int = 0, npos: np.ndarray | None = None) -> RetrievalScores:
        """``npos``: per scored query, the other images of its group in the gallery (``positives``)."""
        q = max(nq, 1)
        ns = self.ns_total / q
        perfect = float(np.minimum(np.asarray(npos) + 1, self.ns_k).mean()) if npos is not None and len(npos) else self.ns_k
        return RetrievalScores(
            queries=nq,
            database=n,
            ns_score=round(float(ns), 4),
            top4_accuracy=round(float(ns) / self.ns_k * 100.0, 2),
            map=round(self.ap_total / max(self.ap_count, 1), 4),
            recall_at={k: round(self.recall_hits[k] / q, 4) for k in self.recall_ks},
            precision_at={k: round(self.precision_sum[k] / q, 4) for k in self.precision_ks},
            queries_without_relevant=int(without_relevant),
            ns_perfect=round(perfect, 4),
        )


def ns_note(perfect: float) -> str:
    """What N-S is measured against, for the tables: 4.0 on UKBench's groups of 4, less where groups
    are smaller (a bare 3.13 would read as a poor search when it may be a perfect one)."""
    if perfect >= 4.0 - 1e-9:
        return "N-S counts the query (perfect 4.0 for groups of 4)"
    return (f"N-S counts the query; some groups here have fewer than 4 images, so a perfect search scores "
            f"N-S {perfect:.3f} here (top-4 {perfect / 4 * 100:.2f} %), not 4.0: compare N-S with that, or read mAP")


def positives(labels: np.ndarray) -> np.ndarray:
    """Per row: how many other rows share its label."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def labelled_queries(features: np.ndarray, labels: np.ndarray, query_rows: np.ndarray | None):
    """(features, labels, query indices, queries without relevant): unlabelled (-1) rows dropped from
    both sides, and the queries with no other image of their group left out of the indices (counted)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    qmask = np.zeros(len(labels), bool)
    qmask[np.arange(len(labels)) if query_rows is None else np.asarray(query_rows, np.int64)] = True
    features = np.asarray(features, np.float32)
    if not keep.all():  # (boolean indexing copies: skip it when every row is kept)
        features, labels = features[keep], labels[keep]
    if len(labels) < 2:
        raise ValueError("need at least two labelled images to evaluate")
    qidx = np.nonzero(qmask[keep])[0]
    has_relevant = positives(labels)[qidx] > 0
    return features, labels, qidx[has_relevant], int((~has_relevant).sum())


def evaluate_retrieval(
    features: np.ndarray,
    labels: np.ndarray,
    metric: str = "euclidean",
    recall_ks: tuple[int, ...] = (1, 4, 10),
    precision_ks: tuple[int, ...] = (10,),
    block: int = 256,
    ns_k: int = 4,
    query_rows: np.ndarray | None = None,
) -> RetrievalScores:
    """Every row (or only ``query_rows``) queries all rows (closed set). Label -1 rows are ignored."""
    features, labels, qidx, without_relevant = labelled_queries(features, labels, query_rows)
    n, nq = len(labels), len(qidx)
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    tally = _Tally(recall_ks, precision_ks, ns_k)
    # database-side terms of the distance, computed once instead of once per query block
    db_terms = _database_terms(features, metric)
    for s in range(0, nq, block):
        e = min(s + block, nq)
        qs = qidx[s:e]
        with np.errstate(invalid="ignore"):  # inf features: inf - inf
            dist = _block_distances(features[qs], features, metric, db_terms)
        np.copyto(dist, np.inf, where=np.isnan(dist))  # no distance is the farthest (NaN compares false: ranked first)
        rows = np.arange(e - s)
        dist[rows, qs] = -np.inf  # the query ranks first (counted for N-S only)
        rel = labels[qs, None] == labels[None, :]
        kk = min(max_k + 1, n)
        part = _smallest_unordered(dist, kk)
        pd = np.take_along_axis(dist, part, 1)
        # sort by (distance, index) for deterministic tie-breaking
        order = _lexsort_rows(pd, part)
        top = np.take_along_axis(part, order, 1)
        top_rel = np.take_along_axis(rel, top, 1)
        ap, valid = _average_precision(dist, rel, qs)
        tally.add(top_rel, ap, valid)
        del dist, rel  # free the (block, N) arrays before the next block allocates its own
    return tally.scores(nq, n, without_relevant, positives(labels)[qidx])


def _database_terms(features: np.ndarray, metric: str) -> np.ndarray | None:
    if metric == "euclidean":
        return (features * features).sum(1)
    if metric == "cosine":
        return l2_normalize(features)
    return None


def _block_distances(q: np.ndarray, d: np.ndarray, metric: str, db_terms: np.ndarray | None) -> np.ndarray:
    """``pairwise_distances(q, d, metric)``, value for value, with the database terms precomputed and
    the euclidean arithmetic done in place (no (b, N) temporaries besides the result)."""
    if db_terms is None:
        return pairwise_distances(q, d, metric)
    q = np.asarray(q, dtype=np.float32)
    if metric == "cosine":
        return 1.0 - l2_normalize(q) @ db_terms.T
    out = q @ d.T  # same operations, in the same order, as pairwise_distances
    out *= 2.0
    np.subtract((q * q).sum(1)[:, None], out, out=out)
    out += db_terms[None, :]
    np.maximum(out, 0.0, out=out)
    return np.sqrt(out, out=out)


def _smallest_unordered(dist: np.ndarray, k: int, rows: int = 32) -> np.ndarray:
    """The ``k`` first columns of each row in (distance, column) order, unordered: argpartition, a
    few rows at a time (no (b, N) int64 index array alive at once). Where items tie at the cut
    (duplicate images), argpartition keeps any of them: those rows take the lowest columns among
    the tied, as the ranking does."""
    out = np.empty((dist.shape[0], k), dtype=np.intp)
    for r in range(0, dist.shape[0], rows):
        block = dist[r : r + rows]
        out[r : r + rows] = np.argpartition(block, k - 1, axis=1)[:, :k]
        cut = np.take_along_axis(block, out[r : r + rows], 1).max(axis=1)
        for i in np.nonzero(np.count_nonzero(block <= cut[:, None], axis=1) > k)[0]:  # rare: ties at the cut
            cols = np.nonzero(block[i] <= cut[i])[0]
            out[r + i] = cols[np.lexsort((cols, block[i, cols]))[:k]]
    return out


def _lexsort_rows(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    o = np.argsort(secondary, axis=1, kind="stable")
    p = np.take_along_axis(primary, o, 1)
    o2 = np.argsort(p, axis=1, kind="stable")
    return np.take_along_axis(o, o2, 1)


def _average_precision(dist: np.ndarray, rel: np.ndarray, query_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact AP per query row (query excluded), from the rank of each relevant item.

    Small groups (UKBench: 3 relevant items) count ranks by comparison, O(b x G x N), instead of
    sorting every row; large groups sort.
    """
    b, n = dist.shape
    # the query leaves the ranking: set in place (no copies of the (b, N) arrays), restored on return
    qrows = np.arange(b)
    saved_rel, saved_dist = rel[qrows, query_cols].copy(), dist[qrows, query_cols].copy()
    rel[qrows, query_cols] = False
    dist[qrows, query_cols] = np.nan  # never before, nor tied with, any item (inf would tie with unusable rows)
    try:
        return _average_precision_ranked(dist, rel)
    finally:
        rel[qrows, query_cols] = saved_rel
        dist[qrows, query_cols] = saved_dist


def _average_precision_ranked(d: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, n = d.shape
    npos = rel.sum(axis=1)
    g = int(npos.max()) if b else 0
    ap = np.zeros(b, dtype=np.float64)
    if g == 0:
        return ap, npos > 0
    if g > 64:
        order = np.argsort(d, axis=1, kind="stable")
        ranked_rel = np.take_along_axis(rel, order, 1)[:, : n - 1]
        hits = np.cumsum(ranked_rel, axis=1)
        prec = np.where(ranked_rel, hits / np.arange(1, n, dtype=np.float64), 0.0)
        return prec.sum(axis=1) / np.maximum(npos, 1), npos > 0
    # padded (b, g) positive columns; padding gets column n (never ranked)
    cols = np.full((b, g), n, dtype=np.int64)
    r, c = np.nonzero(rel)
    slot = np.arange(len(r)) - np.repeat(np.cumsum(npos) - npos, npos)
    cols[r, slot] = c
    step = max(1, int(32_000_000 // max(g * n, 1)))
    for s in range(0, b, step):
        e = min(s + step, b)
        dd = d[s:e]
        pc = cols[s:e]
        real = pc < n
        dp = np.take_along_axis(dd, np.where(real, pc, 0), 1)
        dp[~real] = np.inf
        # items before a positive: closer, or equally close with a lower column (ties by index)
        closer = np.count_nonzero(dd[:, None, :] < dp[:, :, None], axis=2)
        tied = np.count_nonzero(dd[:, None, :] == dp[:, :, None], axis=2)  # >= 1: the positive itself
        for i, j in zip(*np.nonzero((tied > 1) & real)):  # rare: exact ties with other items
            closer[i, j] += np.count_nonzero((dd[i, : pc[i, j]] == dp[i, j]))
        rank = closer + 1.0  # 1-based rank among non-query items
        rank = np.where(real, rank, np.inf)
        rank.sort(axis=1)
        i = np.arange(1, g + 1, dtype=np.float64)
        ap[s:e] = np.where(np.isfinite(rank), i / rank, 0.0).sum(axis=1) / np.maximum(npos[s:e], 1)
    return ap, npos > 0


def ns_score(features: np.ndarray, labels: np.ndarray, metric: str = "euclidean") -> float:
    return evaluate_retrieval(features, labels, metric, recall_ks=(), precision_ks=()).ns_score
