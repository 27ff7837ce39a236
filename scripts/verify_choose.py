"""Choose geometric-verification settings on TRAINING objects only, then report the held-out ones.

UKBench-style database: objects split as ``ris-eval --split test`` does (seed 0, 20% held out). A
seeded sample of training-object images query the whole collection; every candidate in their top 30
(after the base re-ranker) is verified once, and the grid of (k, min_inliers, weight) is scored from
those inlier counts. The held-out objects are scored only with the chosen setting.

    python scripts/verify_choose.py DB [--rerank none|dba+qe] [--sample 200]
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from ris.featuredb import FeatureDB
from ris.rerank import Reranker
from ris.embed import raw_descriptors
from ris.splits import rows_of, split_objects
from ris.verify import DEFAULTS, database_local_features, inlier_order, inliers


def scores(order: np.ndarray, labels: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(N-S with the query counted, mAP with it excluded) of full rankings ``order`` (query excluded)."""
    rel = labels[order] == labels[q][:, None]
    ns = 1 + rel[:, :3].sum(1)
    npos = rel.sum(1)
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    ap = (prec * rel).sum(1) / np.maximum(npos, 1)
    return float(ns.mean()), float(ap.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="labelled UKBench-style ris feature database (HDF5)")
    ap.add_argument("--rerank", default="none",
                    help="base ranking before verification: a re-ranking method (ris.rerank.RERANKERS) at its "
                         "default settings (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=100,
                    help="training-object images drawn as queries (seed 0) (default: %(default)s)")
    ap.add_argument("--depth", type=int, default=30,
                    help="candidates verified per training query, from the top of the base ranking; grid values "
                         "of k above it are skipped (default: %(default)s)")
    a = ap.parse_args()
    with FeatureDB(a.db) as db:
        labels = db.labels
        feats = raw_descriptors(db.read_rows(np.arange(len(db))))
        lf = database_local_features(db, a.db, int(DEFAULTS["features"]), int(DEFAULTS["side"]))
    test = rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"])
    train = np.setdiff1d(np.nonzero(labels >= 0)[0], test)
    train_q = np.sort(np.random.default_rng(0).choice(train, min(a.sample, len(train)), replace=False))
    rr = Reranker(feats, a.rerank)

    def ranked(q):
        return rr.search(feats[q], len(feats) - 1, query_rows=q)[1]

    def counts(q, order, depth):
        t0 = time.perf_counter()
        c = np.array([[inliers(lf.of(int(i)), lf.of(int(j)), DEFAULTS["ratio"], DEFAULTS["threshold"])
                       for j in row[:depth]] for i, row in zip(q, order)])
        return c, (time.perf_counter() - t0) / max(c.size, 1)

    def apply(order, c, k, mi, w, cap=DEFAULTS["cap"]):
        out = order.copy()
        for r in range(len(order)):
            out[r, :k] = order[r, :k][inlier_order(c[r, :k], mi, w, cap)]
        return out

    o_tr = ranked(train_q)
    c_tr, per_pair = counts(train_q, o_tr, a.depth)
    base = scores(o_tr, labels, train_q)
    grid = []
    for k, mi, w in itertools.product((5, 10, 20, 30, 50), (8, 12, 20), (0.5, 1.0, 2.0, 5.0)):
        if k > a.depth:
            continue
        grid.append((scores(apply(o_tr, c_tr, k, mi, w), labels, train_q), k, mi, w))
    (best_ns, best_map), k, mi, w = max(grid, key=lambda g: (g[0][1], g[0][0]))
    o_te = ranked(test)
    c_te, _ = counts(test, o_te, k)
    held_base = scores(o_te, labels, test)
    held = scores(apply(o_te, c_te, k, mi, w), labels, test)
    print(json.dumps({
        "db": a.db, "rerank": a.rerank, "train_queries": len(train_q), "held_out_queries": len(test),
        "gallery": len(feats), "ms_per_pair": round(per_pair * 1000, 2),
        "train_base": {"ns": round(base[0], 4), "map": round(base[1], 4)},
        "chosen": {"k": k, "min_inliers": mi, "weight": w, "train_ns": round(best_ns, 4), "train_map": round(best_map, 4)},
        "held_out_base": {"ns": round(held_base[0], 4), "map": round(held_base[1], 4)},
        "held_out_verified": {"ns": round(held[0], 4), "map": round(held[1], 4)},
        "grid_top5": sorted(([round(s[0], 4), round(s[1], 4), kk, m, ww] for s, kk, m, ww in grid),
                            key=lambda g: -g[1])[:5],
    }, indent=1))


if __name__ == "__main__":
    main()
