"""Retrieval metrics computed in query blocks: memory is O(block x N), never N x N.

Conventions (stated in every report):
- N-S score (UKBench): number of the query's group found in the top 4, the query itself counted
  (perfect 4.0 for groups of 4). Top-4 accuracy % = N-S / 4 * 100.
- mAP, precision@k and recall@k exclude the query from its own ranking.
- recall@k: fraction of queries with at least one relevant item in the top k (the metric-learning
  convention of Song et al. / Musgrave et al.).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ris.topk import pairwise_distances


@dataclass
class RetrievalScores:
    queries: int
    database: int
    ns_score: float  # mean hits in top 4, query counted
    top4_accuracy: float  # % = N-S / 4 * 100
    map: float  # query excluded
    recall_at: dict[int, float] = field(default_factory=dict)
    precision_at: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recall_at"] = {str(k): v for k, v in self.recall_at.items()}
        d["precision_at"] = {str(k): v for k, v in self.precision_at.items()}
        return d


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
    labels = np.asarray(labels)
    keep = labels >= 0
    qmask = np.zeros(len(labels), bool)
    qmask[np.arange(len(labels)) if query_rows is None else np.asarray(query_rows, np.int64)] = True
    qmask = qmask[keep]
    features, labels = np.asarray(features, np.float32)[keep], labels[keep]
    n = len(labels)
    if n < 2:
        raise ValueError("need at least two labelled images to evaluate")
    qidx = np.nonzero(qmask)[0]
    nq = len(qidx)
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    ns_total = 0.0
    ap_total = 0.0
    ap_count = 0
    recall_hits = {k: 0 for k in recall_ks}
    precision_sum = {k: 0.0 for k in precision_ks}
    for s in range(0, nq, block):
        e = min(s + block, nq)
        qs = qidx[s:e]
        dist = pairwise_distances(features[qs], features, metric)
        rows = np.arange(e - s)
        dist[rows, qs] = -np.inf  # the query ranks first (counted for N-S only)
        rel = labels[qs, None] == labels[None, :]
        kk = min(max_k + 1, n)
        part = np.argpartition(dist, kk - 1, axis=1)[:, :kk]
        pd = np.take_along_axis(dist, part, 1)
        # sort by (distance, index) for deterministic tie-breaking
        order = _lexsort_rows(pd, part)
        top = np.take_along_axis(part, order, 1)
        top_rel = np.take_along_axis(rel, top, 1)
        ns_total += top_rel[:, :ns_k].sum()
        tail = top_rel[:, 1:]  # query excluded
        for k in recall_ks:
            recall_hits[k] += int(tail[:, :k].any(axis=1).sum())
        for k in precision_ks:
            precision_sum[k] += float(tail[:, :k].sum(axis=1).sum() / k)
        ap, valid = _average_precision(dist, rel, qs)
        ap_total += float(ap[valid].sum())
        ap_count += int(valid.sum())
    ns = ns_total / nq
    n_out = n
    n = nq
    return RetrievalScores(
        queries=nq,
        database=n_out,
        ns_score=round(float(ns), 4),
        top4_accuracy=round(float(ns) / ns_k * 100.0, 2),
        map=round(ap_total / max(ap_count, 1), 4),
        recall_at={k: round(recall_hits[k] / n, 4) for k in recall_ks},
        precision_at={k: round(precision_sum[k] / n, 4) for k in precision_ks},
    )


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
    rel = rel.copy()
    rel[np.arange(b), query_cols] = False
    npos = rel.sum(axis=1)
    d = dist.copy()
    d[np.arange(b), query_cols] = np.inf  # out of the ranking
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
    colidx = np.arange(n)
    step = max(1, int(32_000_000 // max(g * n, 1)))
    for s in range(0, b, step):
        e = min(s + step, b)
        dd = d[s:e]
        pc = cols[s:e]
        dp = np.take_along_axis(np.concatenate([dd, np.full((e - s, 1), np.inf)], 1), pc, 1)
        before = (dd[:, None, :] < dp[:, :, None]) | ((dd[:, None, :] == dp[:, :, None]) & (colidx < pc[:, :, None]))
        rank = before.sum(axis=2) + 1.0  # 1-based rank among non-query items
        rank = np.where(pc < n, rank, np.inf)
        rank.sort(axis=1)
        i = np.arange(1, g + 1, dtype=np.float64)
        ap[s:e] = np.where(np.isfinite(rank), i / rank, 0.0).sum(axis=1) / np.maximum(npos[s:e], 1)
    return ap, npos > 0


def ns_score(features: np.ndarray, labels: np.ndarray, metric: str = "euclidean") -> float:
    return evaluate_retrieval(features, labels, metric, recall_ks=(), precision_ks=()).ns_score
