"""``ris-eval --index KIND``: retrieval scores through an index, beside exact search, same queries.

Why: an approximate index is only worth its speed if it ranks like exact search on real
features. Every labelled image of the split queries the index (the same index ``ris-search``
uses: saved beside the database, or the Milvus collection) for its ``depth`` nearest images;
results outside the split are dropped, the query is put first (N-S counts it, the other metrics
exclude it, as in ``ris.metrics``). Exact search is scored through the same routine, so the
difference is the index's alone. AP is computed over the top ``depth`` (relevant items further
down count as not retrieved): exact when ``depth`` >= the split size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ris.errors import DatabaseError


def ranked_scores(index, vectors, labels: np.ndarray, rows: np.ndarray, depth: int,
                  recall_ks: tuple[int, ...] = (1, 4, 10), precision_ks: tuple[int, ...] = (10,),
                  ns_k: int = 4, block: int = 64) -> dict[str, Any]:
    """Scores of the ranked lists ``index.search`` gives for ``rows`` (database row numbers),
    restricted to ``rows``."""
    from ris.metrics import _Tally

    rows = np.unique(np.asarray(rows, np.int64))
    rows = rows[labels[rows] >= 0]
    in_split = np.zeros(len(labels), bool)
    in_split[rows] = True
    lab = labels[rows]
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    npos_of = dict(zip(rows.tolist(), (counts[inverse] - 1).tolist()))
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    width = max(max_k, depth)
    tally = _Tally(recall_ks, precision_ks, ns_k)
    ranks = np.arange(1, width + 1, dtype=np.float64)
    ratio = len(labels) / max(len(rows), 1)  # results outside the split are dropped: ask for more
    search_k = int(min(len(labels), math.ceil((depth + 1) * ratio * (1.5 if ratio > 1 else 1))))
    for s in range(0, len(rows), block):
        qrows = rows[s : s + block]  # increasing, as h5py wants
        q = np.asarray(vectors[qrows], np.float32)
        _, found = index.search(q, search_k)
        top = np.zeros((len(qrows), width + 1), bool)
        ap = np.zeros(len(qrows))
        for i, (r, res) in enumerate(zip(qrows, found)):
            res = res[(res >= 0) & (res != r)]
            res = res[in_split[res]][:depth]
            rel = labels[res] == labels[r]
            top[i, 0] = True
            top[i, 1 : 1 + len(rel)] = rel
            npos = npos_of[int(r)]
            hits = np.cumsum(rel)
            ap[i] = float(np.sum(np.where(rel, hits / ranks[: len(rel)], 0.0)) / max(npos, 1))
        valid = np.array([npos_of[int(r)] > 0 for r in qrows])
        tally.add(top, ap, valid)
    return tally.scores(len(rows), len(rows)).to_dict()


def evaluate_index(features_db: str | Path, index: str, model: str | Path | None = None, split: str | None = None,
                   seed: int = 0, test_fraction: float = 0.2, depth: int = 100) -> dict[str, Any]:
    """Scores of exact search and of ``index`` on the same split; see the module docstring."""
    from ris.featuredb import FeatureDB
    from ris.index import ExactIndex, open_search_index
    from ris.index_state import source_of

    split = split or ("test" if model else "all")
    engine = None
    db = FeatureDB(features_db)
    try:
        labels = db.labels
        if (labels >= 0).sum() < 2:
            raise DatabaseError(f"{features_db}: no labels to evaluate against; extract with --labels")
        if model is not None or db.features.ndim != 2:  # embeddings or pooled maps: as ris-search makes them
            from ris.search import SearchEngine

            engine = SearchEngine(features_db, model, index=index)
            vectors, ann, metric = engine.vectors, engine.index, engine.metric
        else:
            vectors, metric = db.features, "euclidean"
            ann = open_search_index(str(db.path), vectors, metric, kind=index, source=source_of(db))
        rows = _split_rows(db, labels, split, model, seed, test_fraction)
        exact = ExactIndex(vectors, metric)
        depth = int(min(depth, len(rows) - 1))
        result = {"features_db": str(features_db), "model": None if model is None else str(model),
                  "index": index, "index_type": type(ann).__name__, "split": split, "images": int(len(rows)),
                  "depth": depth, "metric": metric,
                  "exact": ranked_scores(exact, vectors, labels, rows, depth),
                  "indexed": ranked_scores(ann, vectors, labels, rows, depth)}
        result["delta"] = {k: round(result["indexed"][k] - result["exact"][k], 4) for k in ("ns_score", "map")}
        return result
    finally:
        if engine is not None:
            engine.close()
        db.close()


def _split_rows(db, labels: np.ndarray, split: str, model, seed: int, test_fraction: float) -> np.ndarray:
    if split == "all":
        return np.nonzero(labels >= 0)[0]
    if model is not None:
        from ris.errors import DatabaseError
        from ris.modelio import read_meta

        index = {i: r for r, i in enumerate(db.image_ids)}
        test = read_meta(model)["split"].get("test_images", [])
        missing = [i for i in test if i not in index]
        if missing or not test:
            raise DatabaseError(f"{model}: its held-out images are not in this database (e.g. {missing[:1]}); "
                                f"use --split all")
        return np.sort(np.array([index[i] for i in test], dtype=np.int64))
    from ris.splits import rows_of, split_objects

    return np.sort(rows_of(labels, split_objects(labels, test_fraction, 0.1, seed)["test"]))


def format_index_table(r: dict[str, Any]) -> str:
    label = f"{r['index']} ({r['index_type']})"
    w = max(30, len(label) + 2)
    lines = [f"{r['features_db']}: {r['split']} split, {r['images']} images, ranked lists of {r['depth']} "
             f"(AP over them), metric {r['metric']}",
             f"{'search':<{w}}{'N-S':>8}{'top-4 %':>9}{'mAP':>8}{'R@1':>8}{'R@10':>8}{'P@10':>8}"]
    for key, name in (("exact", "exact"), ("indexed", label)):
        s = r[key]
        lines.append(f"{name:<{w}}{s['ns_score']:>8.3f}{s['top4_accuracy']:>9.2f}{s['map']:>8.4f}"
                     f"{s['recall_at']['1']:>8.3f}{s['recall_at']['10']:>8.3f}{s['precision_at']['10']:>8.3f}")
    lines.append(f"index - exact: N-S {r['delta']['ns_score']:+.4f}, mAP {r['delta']['map']:+.4f}")
    return "\n".join(lines)
