"""How much ``ris-eval --rerank``'s closed set (every scored image is a row of the database, as in
UKBench's and Holidays' protocols) differs from searching a photo that is not in the collection.

For each held-out query (``ris-eval --split test``: seed 0, 50 objects), the re-ranker is built on
the database without that query's row and searched with the query's vector: the query then shapes
nothing (no DBA neighbour, no graph node). Scores are those of ``ris-eval``'s whole-collection
protocol (N-S counts the query; mAP over the other images).

    python scripts/open_set_check.py uk.h5 dba+qe diffusion kreciprocal
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ris.featuredb import FeatureDB  # noqa: E402
from ris.rerank import Reranker  # noqa: E402
from ris.splits import make_split  # noqa: E402


def scores(labels: np.ndarray, query: int, ranked: np.ndarray) -> tuple[float, float]:
    rel = labels[ranked] == labels[query]
    ns = 1 + int(rel[:3].sum())
    ap = float((np.cumsum(rel) / np.arange(1, len(rel) + 1))[rel].sum() / max(rel.sum(), 1))
    return ns, ap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("features_db", help="labelled UKBench-style ris feature database (HDF5), as ris-eval reads")
    p.add_argument("methods", nargs="+", help="re-ranking methods (ris.rerank.RERANKERS)")
    args = p.parse_args(argv)
    with FeatureDB(args.features_db) as db:
        x, labels = np.asarray(db.features[:], np.float32), db.labels
    queries = make_split(labels)[0]["test"]
    n = len(labels)
    for method in args.methods:
        t0 = time.perf_counter()
        _, closed = Reranker(x, method).search(x[queries], n - 1, query_rows=queries)
        closed_s = [scores(labels, q, row) for q, row in zip(queries, closed)]
        open_s = []
        for q in queries:
            keep = np.arange(n) != q
            _, idx = Reranker(x[keep], method).search(x[q : q + 1], n - 1)
            open_s.append(scores(labels, q, np.nonzero(keep)[0][idx[0]]))
        c, o = np.mean(closed_s, axis=0), np.mean(open_s, axis=0)
        print(f"{method}: {len(queries)} held-out queries: closed set N-S {c[0]:.3f} mAP {c[1]:.4f}; "
              f"query not in the database N-S {o[0]:.3f} mAP {o[1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
