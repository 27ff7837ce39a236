"""Fitting the learned-whitening head (the default ``ris-train`` head): its settings chosen by
cross-validation inside the training objects, and the report of what each setting gained.

The closed form and the inner cross-validation are in ``ris.head``; this module turns a training
config into a fitted head and writes its table and chart beside the model.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ris.train import TrainConfig


def fit_whitening(features: np.ndarray, labels: np.ndarray, cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Learned whitening with the settings the config fixes and the rest chosen by inner cross-validation.

    Returns mean, projection and what was chosen (kept in the model's metadata). When no candidate
    beats the raw descriptor inside the training set, the projection is the identity: the head then
    ranks exactly like the off-the-shelf features.
    """
    from ris.head import WHITEN_GRID, choose_whitening, learned_whitening
    from ris.metrics import evaluate_retrieval

    fixed = {"shrinkage": cfg.whiten_shrinkage, "power": cfg.whiten_power, "dim": cfg.whiten_dim}
    chosen: dict[str, Any] = {k: v for k, v in fixed.items() if v is not None}
    chosen["selected_by"] = "command-line flags"
    by_objects = cfg.split_by == "object"
    metric = "N-S" if by_objects else "mAP"

    def score(x, lab):
        r = evaluate_retrieval(x, lab, "euclidean", recall_ks=(), precision_ks=())
        return r.ns_score if by_objects else r.map

    if any(v is None for v in fixed.values()):
        grid = {k: (v,) if v is not None else WHITEN_GRID[k] for k, v in fixed.items()}
        try:
            # whole groups are held out in the inner folds even for Corel-style splits: the setting
            # must serve objects and classes the head has not seen, not only new images of known ones
            choice = choose_whitening(features, labels, score, folds=3, seed=cfg.seed, grid=grid)
            chosen = {k: choice.get(k) for k in ("shrinkage", "power", "dim")}
            chosen.update(inner_gain=round(choice["inner_gain"], 5), inner_raw=round(choice["inner_raw"], 5),
                          off=choice["off"], selected_by="3-fold cross-validation over the training groups",
                          metric=metric, table=choice["table"])
            if choice["off"]:
                log(f"whitening: no setting beat the raw descriptor inside the training set (inner {metric} "
                    f"{choice['inner_raw']:.4f}); the head keeps the raw ranking")
            else:
                log(f"whitening: shrinkage {chosen['shrinkage']}, power {chosen['power']}, {chosen['dim']} dims "
                    f"(inner {metric} {choice['inner_raw']:.4f} -> +{choice['inner_gain']:.4f})")
        except ValueError:  # too few groups to hold some out
            chosen = {"shrinkage": 1.0, "power": 0.5, "dim": 512,
                      **{k: v for k, v in fixed.items() if v is not None},
                      "selected_by": "defaults (too few training groups to cross-validate)"}
            log(f"whitening: too few training groups to choose by cross-validation; using shrinkage "
                f"{chosen['shrinkage']}, power {chosen['power']}, {chosen['dim']} dims")
    if chosen.get("off"):
        dim = features.shape[1]
        return {"mean": np.zeros(dim, np.float32), "projection": np.eye(dim, dtype=np.float32), **chosen}
    mean, proj = learned_whitening(features, labels, int(chosen["dim"]), float(chosen["shrinkage"]),
                                   float(chosen["power"]))
    return {"mean": mean, "projection": proj, **chosen}


def write_whitening_report(whitening: dict[str, Any], model_path: Path) -> tuple[Path, Path | None]:
    """The inner cross-validation table as CSV and a bar chart: what each whitening setting gained."""
    stem = model_path.with_suffix("")
    csv_path, png = Path(f"{stem}.history.csv"), Path(f"{stem}.history.png")
    table = whitening.get("table") or []
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["shrinkage", "power", "dim", "inner_gain"])
        w.writeheader()
        w.writerows(table)
    try:
        import matplotlib
    except ImportError:  # a bare accelerator host: the CSV is still written
        return csv_path, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(table) + 2), 3.6))
    labels = [f"s{r['shrinkage']:g} p{r['power']:g} d{r['dim']}" for r in table]
    chosen = [r["shrinkage"] == whitening.get("shrinkage") and r["power"] == whitening.get("power")
              and r["dim"] == whitening.get("dim") and not whitening.get("off") for r in table]
    ax.bar(range(len(table)), [r["inner_gain"] for r in table], color=["C1" if c else "C0" for c in chosen])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(table)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"inner {whitening.get('metric', 'score')} gain over raw")
    ax.set_title(f"learned whitening: {whitening.get('selected_by', '')}" + (" (none chosen)" if whitening.get("off") else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return csv_path, png
