"""Scoring a feature database, off the shelf and through a trained head, on the same objects.

Imports nothing of training: raw features and a learned-whitening head are scored in NumPy, so
only a triplet head loads Keras.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ris.errors import RisError, yes_no

if TYPE_CHECKING:
    from ris.metrics import RetrievalScores


def _check_settings(seed: Any, test_fraction: Any, val_fraction: Any) -> None:
    """The ranges ris-eval's --seed and the split's fractions have, for a caller in Python (seed=-1
    was NumPy's bare ValueError)."""
    from ris.train_checks import is_real, is_whole

    if not is_whole(seed, 0):
        raise RisError(f"seed must be a whole number, 0 or more, not {seed!r}")
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not (is_real(value) and 0 <= value < 1):
            raise RisError(f"{name} must be a number in [0, 1), not {value!r}")


def evaluate_db(features_db: str | Path, model: str | Path | None = None, split: str | None = None,
                seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1,
                rerank: str = "none", gallery: str = "all", queries: str | Path | None = None,
                verify: dict[str, Any] | None = None, rotations: bool = False) -> dict[str, Any]:
    """Returns {'split': ..., 'raw': scores, 'head': scores?}. ``split``: 'test' or 'all' (None: 'test'
    with a model, 'all' without, as ris-eval chooses);
    ``gallery``, ``queries``: the protocol (``ris.protocol``); ``verify``: geometric verification
    settings (``ris.verify``), applied after ``rerank``. ``rotations``: every scored query is
    described again from its image file (under the database's dataset folder) at 0/90/180/270
    degrees, as ``ris-search --rotations`` describes a query; the gallery stays the stored rows.

    With ``model``, 'test' is the model's own held-out images; its metadata, the database's
    compatibility and the rows are checked before the head is loaded.
    """
    from ris import protocol
    from ris.embed import embed_features, head_inputs, raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.modelio import load_model

    rotations = yes_no("rotations", rotations)
    _check_settings(seed, test_fraction, val_fraction)
    if verify is not None:
        from ris.verify import check_params

        verify = check_params(verify)
    split = split or ("test" if model else "all")
    if split not in ("test", "all"):
        raise RisError(f"--split must be test or all, not {split!r}")
    if rotations:
        from ris.rotations import check_rerank

        check_rerank(rerank)
        if verify:
            raise RisError("--rotations cannot be combined with --verify in ris-eval (ris-search combines them)")
    with FeatureDB(features_db) as db:
        plan, meta, labels = protocol.for_database(db, features_db, model, split, gallery, seed, test_fraction,
                                                   val_fraction, queries)
        feats = db.read_rows(plan.gallery_rows)
        plan, feats, not_finite = _without_nonfinite(plan, feats)
        rows = plan.gallery_rows
        lab = protocol.gallery_labels(labels[rows])
        pos = plan.positions()
        pooling = (meta or {}).get("config", {}).get("pooling", "gap")
        checker = None
        if verify:
            from ris.verify import Verifier

            checker = Verifier.for_database(db, features_db, rows, **verify)
        turned = None
        if rotations:
            turned, seconds = _turned_queries(db, features_db, rows[pos], meta)
        result: dict[str, Any] = {
            "features_db": str(features_db),
            **recipe_fields(db.attrs),
            "split": "queries" if queries is not None else split,
            "gallery": "all" if queries is not None else gallery,
            "split_description": plan.description,
            "objects": int(len(np.unique(lab[pos]))),
            "images": int(len(pos)),
            "gallery_images": int(len(rows)),
            "rerank": rerank,
            "raw": _score(raw_descriptors(feats, pooling), lab, rerank, query_rows=pos, verifier=checker,
                          query_vectors=None if turned is None else
                          raw_descriptors(turned.reshape(-1, turned.shape[2]), pooling).reshape(turned.shape)),
        }
        if rotations:
            result["rotations"] = {"angles": [0, 90, 180, 270], "queries_embedded": int(len(pos)),
                                   "embed_ms_per_query": round(1000 * seconds / max(len(pos), 1), 1)}
        if len(not_finite):  # never returned by ris-search either: scored as if they were not there
            result["not_finite"] = {"rows": int(len(not_finite)), "image_ids": db.row_names().many(not_finite.tolist())}
        if plan.training_in_db is not None:
            result["training_images_in_db"] = plan.training_in_db
        if checker is not None:
            result["verify"] = checker.describe()
        result["queries_without_relevant"] = result["raw"]["queries_without_relevant"]  # scored by no metric
        if not result["raw"]["queries"]:  # every metric would read 0.000, as if the search had failed
            raise RisError(f"{features_db}: no query has another image of its group in the "
                           f"{'whole collection' if gallery == 'all' else 'gallery'} "
                           f"({result['queries_without_relevant']} alone in theirs): nothing to score; each object "
                           "or class needs two labelled images or more")
        if model is not None:
            head, meta = load_model(model)
            result["model"] = str(model)
            result["distance"] = meta.get("distance", "euclidean")
            emb = embed_features(head, head_inputs(meta, db, rows, feats))
            q_emb = None
            if turned is not None:
                q_emb = embed_features(head, turned.reshape(-1, turned.shape[2])).reshape(len(pos), turned.shape[1], -1)
            result["head"] = _score(emb, lab, rerank, result["distance"], query_rows=pos, verifier=checker,
                                    query_vectors=q_emb)
        return result


def _without_nonfinite(plan, feats: np.ndarray):
    """(plan, features, rows left out): gallery rows whose features hold NaN/inf leave the gallery
    and the queries. No distance to them means anything (NaN compares false: every positive ranked
    first, mAP above 1), and ris-search never returns them."""
    from dataclasses import replace

    from ris.topk import nonfinite_rows

    bad_pos = nonfinite_rows(feats)
    if not len(bad_pos):
        return plan, feats, np.zeros(0, np.int64)
    finite = np.ones(len(feats), bool)
    finite[bad_pos] = False
    bad = plan.gallery_rows[bad_pos]
    plan = replace(plan, gallery_rows=plan.gallery_rows[finite], query_rows=np.setdiff1d(plan.query_rows, bad))
    return plan, feats[finite], bad


def _turned_queries(db, features_db, rows: np.ndarray, meta: dict[str, Any] | None) -> tuple[np.ndarray, float]:
    """(len(rows), 4, D) descriptors of the query rows' image files turned 0/90/180/270 degrees, and
    the seconds it took. The files are read from the database's dataset folder, so a database whose
    folder is gone (or a head with a thumbnail branch, which would need turned thumbnails too) is
    refused in one line."""
    import time

    from ris.extractor import FeatureExtractor
    from ris.rotations import embed_turned

    if int((meta or {}).get("config", {}).get("shallow", 0) or 0):
        raise RisError("--rotations does not support heads with a thumbnail branch (--shallow)")
    root = db.images_folder("--rotations (it describes the query images again)")
    ids = db.image_ids
    t0 = time.perf_counter()
    turned = embed_turned(FeatureExtractor.from_attrs(db.attrs), [root / ids[int(r)] for r in rows])
    return turned, time.perf_counter() - t0


def recipe_fields(attrs: dict[str, Any]) -> dict[str, Any]:
    """The recipe the scores were made with, every setting of it: with only the backbone, size and
    pooling, a --flip, --aspect keep or multi-scale database read the same as the plain one."""
    def parsed(value: Any) -> Any:  # a fusion's per-part values are stored as JSON text
        return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value

    fusion, scales = parsed(attrs.get("fusion")), parsed(attrs.get("scales"))
    return {"backbone": attrs.get("model"), "input_size": attrs.get("input_size"),
            "scales": scales if isinstance(scales, list) else None,  # 'none': a database made without a CNN
            "pooling": attrs.get("pooling"), "fusion_weights": fusion.get("weights") if isinstance(fusion, dict) else None,
            "flip": bool(attrs.get("flip", False)), "aspect": str(attrs.get("aspect") or "squash")}


def recipe_line(r: dict[str, Any]) -> str:
    """``recipe_fields`` as the tables' first line shows them: 'mobilenet_v2 @ 224 px, pooling gap, --flip'."""
    def flat(v: Any) -> list:
        return [y for x in v for y in flat(x)] if isinstance(v, (list, tuple)) else [v]

    scales = r.get("scales")
    per_part = scales and isinstance(scales[0], list)
    shown = "+".join(",".join(f"{x:g}" for x in p) for p in scales) if per_part else ",".join(f"{x:g}" for x in scales or [])
    return (f"{r['backbone']} @ {r['input_size']} px"
            + (f", scales {shown}" if any(x != 1 for x in flat(scales or [])) else "") + f", pooling {r['pooling']}"
            + (f", fusion weights {'+'.join(f'{w:g}' for w in r['fusion_weights'])}" if r.get("fusion_weights") else "")
            + (", --flip" if r.get("flip") else "") + (f", --aspect {r['aspect']}" if r.get("aspect", "squash") != "squash" else ""))


def format_table(result: dict[str, Any]) -> str:
    """A plain-text results table for the terminal."""
    from ris.metrics import ns_note

    cols = ["N-S", "top-4 %", "mAP", "R@1", "R@4", "R@10", "P@10"]
    rr = result.get("rerank", "none")
    # 'groups': UKBench's objects, Holidays' scenes, a folder's classes alike (JSON keeps "objects")
    lines = [f"{result['features_db']}: {recipe_line(result)}"
             + (f", re-ranking {rr}" if rr != "none" else "")
             + (", query-time rotations (0/90/180/270)" if "rotations" in result else ""),
             f"queries: {result['split_description']} - {result['objects']} group{'' if result['objects'] == 1 else 's'}, "
             f"{result['images']} query image{'' if result['images'] == 1 else 's'}"
             + (f", gallery {result['gallery_images']} images" if "gallery_images" in result else ""),
             f"{ns_note(min(result[k].get('ns_perfect', 4.0) for k in ('raw', 'head') if k in result))}; "
             "mAP, R@k, P@k exclude it."]
    lonely = max(int(result[k].get("queries_without_relevant", 0)) for k in ("raw", "head") if k in result)
    if lonely:
        lines.append(f"{lonely} {'query' if lonely == 1 else 'queries'} without another image of its group in the "
                     f"split: not scored by any metric.")
    if "not_finite" in result:
        bad = result["not_finite"]
        lines.append(f"{bad['rows']} image(s) left out: their features are not finite (NaN/inf), so ris-search never "
                     f"returns them: {', '.join(bad['image_ids'][:5])}{' ...' if bad['rows'] > 5 else ''}")
    lines += ["", f"{'descriptor':<22}" + "".join(f"{c:>9}" for c in cols)]
    for key, name in (("raw", "off-the-shelf"), ("head", "trained head")):
        if key in result:
            s = result[key]
            vals = [s["ns_score"], s["top4_accuracy"], s["map"], s["recall_at"].get("1"), s["recall_at"].get("4"),
                    s["recall_at"].get("10"), s["precision_at"].get("10")]
            lines.append(f"{name:<22}" + "".join(f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in vals))
    return "\n".join(lines)


def evaluate_folds(features_db: str | Path, folds: int = 5, seed: int = 0, rerank: str = "none",
                   split_by: str = "object", gallery: str = "all") -> dict[str, Any]:
    """Off-the-shelf scores on each k-fold test part (the same parts ``ris-train --folds`` holds
    out), with mean and std, so raw features and trained heads are compared on equal ground.
    ``gallery='all'``: each fold's queries search every labelled image (whole-collection protocol)."""
    from ris import protocol
    from ris.embed import raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.splits import make_split

    per_fold = []
    with FeatureDB(features_db) as db:
        labels = db.labels
        for fold in range(folds):
            rows, _ = make_split(labels, split_by, seed=seed, fold=fold, folds=folds)
            g = rows["test"] if gallery == "split" else np.nonzero(labels >= 0)[0]
            fold_plan = protocol.Protocol(query_rows=rows["test"], gallery_rows=g, description="")
            fold_plan, feats, _ = _without_nonfinite(fold_plan, db.read_rows(g))  # as evaluate_db
            g = fold_plan.gallery_rows
            per_fold.append(_score(raw_descriptors(feats), labels[g], rerank, query_rows=fold_plan.positions()))
        attrs = db.attrs
    keys = {"ns_score": lambda s: s["ns_score"], "top4_accuracy": lambda s: s["top4_accuracy"],
            "map": lambda s: s["map"], "precision_at_10": lambda s: s["precision_at"]["10"],
            "recall_at_1": lambda s: s["recall_at"]["1"]}
    summary = {k: {"mean": round(float(np.mean([f(s) for s in per_fold])), 4),
                   "std": round(float(np.std([f(s) for s in per_fold])), 4)} for k, f in keys.items()}
    return {"features_db": str(features_db), **recipe_fields(attrs), "folds": folds, "seed": seed, "split_by": split_by, "rerank": rerank,
            "gallery": gallery, "per_fold": per_fold, "summary": summary,
            "ns_perfect": round(float(np.mean([s.get("ns_perfect", 4.0) for s in per_fold])), 4)}


def _score(feats: np.ndarray, labels: np.ndarray, rerank: str = "none", metric: str = "euclidean",
           query_rows: np.ndarray | None = None, verifier=None, query_vectors: np.ndarray | None = None) -> dict[str, Any]:
    from ris.metrics import evaluate_retrieval

    if verifier is not None:
        return verifier.evaluate(feats, labels, rerank, metric, query_rows).to_dict()
    if query_vectors is not None:  # the queries' own (turned) descriptors; "none" ranks as evaluate_retrieval
        return evaluate_reranked(feats, labels, rerank, metric=metric, query_rows=query_rows,
                                 query_vectors=query_vectors).to_dict()
    if rerank == "none":
        return evaluate_retrieval(feats, labels, metric, query_rows=query_rows).to_dict()
    return evaluate_reranked(feats, labels, rerank, metric=metric, query_rows=query_rows).to_dict()


def evaluate_reranked(features: np.ndarray, labels: np.ndarray, method: str = "none",
                      metric: str = "euclidean", recall_ks: tuple[int, ...] = (1, 4, 10),
                      precision_ks: tuple[int, ...] = (10,), block: int = 256, ns_k: int = 4,
                      query_rows: np.ndarray | None = None, depth: int | None = None,
                      query_vectors: np.ndarray | None = None, **params) -> "RetrievalScores":
    """``ris.metrics.evaluate_retrieval`` on re-ranked lists (closed set, same conventions).

    Every labelled row (or only ``query_rows``) queries all labelled rows; its own row is forced to
    rank 1 (counted for N-S only). AP is computed over the re-ranked top ``depth`` list, query
    excluded: relevant items beyond ``depth`` count as never retrieved, so AP is exact when
    ``depth = N - 1`` (the default when N <= 5000; 1000 otherwise, then a lower bound).
    ``method="none"`` reproduces ``evaluate_retrieval`` exactly. ``query_vectors`` (len(query_rows),
    V, D): what each query searches with instead of its stored row (``ris-eval --rotations``: its
    V turned copies; each row keeps its best score); every label must then be >= 0.
    """
    from ris.metrics import _Tally, labelled_queries, positives
    from ris.rerank import Reranker

    qv = None
    if query_vectors is not None:
        qv = np.asarray(query_vectors, np.float32)
        if query_rows is None or qv.ndim != 3 or len(qv) != len(query_rows) or (np.asarray(labels) < 0).any():
            raise ValueError("query_vectors: one (V, D) block per query row, and every label >= 0")
        where = np.full(len(labels), -1, np.int64)
        where[np.asarray(query_rows, np.int64)] = np.arange(len(qv))
    features, labels, qidx, without_relevant = labelled_queries(features, labels, query_rows)
    n, nq = len(labels), len(qidx)
    depth = (n - 1 if n <= 5000 else 1000) if depth is None else int(min(depth, n - 1))
    max_k = max(max(recall_ks, default=1), max(precision_ks, default=1), ns_k)
    if depth < min(max_k, n - 1):  # fewer than k candidates in all: truncate, as evaluate_retrieval does
        raise ValueError(f"depth {depth} is shorter than the metrics need ({max_k})")
    npos_all = positives(labels)
    reranker = Reranker(features, method, metric, **params)
    tally = _Tally(recall_ks, precision_ks, ns_k)
    for s in range(0, nq, block):
        rows = qidx[s : s + block]
        if qv is None:
            _, idx = reranker.search(features[rows], depth, query_rows=rows, block=block)
        else:
            _, idx = reranker.search(qv[where[rows]].reshape(-1, qv.shape[2]), depth, query_rows=rows,
                                     block=block, variants=qv.shape[1])
        tally.add_ranked(labels, rows, idx, npos_all)
    return tally.scores(nq, n, without_relevant, npos_all[qidx])
