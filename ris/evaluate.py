"""Scoring a feature database, off the shelf and through a trained head, on the same objects.

Imports nothing of training: raw features and a learned-whitening head are scored in NumPy, so
only a triplet head loads Keras.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ris.errors import DatabaseError, ModelError, RisError


def evaluate_db(features_db: str | Path, model: str | Path | None = None, split: str = "test",
                seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1,
                rerank: str = "none") -> dict[str, Any]:
    """Returns {'split': ..., 'raw': scores, 'head': scores?}. ``split``: 'test' or 'all'.

    With ``model``, 'test' is the model's own held-out images; its metadata, the database's
    compatibility and the rows are checked before the head is loaded.
    """
    from ris.embed import embed_features, head_inputs, raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.modelio import check_compatible, load_model, read_meta

    if split not in ("test", "all"):
        raise RisError(f"--split must be test or all, not {split!r}")
    with FeatureDB(features_db) as db:
        labels = db.labels
        if (labels >= 0).sum() < 2:
            raise DatabaseError(f"{features_db}: no labels to evaluate against; extract with --labels")
        meta = None
        if model is not None:
            meta = read_meta(model)
            check_compatible(meta, db.fingerprint(), str(features_db))
        rows, described = _rows_to_score(db, meta, model, split, seed, test_fraction, val_fraction)
        feats = db.read_rows(rows)
        lab = labels[rows]
        pooling = (meta or {}).get("config", {}).get("pooling", "gap")
        result: dict[str, Any] = {
            "features_db": str(features_db),
            "backbone": db.attrs.get("model"),
            "input_size": db.attrs.get("input_size"),
            "pooling": db.attrs.get("pooling"),
            "split": split,
            "split_description": described,
            "objects": int(len(np.unique(lab))),
            "images": int(len(rows)),
            "rerank": rerank,
            "raw": _score(raw_descriptors(feats, pooling), lab, rerank),
        }
        result["queries_without_relevant"] = result["raw"]["queries_without_relevant"]  # scored by no metric
        if model is not None:
            head, meta = load_model(model)
            result["model"] = str(model)
            result["distance"] = meta.get("distance", "euclidean")
            emb = embed_features(head, head_inputs(meta, db, rows, feats))
            result["head"] = _score(emb, lab, rerank, result["distance"])
        return result


def _rows_to_score(db, meta: dict[str, Any] | None, model, split: str, seed: int, test_fraction: float,
                   val_fraction: float) -> tuple[np.ndarray, str]:
    """The database rows ``split`` names, and how to describe them."""
    from ris.splits import rows_of, split_objects

    labels = db.labels
    if split == "all":
        described = "all labelled images"
        if meta is not None:
            described += " (includes the head's training objects: not a held-out score)"
        return np.nonzero(labels >= 0)[0], described
    if meta is None:
        test_objects = split_objects(labels, test_fraction, val_fraction, seed)["test"]
        return rows_of(labels, test_objects), f"held-out test objects (seed {seed}, {test_fraction:.0%} of objects)"
    test_images = meta["split"].get("test_images")
    if not isinstance(test_images, list):
        raise ModelError(f"{model}: its metadata lists no test images; use --split all")
    by = meta["split"].get("by", "object")
    return _rows_by_id(test_images, db.image_ids), (
        f"held-out test {'objects' if by == 'object' else 'images of every class'} "
        f"of the model's split (seed {meta['config'].get('seed')})")


def _rows_by_id(image_ids: list[str], db_ids: list[str]) -> np.ndarray:
    index = {i: r for r, i in enumerate(db_ids)}
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise DatabaseError(f"the model's test images are not in this database (e.g. {missing[0]!r})")
    return np.sort(np.array([index[i] for i in image_ids], dtype=np.int64))


def format_table(result: dict[str, Any]) -> str:
    """A plain-text results table for the terminal."""
    cols = ["N-S", "top-4 %", "mAP", "R@1", "R@4", "R@10", "P@10"]
    rr = result.get("rerank", "none")
    lines = [f"{result['features_db']}: {result['backbone']} @ {result['input_size']} px, pooling {result['pooling']}"
             + (f", re-ranking {rr}" if rr != "none" else ""),
             f"split: {result['split_description']} - {result['objects']} objects, {result['images']} images",
             "N-S counts the query (perfect 4.0 for groups of 4); mAP, R@k, P@k exclude it."]
    lonely = max(int(result[k].get("queries_without_relevant", 0)) for k in ("raw", "head") if k in result)
    if lonely:
        lines.append(f"{lonely} {'query' if lonely == 1 else 'queries'} without another image of its group in the "
                     f"split: not scored by any metric.")
    lines += ["", f"{'descriptor':<22}" + "".join(f"{c:>9}" for c in cols)]
    for key, name in (("raw", "off-the-shelf"), ("head", "trained head")):
        if key in result:
            s = result[key]
            vals = [s["ns_score"], s["top4_accuracy"], s["map"], s["recall_at"].get("1"), s["recall_at"].get("4"),
                    s["recall_at"].get("10"), s["precision_at"].get("10")]
            lines.append(f"{name:<22}" + "".join(f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in vals))
    return "\n".join(lines)


def evaluate_folds(features_db: str | Path, folds: int = 5, seed: int = 0, rerank: str = "none",
                   split_by: str = "object") -> dict[str, Any]:
    """Off-the-shelf scores on each k-fold test part (the same parts ``ris-train --folds`` holds
    out), with mean and std, so raw features and trained heads are compared on equal ground."""
    from ris.embed import raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.splits import make_split

    per_fold = []
    with FeatureDB(features_db) as db:
        labels = db.labels
        for fold in range(folds):
            rows, _ = make_split(labels, split_by, seed=seed, fold=fold, folds=folds)
            feats = raw_descriptors(db.read_rows(rows["test"]))
            per_fold.append(_score(feats, labels[rows["test"]], rerank))
        attrs = db.attrs
    keys = {"ns_score": lambda s: s["ns_score"], "top4_accuracy": lambda s: s["top4_accuracy"],
            "map": lambda s: s["map"], "precision_at_10": lambda s: s["precision_at"]["10"],
            "recall_at_1": lambda s: s["recall_at"]["1"]}
    summary = {k: {"mean": round(float(np.mean([f(s) for s in per_fold])), 4),
                   "std": round(float(np.std([f(s) for s in per_fold])), 4)} for k, f in keys.items()}
    return {"features_db": str(features_db), "backbone": attrs.get("model"), "input_size": attrs.get("input_size"),
            "pooling": attrs.get("pooling"), "folds": folds, "seed": seed, "rerank": rerank,
            "per_fold": per_fold, "summary": summary}


def _score(feats: np.ndarray, labels: np.ndarray, rerank: str = "none", metric: str = "euclidean") -> dict[str, Any]:
    from ris.metrics import evaluate_retrieval

    if rerank == "none":
        return evaluate_retrieval(feats, labels, metric).to_dict()
    from ris.rerank import evaluate_reranked

    return evaluate_reranked(feats, labels, rerank, metric=metric).to_dict()
