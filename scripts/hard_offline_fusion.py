"""Score an offline fusion of two single-backbone databases on hard_queries.py copies, without
extracting a fused database: each part's rows (and each copy's embedding, from each database's own
``hard_queries.py make`` folder) L2-normalised, weighted, concatenated and L2-normalised, as
``ris.fusion`` does. It reproduces a fused database's scores when every part's input size is the
fused one's largest (a fused extractor loads a query at its largest size and resizes per part, so a
smaller part's copies are embedded from a slightly different resize here). (bench/quality.md, 2026-12-02)

    python scripts/hard_offline_fusion.py uk-mnv2-224.h5 hard-224 uk-lite2-384.h5 hard-lite2 --weight 0.5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hard_queries import Searcher, copies_score, load_db  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db_a", help="database A, a single-backbone ris feature database (HDF5)")
    ap.add_argument("work_a", type=Path, help="A's hard_queries.py make folder (train.npz, test.npz)")
    ap.add_argument("db_b", help="database B: the same labelled images as A, another backbone")
    ap.add_argument("work_b", type=Path, help="B's hard_queries.py make folder (the same copies as A's)")
    ap.add_argument("--weight", type=float, default=1.0, help="B's weight (A's is 1)")
    ap.add_argument("--rerank", nargs="+", default=["none", "dba+qe"],
                    help="re-rankers scored, each at its default settings (default: none dba+qe)")
    a = ap.parse_args()
    fa, labels, _, _ = load_db(a.db_a)
    fb, labels_b, _, _ = load_db(a.db_b)
    if not np.array_equal(labels, labels_b):
        sys.exit("hard_offline_fusion.py: error: the two databases do not hold the same labelled images")
    s = Searcher(unit(np.concatenate([unit(fa), a.weight * unit(fb)], -1)))
    out = {}
    for objects in ("test", "train"):
        if not ((a.work_a / f"{objects}.npz").is_file() and (a.work_b / f"{objects}.npz").is_file()):
            continue
        da, db = np.load(a.work_a / f"{objects}.npz"), np.load(a.work_b / f"{objects}.npz")
        if not (np.array_equal(da["rows"], db["rows"]) and np.array_equal(da["turns"], db["turns"])):
            sys.exit(f"hard_offline_fusion.py: error: {a.work_a} and {a.work_b} hold different {objects} copies")
        data = {"rows": da["rows"], "turns": da["turns"],
                "vecs": unit(np.concatenate([unit(da["vecs"]), a.weight * unit(db["vecs"])], -1))}
        up, tu = data["turns"] == 0, data["turns"] > 0
        out[objects] = {m: {k: copies_score(s, labels, data, m, {}, False, sub)
                            for k, sub in (("all", None), ("upright", up), ("turned", tu))} for m in a.rerank}
    print(json.dumps({"a": a.db_a, "b": a.db_b, "weight_b": a.weight, "copies": out}, indent=1))


if __name__ == "__main__":
    main()
