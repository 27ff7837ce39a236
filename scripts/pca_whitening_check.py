"""Does whitening need the object labels? Plain PCA-whitening on the training images, no labels.

The side experiment behind a line of bench/quality.md: the same 5 folds over UKBench objects as
``ris-train --folds 5``; PCA (and whitening) fitted on each fold's training + validation images,
without their labels; N-S on the held-out objects, paired against the raw descriptor.

    python scripts/pca_whitening_check.py --features-db uk-mobilenet_v2-gap-224-1.h5
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features-db", required=True, help="labelled UKBench-style feature database")
    p.add_argument("--folds", type=int, default=5, help="folds over objects (seed 0, as ris-train --folds)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from ris.embed import raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.metrics import evaluate_retrieval
    from ris.splits import rows_of, split_objects
    from ris.topk import l2_normalize

    with FeatureDB(args.features_db) as db:
        x_all, labels = l2_normalize(raw_descriptors(db.features[:])), db.labels

    def ns(x, lab):
        return evaluate_retrieval(x, lab, "euclidean", recall_ks=(), precision_ks=()).ns_score

    deltas: dict[tuple, list[float]] = {}
    for fold in range(args.folds):
        sp = split_objects(labels, seed=0, fold=fold, folds=args.folds)
        tr = rows_of(labels, np.concatenate([sp["train"], sp["val"]]))
        te = rows_of(labels, sp["test"])
        raw = ns(x_all[te], labels[te])
        x = x_all[tr].astype(np.float64)
        mean = x.mean(0)
        w, v = np.linalg.eigh(np.cov((x - mean).T))
        order = np.argsort(w)[::-1]
        w, v = w[order], v[:, order]
        for power in (0.5, 0.25):
            for dim in (256, 512):
                for shrink in (0.0, 0.1, 1.0):  # eigenvalues shrunk toward their mean
                    proj = v[:, :dim] / (w[:dim] + shrink * w[:dim].mean()) ** power
                    deltas.setdefault((power, dim, shrink), []).append(
                        ns(l2_normalize((x_all[te] - mean) @ proj), labels[te]) - raw)
    print("power  dims  shrink   N-S delta vs raw (paired, mean +- std over folds)")
    for (power, dim, shrink), d in sorted(deltas.items(), key=lambda kv: -np.mean(kv[1])):
        print(f"{power:>5} {dim:>5} {shrink:>7}   {np.mean(d):+.4f} +- {np.std(d):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
