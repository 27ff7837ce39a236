"""Choose a descriptor fusion's part weight and per-part whitening on UKBench *training* objects,
then score the choice once on the held-out objects and on Corel (bench/quality.md, 2026-12-02).

Each part is a single-backbone database of the same images (``ris-extract`` once per backbone);
the fused descriptor is built here as ``ris.fusion.fuse`` builds it at extraction (each part
L2-normalised, optionally PCA-whitened, weighted, concatenated, L2-normalised), so a grid costs
no extra extraction. The training queries are every image of the objects ``ris-eval --split test``
does not hold out (seed 0, 20%), searching the whole collection; nothing here looks at the
held-out objects or Corel before the choice is printed.

    python scripts/fusion_choose.py --uk uk-mnv2-224.h5 uk-lite2-384.h5 \\
        --corel corel-mnv2-224.h5 corel-lite2-384.h5 --corel-queries corel_queries.txt

PCA-whitening ("pca-P-S"): fitted per part on all images of the database being scored, without
labels; eigenvalues shrunk by S x their mean, power P (0.5 = full whitening).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ris.evaluate import _score  # noqa: E402
from ris.featuredb import FeatureDB  # noqa: E402
from ris.fusion import fuse  # noqa: E402
from ris.protocol import gallery_labels, read_query_ids  # noqa: E402
from ris.splits import rows_of, split_objects  # noqa: E402
from ris.topk import l2_normalize  # noqa: E402


def load(paths: list[str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """(image ids, labels, one (N, D) array per part in the first database's row order)."""
    with FeatureDB(paths[0]) as db:
        ids, labels = list(db.image_ids), np.asarray(db.labels)
    parts = []
    for p in paths:
        with FeatureDB(p) as db:
            where = {i: r for r, i in enumerate(db.image_ids)}
            if set(where) != set(ids):
                sys.exit(f"{p}: not the same images as {paths[0]}")
            feats = np.asarray(db.features[:], np.float32)
            parts.append(l2_normalize(feats[[where[i] for i in ids]]))
    return ids, labels, parts


def pca_whiten(x: np.ndarray, power: float, shrink: float) -> np.ndarray:
    mean = x.mean(0)
    xc = (x - mean).astype(np.float64)
    w, v = np.linalg.eigh(xc.T @ xc / len(x))
    w = np.maximum(w, 0) + shrink * w.mean()
    return l2_normalize((xc @ (v / w**power)).astype(np.float32))


def whitened(parts: list[np.ndarray], how: str) -> list[np.ndarray]:
    if how == "none":
        return parts
    _, power, shrink = how.split("-")
    return [pca_whiten(p, float(power), float(shrink)) for p in parts]


def scores(feats: np.ndarray, labels: np.ndarray, queries: np.ndarray, rerank: str) -> dict:
    rows = np.nonzero(labels >= 0)[0]
    pos = np.searchsorted(rows, queries)
    s = _score(feats[rows], gallery_labels(labels[rows]), rerank, query_rows=pos)
    return {"ns": s["ns_score"], "map": s["map"], "p10": s["precision_at"]["10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uk", nargs="+", required=True, help="UKBench part databases (same images)")
    ap.add_argument("--corel", nargs="*", default=[], help="Corel part databases, same order")
    ap.add_argument("--corel-queries", default="corel_queries.txt",
                    help="Corel query list for --corel, one image id per line (scripts/corel_queries.py "
                         "writes it) (default: %(default)s)")
    ap.add_argument("--weights", default="0.5,0.75,1,1.5,2", help="weights of the last part (the others 1)")
    ap.add_argument("--whiten", default="none,pca-0.5-1,pca-0.25-0.1",
                    help="comma-separated per-part whitenings tried: none or pca-P-S (power P, eigenvalues "
                         "shrunk by S x their mean; see above) (default: %(default)s)")
    args = ap.parse_args()

    ids, labels, parts = load(args.uk)
    test = rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"])
    train = np.setdiff1d(np.nonzero(labels >= 0)[0], test)
    print(f"training queries: {len(train)} images of {len(np.unique(labels[train]))} objects; "
          f"held-out: {len(test)}", flush=True)
    grid = []
    for how in args.whiten.split(","):
        wp = whitened(parts, how)
        for w in (float(x) for x in args.weights.split(",")):
            weights = [1.0] * (len(wp) - 1) + [w]
            fused = fuse(wp, weights)
            row = {"whiten": how, "weight": w,
                   **{f"plain_{k}": v for k, v in scores(fused, labels, train, "none").items()},
                   **{f"dba_{k}": v for k, v in scores(fused, labels, train, "dba+qe").items()}}
            grid.append(row)
            print(f"train  {how:<14} w={w:<5g} plain N-S {row['plain_ns']:.3f} mAP {row['plain_map']:.4f} | "
                  f"dba+qe N-S {row['dba_ns']:.3f} mAP {row['dba_map']:.4f}", flush=True)
    for i, p in enumerate(parts):
        print(f"train  part {i + 1} alone: plain mAP {scores(p, labels, train, 'none')['map']:.4f}, "
              f"dba+qe mAP {scores(p, labels, train, 'dba+qe')['map']:.4f}")
    best = max(grid, key=lambda r: (r["dba_map"], r["plain_map"]))
    print(f"chosen on training objects (dba+qe mAP, then plain mAP): whiten {best['whiten']}, "
          f"last part's weight {best['weight']:g}")
    weights = [1.0] * (len(parts) - 1) + [best["weight"]]
    fused = fuse(whitened(parts, best["whiten"]), weights)
    for rr in ("none", "dba+qe"):
        s = scores(fused, labels, test, rr)
        print(f"held-out {rr:<7} N-S {s['ns']:.3f} mAP {s['map']:.4f}")
    if args.corel:
        cids, clabels, cparts = load(args.corel)
        wanted = set(read_query_ids(args.corel_queries))
        q = np.array([r for r, i in enumerate(cids) if i in wanted])
        cfused = fuse(whitened(cparts, best["whiten"]), weights)
        for rr in ("none", "dba+qe"):
            s = scores(cfused, clabels, q, rr)
            print(f"corel {rr:<7} ({len(q)} queries) mAP {s['map']:.4f} P@10 {s['p10']:.4f}")


if __name__ == "__main__":
    main()
