"""Per-query AP of two databases of the same images on the same queries, paired: is the mAP
difference larger than the spread over queries? (bench/quality.md, 2026-12-02)

    python scripts/paired_map.py corel-a.h5 corel-b.h5 --queries corel_queries.txt --rerank dba+qe
    python scripts/paired_map.py uk-a.h5 uk-b.h5 --rerank dba+qe      # UKBench held-out objects

AP as ris-eval computes it (query excluded, whole labelled collection searched); the 95% interval
of the mean difference is a paired bootstrap over queries (10,000 resamples, seed 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ris.embed import raw_descriptors  # noqa: E402
from ris.featuredb import FeatureDB  # noqa: E402
from ris.protocol import gallery_labels, read_query_ids  # noqa: E402
from ris.rerank import Reranker  # noqa: E402
from ris.splits import rows_of, split_objects  # noqa: E402


def per_query_ap(path: str, queries: str | None, rerank: str) -> tuple[list[str], np.ndarray]:
    with FeatureDB(path) as db:
        ids, labels = list(db.image_ids), np.asarray(db.labels)
        rows = np.nonzero(labels >= 0)[0]
        feats = raw_descriptors(db.read_rows(rows))
    lab = gallery_labels(labels[rows])
    gids = [ids[r] for r in rows]
    if queries:
        wanted = set(read_query_ids(queries))
        q = np.array([i for i, g in enumerate(gids) if g in wanted])
    else:
        q = np.searchsorted(rows, rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"]))
    order = np.argsort([gids[i] for i in q])  # pair the two databases by image id
    q = q[order]
    n = len(lab)
    _, idx = Reranker(feats, rerank).search(feats[q], n - 1, query_rows=q)
    rel = lab[idx] == lab[q, None]
    npos = np.array([(lab == lab[i]).sum() - 1 for i in q])
    prec = np.cumsum(rel, axis=1) / np.arange(1, n)
    ap = (prec * rel).sum(axis=1) / np.maximum(npos, 1)
    return [gids[i] for i in q], ap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="database A, a labelled ris feature database (HDF5)")
    ap.add_argument("b", help="database B: the same images as A; the difference is B - A")
    ap.add_argument("--queries", default=None, help="query ids (default: UKBench held-out objects, seed 0)")
    ap.add_argument("--rerank", default="none",
                    help="re-ranking method (ris.rerank.RERANKERS) at its default settings (default: %(default)s)")
    args = ap.parse_args()
    ida, apa = per_query_ap(args.a, args.queries, args.rerank)
    idb, apb = per_query_ap(args.b, args.queries, args.rerank)
    if ida != idb:
        sys.exit("the two databases do not have the same query images")
    d = apb - apa
    boot = np.random.default_rng(0).choice(d, (10_000, len(d))).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"{len(d)} queries, {args.rerank}: mAP {apa.mean():.4f} -> {apb.mean():.4f}, "
          f"difference {d.mean():+.4f} (95% {lo:+.4f} .. {hi:+.4f}); better {int((d > 1e-9).sum())}, "
          f"worse {int((d < -1e-9).sum())}, level {int((np.abs(d) <= 1e-9).sum())}")


if __name__ == "__main__":
    main()
