"""Phone photos arrive rotated: held-out queries turned by 90/180/270 degrees (seeded) search the
whole collection, with and without query-time rotations (describe the query at 0/90/180/270,
keep each gallery image's best similarity) and geometric verification (SIFT is rotation invariant).

Held-out = the objects ``ris-eval --split test`` holds out (seed 0, 20%). Each query's own original
is left out of the gallery, as the protocol leaves the query out; N-S counts the query (1 + hits
in the top 3).

    python scripts/rotation_check.py DB DATASET WORKDIR [QUERIES [VERIFY_K]]

QUERIES (default 100): the first images of the held-out objects (seeded order), to bound the cost of
verification on a 2-core machine; VERIFY_K (default 10): candidates verified per query.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROT = {90: "ROTATE_90_CLOCKWISE", 180: "ROTATE_180", 270: "ROTATE_90_COUNTERCLOCKWISE"}  # cv2's names


def turn(img, deg):
    import cv2

    return img if deg % 360 == 0 else cv2.rotate(img, getattr(cv2, ROT[deg % 360]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db", metavar="DB", help="feature database (.h5) of the whole collection: the gallery")
    p.add_argument("dataset", metavar="DATASET", help="the image folder DB was extracted from (queries are read there)")
    p.add_argument("workdir", metavar="WORKDIR",
                   help="folder for the turned query images and their databases; what is there is reused")
    p.add_argument("queries", type=int, nargs="?", default=100, metavar="QUERIES",
                   help="held-out images used as queries, the first in seeded order (default: %(default)s)")
    p.add_argument("verify_k", type=int, nargs="?", default=10, metavar="VERIFY_K",
                   help="candidates geometric verification re-orders per query (default: %(default)s)")
    return p.parse_args(argv)


def main(db_path: str, dataset: str, work: str | Path, limit: int = 100, verify_k: int = 10) -> None:
    # imported here, so --help needs neither OpenCV nor a Keras backend
    import cv2

    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.featuredb import FeatureDB
    from ris.images import decode_image
    from ris.splits import rows_of, split_objects
    from ris.topk import l2_normalize
    from ris.verify import DEFAULTS, Verifier, root_sift, sift_of_file

    work = Path(work)
    with FeatureDB(db_path) as db:
        labels, ids = db.labels, db.image_ids
        gallery = l2_normalize(db.read_rows(np.arange(len(db))))
        attrs = dict(db.attrs)
    test = rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"])[: int(limit)]
    turns = np.random.default_rng(0).choice([90, 180, 270], len(test))
    dbs = {}
    for case in ("upright", "rotated"):
        for extra in (0, 90, 180, 270):
            folder = work / f"{case}_{extra}"
            if not folder.is_dir():
                folder.mkdir(parents=True)
                for r, t in zip(test, turns):
                    img = decode_image(Path(dataset) / ids[r])
                    base = turn(img, int(t)) if case == "rotated" else img
                    cv2.imwrite(str(folder / f"{r:05d}.jpg"), cv2.cvtColor(turn(base, extra), cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 92])
            out = work / f"{case}_{extra}.h5"
            if not out.exists():
                extract_features(folder, out, ExtractConfig(model=attrs["model"], input_size=int(attrs["input_size"]),
                                                            pooling=attrs["pooling"]),
                                 ExtractOptions(labels="none", progress=False))
            with FeatureDB(out) as qdb:
                order = np.argsort([int(Path(i).stem) for i in qdb.image_ids])
                dbs[(case, extra)] = l2_normalize(qdb.read_rows(np.arange(len(qdb))))[order]
    with FeatureDB(db_path) as db:
        ver = Verifier.for_database(db, db_path, k=int(verify_k))
    rows = {}
    for case in ("upright", "rotated"):
        for mode in ("plain", "rotations", "plain+verify", "rotations+verify"):
            sims = dbs[(case, 0)] @ gallery.T
            if mode.startswith("rotations"):
                sims = np.max([dbs[(case, e)] @ gallery.T for e in (0, 90, 180, 270)], axis=0)
            sims[np.arange(len(test)), test] = -np.inf  # the query's own original
            order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
            t0 = time.perf_counter()
            if mode.endswith("verify"):
                for j, r in enumerate(test):
                    xy, d = sift_of_file(work / f"{case}_0" / f"{r:05d}.jpg", int(DEFAULTS["features"]),
                                         int(DEFAULTS["side"]))
                    order[j] = ver.rerank((xy.astype(np.float32), root_sift(d)), order[j])
            ms = 1000 * (time.perf_counter() - t0) / len(test)
            rel = labels[order] == labels[test][:, None]
            prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
            rows[f"{case} {mode}"] = {"ns": round(float((1 + rel[:, :3].sum(1)).mean()), 4),
                                      "map": round(float(((prec * rel).sum(1) / rel.sum(1)).mean()), 4),
                                      "verify_ms_per_query": round(ms, 1)}
            print(case, mode, rows[f"{case} {mode}"], flush=True)
    print(json.dumps({"queries": len(test), "gallery": len(gallery), "verify": ver.p, "rows": rows}, indent=1))


if __name__ == "__main__":
    a = parse_args()
    main(a.db, a.dataset, a.workdir, a.queries, a.verify_k)
