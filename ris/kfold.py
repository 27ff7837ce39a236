"""K-fold training: one head per fold, each scored on the part it never saw, then mean +- std and
the paired difference head - raw per fold.

``ris-train --folds K`` and ``scripts/quality_report.py`` both run this loop; ``ris-eval --folds K``
scores the off-the-shelf features on the same test parts (``ris.evaluate.evaluate_folds``).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ris.train import TrainConfig, TrainResult, train_head

SUMMARY_METRICS = {"ns_score": lambda s: s["ns_score"], "map": lambda s: s["map"],
                   "top4_accuracy": lambda s: s["top4_accuracy"], "recall_at_1": lambda s: s["recall_at"]["1"]}


def fold_path(output: str | Path, fold: int) -> Path:
    """Where fold ``fold`` (0-based) of a k-fold run saves its head: ``model.fold1.keras``..."""
    out = Path(output)
    return out.with_name(f"{out.stem}.fold{fold + 1}{out.suffix}")


def train_folds(features_db: str | Path, output: str | Path, cfg: TrainConfig, folds: int, progress: bool = True,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[TrainResult]:
    """Train ``cfg``'s head once per fold; fold k holds out part k of the objects (or of every class's
    images with ``split_by="image"``) and is saved at ``fold_path(output, k)``."""
    from ris.train_checks import check_output

    for fold in range(folds):  # every fold's file before any fold's hours of training
        check_output(features_db, fold_path(output, fold))
    results = []
    for fold in range(folds):
        log(f"== fold {fold + 1}/{folds}")
        results.append(train_head(features_db, fold_path(output, fold), replace(cfg, fold=fold, folds=folds),
                                  progress=progress, log=log))
        if results[-1].interrupted_by is not None:
            from ris.errors import Interrupted
            from ris.train_report import epoch_zero_note

            r = results[-1]
            raise Interrupted(f"interrupted ({r.interrupted_by}) in fold {fold + 1}/{folds} after {r.epochs_run} "
                              f"complete epochs: its best epoch so far ({r.best_epoch}) is saved in {r.model_path}"
                              f"{epoch_zero_note(r.best_epoch)}; the folds after it were not trained and no summary "
                              "is given")
    return results


def _mean_std(values) -> dict[str, float]:
    """Mean and population standard deviation (ddof 0) over the folds, as ris-eval --folds reports."""
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}


def summarize_folds(results: list[TrainResult]) -> dict[str, Any]:
    """Mean and std over folds of the held-out scores, for raw features and the head; ``delta``:
    head - raw on the same fold, the comparison that fold-to-fold spread does not blur."""
    out: dict[str, Any] = {}
    for key in ("raw", "head"):
        rows = [r.scores[key] for r in results if key in r.scores]
        if rows:
            out[key] = {m: _mean_std([get(r) for r in rows]) for m, get in SUMMARY_METRICS.items()}
    rows = [r.scores["raw"] for r in results if "raw" in r.scores]
    if rows:  # groups smaller than 4 (Holidays' scenes): what the folds' N-S is read against, as ris-eval --folds
        out["ns_perfect"] = round(float(np.mean([s.get("ns_perfect", 4.0) for s in rows])), 4)
    paired = [r for r in results if "raw" in r.scores and "head" in r.scores]
    if paired:
        out["delta"] = {}
        for m in ("ns_score", "map"):
            d = np.array([r.scores["head"][m] - r.scores["raw"][m] for r in paired])
            out["delta"][m] = {**_mean_std(d), "folds_better": int((d > 0).sum()), "folds_worse": int((d < 0).sum())}
    return out


def format_summary(summary: dict[str, Any], folds: int) -> str:
    """The summary as the lines ``ris-train --folds`` prints."""
    lines = []
    for key in ("raw", "head"):
        if key in summary:
            s = summary[key]
            lines.append(f"{key:>4}: N-S {s['ns_score']['mean']:.4f} +- {s['ns_score']['std']:.4f}  "
                         f"mAP {s['map']['mean']:.4f} +- {s['map']['std']:.4f}  over {folds} folds, each fold's held-out "
                         "queries searching the whole collection")
    if "delta" in summary:
        d = summary["delta"]
        lines.append("head - raw, paired per fold: " + ";  ".join(
            f"{name} {d[m]['mean']:+.4f} +- {d[m]['std']:.4f} (better in {d[m]['folds_better']}, worse in "
            f"{d[m]['folds_worse']} of {folds})" for m, name in (("ns_score", "N-S"), ("map", "mAP"))))
    if summary.get("ns_perfect", 4.0) < 4.0:  # the same line as ris-eval --folds
        from ris.metrics import ns_note

        lines.append(f"{ns_note(summary['ns_perfect'])} (mean over the folds)")
    return "\n".join(lines)
