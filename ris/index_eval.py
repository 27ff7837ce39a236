"""``ris-eval --index KIND``: retrieval scores through an index, beside exact search, same queries.

Why: an approximate index is only worth its speed if it ranks like exact search on real
features. The queries and the gallery are those ``ris-eval`` scores (``ris.protocol``: held-out
queries searching the whole collection, ``--gallery split``, ``--queries`` with unlabelled rows
as distractors, a head's own split). Each query asks the index (the one ``ris-search`` uses:
saved beside the database, or the Milvus collection) for its ``depth`` nearest images; results
outside the gallery are dropped, the query is put first (N-S counts it, the other metrics
exclude it, as in ``ris.metrics``). Exact search is scored through the same routine, so the
difference is the index's alone. AP is computed over the top ``depth`` (relevant items further
down count as not retrieved): exact when ``depth`` >= the gallery size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def ranked_scores(index, vectors, labels: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray,
                  depth: int, recall_ks: tuple[int, ...] = (1, 4, 10), precision_ks: tuple[int, ...] = (10,),
                  ns_k: int = 4, block: int = 64) -> dict[str, Any]:
    """Scores of the ranked lists ``index.search`` gives for ``query_rows`` (database row numbers),
    restricted to ``gallery_rows`` (which hold the queries). Unlabelled gallery rows are never
    relevant (distractors); a query with nothing relevant in the gallery is not scored (counted)."""
    from ris.metrics import _Tally

    query_rows = np.unique(np.asarray(query_rows, np.int64))
    gallery_rows = np.unique(np.asarray(gallery_rows, np.int64))
    in_gallery = np.zeros(len(labels), bool)
    in_gallery[gallery_rows] = True
    glab = labels[gallery_rows]
    groups, counts = np.unique(glab[glab >= 0], return_counts=True)
    npos_of = dict(zip(groups.tolist(), (counts - 1).tolist()))
    npos = np.array([npos_of.get(int(labels[r]), 0) for r in query_rows], np.int64)
    without_relevant = int((npos <= 0).sum())
    query_rows, npos = query_rows[npos > 0], npos[npos > 0]
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    width = max(max_k, depth)
    tally = _Tally(recall_ks, precision_ks, ns_k)
    ranks = np.arange(1, width + 1, dtype=np.float64)
    ratio = len(labels) / max(len(gallery_rows), 1)  # results outside the gallery are dropped: ask for more
    search_k = int(min(len(labels), math.ceil((depth + 1) * ratio * (1.5 if ratio > 1 else 1))))
    for s in range(0, len(query_rows), block):
        qrows = query_rows[s : s + block]  # increasing, as h5py wants
        q = np.asarray(vectors[qrows], np.float32)
        _, found = index.search(q, search_k)
        top = np.zeros((len(qrows), width + 1), bool)
        ap = np.zeros(len(qrows))
        for i, (r, res) in enumerate(zip(qrows, found)):
            res = res[(res >= 0) & (res != r)]
            res = res[in_gallery[res]][:depth]
            rel = labels[res] == labels[r]
            top[i, 0] = True
            top[i, 1 : 1 + len(rel)] = rel
            hits = np.cumsum(rel)
            ap[i] = float(np.sum(np.where(rel, hits / ranks[: len(rel)], 0.0)) / npos[s + i])
        tally.add(top, ap, np.ones(len(qrows), bool))
    return tally.scores(len(query_rows), len(gallery_rows), without_relevant, npos).to_dict()


def evaluate_index(features_db: str | Path, index: str, model: str | Path | None = None, split: str | None = None,
                   seed: int = 0, test_fraction: float = 0.2, depth: int = 100, gallery: str = "all",
                   queries: str | Path | None = None, val_fraction: float = 0.1) -> dict[str, Any]:
    """Scores of exact search and of ``index`` on the same queries and gallery, chosen as
    ``ris-eval`` chooses them (``ris.protocol``: ``split``, ``gallery``, ``queries``, a head's
    own split); see the module docstring."""
    from ris import protocol
    from ris.featuredb import FeatureDB
    from ris.index import ExactIndex, open_search_index
    from ris.index_state import source_of

    split = split or ("test" if model else "all")
    engine = ann = None
    db = FeatureDB(features_db)
    try:
        plan, _, labels = protocol.for_database(db, features_db, model, split, gallery, seed, test_fraction,
                                                val_fraction, queries)
        if model is not None or db.features.ndim != 2:  # embeddings or pooled maps: as ris-search makes them
            from ris.search import SearchEngine

            engine = SearchEngine(features_db, model, index=index)
            vectors, ann, metric = engine.vectors, engine.index, engine.metric
        else:
            vectors, metric = db.features, "euclidean"
            ann = open_search_index(str(db.path), vectors, metric, kind=index, source=source_of(db))
        exact = ExactIndex(vectors, metric)
        depth = int(min(depth, len(plan.gallery_rows) - 1))
        scored = [ranked_scores(s, vectors, labels, plan.query_rows, plan.gallery_rows, depth) for s in (exact, ann)]
        result = {"features_db": str(features_db), "model": None if model is None else str(model),
                  "index": index, "index_type": type(ann).__name__,
                  "split": "queries" if queries is not None else split,
                  "gallery": "all" if queries is not None else gallery, "protocol": plan.description,
                  "images": int(len(plan.query_rows)), "depth": depth, "metric": metric,
                  "exact": scored[0], "indexed": scored[1]}
        result["delta"] = {k: round(result["indexed"][k] - result["exact"][k], 4) for k in ("ns_score", "map")}
        return result
    finally:
        if engine is not None:
            engine.close()  # closes its index too
        elif ann is not None and hasattr(ann, "close"):
            ann.close()  # a Milvus Lite client holds its folder's lock until closed
        db.close()


def format_index_table(r: dict[str, Any]) -> str:
    from ris.metrics import ns_note

    label = f"{r['index']} ({r['index_type']})"
    w = max(30, len(label) + 2)
    lines = [f"{r['features_db']}: {r['protocol']}; ranked lists of {r['depth']} (AP over them), "
             f"metric {r['metric']}",
             ns_note(r["exact"].get("ns_perfect", 4.0)),
             f"{'search':<{w}}{'N-S':>8}{'top-4 %':>9}{'mAP':>8}{'R@1':>8}{'R@10':>8}{'P@10':>8}"]
    for key, name in (("exact", "exact"), ("indexed", label)):
        s = r[key]
        lines.append(f"{name:<{w}}{s['ns_score']:>8.3f}{s['top4_accuracy']:>9.2f}{s['map']:>8.4f}"
                     f"{s['recall_at']['1']:>8.3f}{s['recall_at']['10']:>8.3f}{s['precision_at']['10']:>8.3f}")
    lines.append(f"index - exact: N-S {r['delta']['ns_score']:+.4f}, mAP {r['delta']['map']:+.4f}")
    return "\n".join(lines)
