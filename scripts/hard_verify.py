"""``hard_queries.py verify``: choose geometric verification settings on the training copies of
``hard_queries.py make`` and score them once on the held-out copies (see that script's docstring).

    python scripts/hard_queries.py verify DB --work DIR [--sample 200]
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from hard_queries import Searcher, load_db, score
from ris.featuredb import FeatureDB


def verify(db_path: str, work: Path, sample: int, depth: int = 30) -> None:
    """Choose verification settings (k, min_inliers, weight) on a seeded sample of the training
    copies, for three base rankings (plain, plain + rotations, dba+qe), and one setting for all
    three (best mean training mAP over the bases: what a default must be); score the chosen ones
    and ``ris.verify.DEFAULTS`` once on the held-out copies. Inlier counts of every (query,
    candidate) pair are computed once, shared by the bases and the grid, and kept in WORK."""
    from ris.verify import DEFAULTS, database_local_features, inlier_order, inliers, root_sift, sift_of_file

    feats, labels, _, _ = load_db(db_path)
    with FeatureDB(db_path) as db:
        lf = database_local_features(db, db_path, int(DEFAULTS["features"]), int(DEFAULTS["side"]))
    s = Searcher(feats)
    bases = (("none", False), ("none", True), ("dba+qe", False))
    grid = list(itertools.product((5, 10, 20, 30), (8, 12, 20), (0.5, 1.0, 2.0, 5.0)))

    def reorder(order, c, k, mi, w, cap=DEFAULTS["cap"]):
        out = order.copy()
        for r in range(len(order)):
            out[r, :k] = order[r, :k][inlier_order(c[r, :k], mi, w, cap)]
        return out

    prepared, pairs, seconds = {}, 0, 0.0
    saved = work / f"verify_counts_{sample}_{depth}.npz"
    if saved.is_file():
        z = np.load(saved)
        for objects in ("train", "test"):
            for m, rot in bases:
                tag = f"{objects}|{m}|{int(rot)}"
                prepared[(objects, m, rot)] = (z[tag + "|order"], z[tag + "|c"], z[tag + "|qlab"], z[tag + "|npos"])
        pairs, seconds = int(z["pairs"]), float(z["seconds"])
    for objects in ("train", "test") if not prepared else ():
        data = np.load(work / f"{objects}.npz")
        pick = np.arange(len(data["rows"]))
        if objects == "train" and sample < len(pick):
            pick = np.sort(np.random.default_rng(0).choice(pick, sample, replace=False))
        rows, vecs = data["rows"][pick], data["vecs"][pick]
        qlf = []
        for r in rows:
            xy, d = sift_of_file(work / objects / f"{r:05d}.jpg", int(DEFAULTS["features"]), int(DEFAULTS["side"]))
            qlf.append((xy.astype(np.float32), root_sift(d)))
        cache: dict = {}
        for m, rot in bases:
            order = s.ranked(m, {}, vecs, rot)
            c = np.zeros((len(rows), depth), np.int64)
            t0 = time.perf_counter()
            for qi in range(len(rows)):
                for j, g in enumerate(order[qi, :depth]):
                    key = (qi, int(g))
                    if key not in cache:
                        cache[key] = inliers(qlf[qi], lf.of(int(g)), DEFAULTS["ratio"], DEFAULTS["threshold"])
                        pairs += 1
                    c[qi, j] = cache[key]
            seconds += time.perf_counter() - t0
            npos = (labels[None, :] == labels[rows][:, None]).sum(1)
            prepared[(objects, m, rot)] = (order, c, labels[rows], npos)
        print(objects, "inliers counted", pairs, file=sys.stderr, flush=True)
    if not saved.is_file():
        np.savez(saved, pairs=pairs, seconds=seconds,
                 **{f"{o}|{m}|{int(r)}|{part}": arr for (o, m, r), v in prepared.items()
                    for part, arr in zip(("order", "c", "qlab", "npos"), v)})
    joint = {}
    for m, rot in bases:
        order, c, qlab, npos = prepared[("train", m, rot)]
        for setting in grid:
            sc = score(reorder(order, c, *setting), labels, qlab, npos, 0)
            joint.setdefault(setting, []).append((sc["map"], sc["ns"]))
    one = max(joint, key=lambda g: (np.mean([v[0] for v in joint[g]]), np.mean([v[1] for v in joint[g]])))
    out = {}
    for m, rot in bases:
        order, c, qlab, npos = prepared[("train", m, rot)]
        tried = sorted(((score(reorder(order, c, k, mi, w), labels, qlab, npos, 0), (k, mi, w)) for k, mi, w in grid),
                       key=lambda t: (-t[0]["map"], -t[0]["ns"]))
        k, mi, w = tried[0][1]
        order_t, c_t, qlab_t, npos_t = prepared[("test", m, rot)]
        d = (int(DEFAULTS["k"]), DEFAULTS["min_inliers"], DEFAULTS["weight"])
        out[f"{m}{' +rotations' if rot else ''}"] = {
            "train_base": score(order, labels, qlab, npos, 0),
            "train_defaults": score(reorder(order, c, *d), labels, qlab, npos, 0),
            "chosen": {"k": k, "min_inliers": mi, "weight": w}, "train_chosen": tried[0][0],
            "top3": [[t[0], t[1]] for t in tried[:3]],
            "held_out_base": score(order_t, labels, qlab_t, npos_t, 0),
            "held_out_defaults": score(reorder(order_t, c_t, *d), labels, qlab_t, npos_t, 0),
            "held_out_chosen": score(reorder(order_t, c_t, k, mi, w), labels, qlab_t, npos_t, 0),
            "train_one_for_all": score(reorder(order, c, *one), labels, qlab, npos, 0),
            "held_out_one_for_all": score(reorder(order_t, c_t, *one), labels, qlab_t, npos_t, 0)}
    print(json.dumps({"db": db_path, "train_queries": sample, "depth": depth, "defaults": DEFAULTS,
                      "one_for_all": {"k": one[0], "min_inliers": one[1], "weight": one[2],
                                      "train_mean_map": round(float(np.mean([v[0] for v in joint[one]])), 4)},
                      "ms_per_pair": round(1000 * seconds / max(pairs, 1), 1), "bases": out}, indent=1))
