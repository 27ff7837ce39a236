"""Synthetic hard queries from a UKBench-style database's own images, to choose re-ranking settings
on TRAINING objects only and then score the chosen ones once on the held-out objects and Corel.

Objects are split as ``ris-eval --split test`` does (seed 0, 20% held out); "train" = every other
labelled object (training + validation, 200 of UKBench-1000's 250). Each query image of the chosen
objects is transformed, seeded per image: a random crop keeping 50-80% of its area, a downscale by
0.3-0.6, a turn (half the queries upright, the other half turned 90/180/270 degrees) and JPEG
re-encoding at quality 30-50. The copies are written under WORK and embedded exactly as
``ris-search`` embeds a query (the database's recipe, ``FeatureExtractor.from_attrs``; with the
turned copies of ``--rotations``). Each searches the whole collection; its own original stays in
the gallery and COUNTS as relevant (it is a photo of the same object the query was made from), so
a query has 4 relevant images, N-S = relevant images in the top 4 (perfect 4.0) and AP is over
those 4. (Leaving the original out would need a DBA database without it for every query.)

    python scripts/hard_queries.py make DB --work DIR [--objects train|test]       # copies + embeddings
    python scripts/hard_queries.py choose DB --work DIR > choose.json               # grid on train
    python scripts/hard_queries.py apply DB --work DIR --settings choose.json \\
        [--corel corel.h5 --corel-queries q.txt]                                    # once, held out
    python scripts/hard_queries.py verify DB --work DIR [--sample 200]               # verification
    python scripts/hard_queries.py score DB --work DIR [--rerank none dba+qe] [--rotations]  # defaults only
    python scripts/hard_queries.py compare A.h5 --work DIR_A --other B.h5 --other-work DIR_B \\
        [--rerank dba+qe] [--objects test] [--turns all|upright|turned]             # paired per copy

``choose`` scores every setting of every re-ranker on the training copies (mAP, then N-S) and
prints the best of each with and without rotations; ``apply`` scores today's defaults and the
chosen settings on the held-out copies, the held-out originals (as ``ris-eval --split test``:
the query's own row excluded, N-S counts it) and Corel's listed queries (as ``ris-eval --queries``).
``score`` scores the re-rankers' default settings on whichever of the training and held-out copies
WORK holds (all, upright, turned), for comparing databases of different recipes (each ``make``
with its own database); ``compare`` pairs two such databases copy by copy (the same seeded copies:
mean AP difference B - A, paired bootstrap 95% interval, copies better / worse).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ris.embed import raw_descriptors
from ris.featuredb import FeatureDB
from ris.rerank import RERANKERS, Reranker, dba_database
from ris.splits import rows_of, split_objects

GRID = {  # every parameter set tried on the training copies
    "none": [{}],
    "qe": [{"n": n, "alpha": a} for n, a in itertools.product((1, 2, 3, 5), (0.0, 1.0, 3.0, 5.0))],
    "dba+qe": [{"dba_n": dn, "dba_alpha": da, "n": n, "alpha": a}
               for dn, da, n, a in itertools.product((1, 2, 3, 5), (1.0, 3.0), (1, 2, 3), (1.0, 3.0, 5.0))],
    "diffusion": [{"graph_k": gk, "query_k": qk, "gamma": g, "alpha": a}
                  for gk, qk, g, a in itertools.product((5, 10, 20, 50), (3, 5, 10), (1.0, 3.0), (0.5, 0.7, 0.9))],
    "kreciprocal": [{"k1": k1, "k2": k2, "lam": lam}
                    for k1, k2, lam in itertools.product((5, 10, 20), (2, 3, 6), (0.1, 0.3, 0.6))],
}


def split_rows(labels: np.ndarray, objects: str) -> np.ndarray:
    test = rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"])
    return test if objects == "test" else np.setdiff1d(np.nonzero(labels >= 0)[0], test)


def transform(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(transformed RGB image, turn in degrees, JPEG quality): crop 50-80% of the area, downscale
    0.3-0.6, upright or turned 90/180/270 (half each), for JPEG quality 30-50."""
    h, w = rgb.shape[:2]
    side = np.sqrt(rng.uniform(0.5, 0.8))
    ch, cw = max(8, int(h * side)), max(8, int(w * side))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = rgb[y : y + ch, x : x + cw]
    f = rng.uniform(0.3, 0.6)
    img = cv2.resize(img, (max(8, int(cw * f)), max(8, int(ch * f))), interpolation=cv2.INTER_AREA)
    turn = 0 if rng.random() < 0.5 else int(rng.choice([90, 180, 270]))
    img = np.rot90(img, turn // 90).copy()
    return img, turn, int(rng.integers(30, 51))


def embed_files(extractor, files: list[Path]) -> np.ndarray:
    """(n, 4, D) descriptors of each file at 0/90/180/270 degrees, as ``ris-search --rotations``."""
    from ris.rotations import embed_turned

    return embed_turned(extractor, files)


def make(db_path: str, work: Path, objects: str, seed: int) -> None:
    from ris.extractor import FeatureExtractor
    from ris.images import decode_image

    with FeatureDB(db_path) as db:
        labels, ids, root = db.labels, db.image_ids, Path(db.dataset_root or ".")
        extractor = FeatureExtractor.from_attrs(db.attrs)
    rows = split_rows(labels, objects)
    folder = work / objects
    folder.mkdir(parents=True, exist_ok=True)
    turns, quality, files = [], [], []
    for r in rows:
        img, turn, q = transform(decode_image(root / ids[r]), np.random.default_rng([seed, int(r)]))
        path = folder / f"{r:05d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        turns.append(turn), quality.append(q), files.append(path)
    t0 = time.perf_counter()
    vecs = embed_files(extractor, files)
    ms = 1000 * (time.perf_counter() - t0) / len(files)
    np.savez(work / f"{objects}.npz", rows=rows, turns=np.array(turns), quality=np.array(quality), vecs=vecs)
    print(json.dumps({"objects": objects, "queries": len(rows), "turned": int((np.array(turns) > 0).sum()),
                      "ms_per_query_4_copies": round(ms, 1), "folder": str(folder)}))


def per_query_ap(idx: np.ndarray, labels: np.ndarray, qlab: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """AP of each ranked list ``idx`` over its ``npos`` relevant images."""
    rel = labels[idx] == qlab[:, None]
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    return (prec * rel).sum(1) / np.maximum(npos, 1)


def score(idx: np.ndarray, labels: np.ndarray, qlab: np.ndarray, npos: np.ndarray, counted: int) -> dict:
    """N-S (``counted`` = 1: the query itself counts as the first hit, as ris-eval's N-S), mAP over
    ``npos`` relevant images, R@1 and P@10 of ranked lists ``idx`` (query's own row never in them)."""
    rel = labels[idx] == qlab[:, None]
    ns = counted + rel[:, : 4 - counted].sum(1)
    ap = per_query_ap(idx, labels, qlab, npos)
    return {"ns": round(float(ns.mean()), 4), "map": round(float(ap.mean()), 4),
            "r1": round(float(rel[:, 0].mean()), 4), "p10": round(float(rel[:, :10].mean()), 4)}


class Searcher:
    """The whole collection prepared for one (method, params); DBA databases cached per setting."""

    def __init__(self, gallery: np.ndarray):
        self.gallery, self._dba = gallery, {}

    def ranked(self, method: str, params: dict, q: np.ndarray, rotations: bool,
               rows: np.ndarray | None = None) -> np.ndarray:
        """Full rankings (nq, N - own) of queries ``q`` (nq, 4, D): the first copy alone, or all four."""
        augmented = None
        if method == "dba+qe":
            key = (params.get("dba_n", 2), params.get("dba_alpha", 3.0))
            if key not in self._dba:
                self._dba[key] = dba_database(self.gallery, int(key[0]), float(key[1]))
            augmented = self._dba[key]
        rr = Reranker(self.gallery, method, augmented=augmented, **params)
        v = q if rotations else q[:, :1]
        depth = len(self.gallery) - (rows is not None)
        return rr.search(v.reshape(-1, v.shape[-1]), depth, query_rows=rows, variants=v.shape[1])[1]


def load_db(db_path: str) -> tuple[np.ndarray, np.ndarray, list[str], Path]:
    with FeatureDB(db_path) as db:
        feats = raw_descriptors(db.read_rows(np.arange(len(db))))
        return feats, db.labels, db.image_ids, Path(db.dataset_root or ".")


def copies_score(s: Searcher, labels, data, method, params, rotations, subset=None) -> dict:
    rows, vecs = data["rows"], data["vecs"]
    if subset is not None:
        rows, vecs = rows[subset], vecs[subset]
    qlab = labels[rows]
    npos = (labels[None, :] == qlab[:, None]).sum(1)
    return score(s.ranked(method, params, vecs, rotations), labels, qlab, npos, 0)


def score_defaults(db_path: str, work: Path, methods: list[str], rotations: bool) -> None:
    """Default settings of ``methods`` (and with rotations where allowed, if asked) on the copies
    WORK holds: all, upright, turned."""
    feats, labels, _, _ = load_db(db_path)
    s = Searcher(feats)
    out: dict = {}
    for objects in ("test", "train"):
        if not (work / f"{objects}.npz").is_file():
            continue
        data = np.load(work / f"{objects}.npz")
        upright, turned_ = data["turns"] == 0, data["turns"] > 0
        rows = {}
        for m in methods:
            for rot in (False, True) if rotations and RERANKERS[m].comparable_scores else (False,):
                rows[f"{m}{' +rotations' if rot else ''}"] = {
                    "all": copies_score(s, labels, data, m, {}, rot),
                    "upright": copies_score(s, labels, data, m, {}, rot, upright),
                    "turned": copies_score(s, labels, data, m, {}, rot, turned_)}
        out[objects] = {"queries": int(len(data["rows"])), "upright": int(upright.sum()),
                        "turned": int(turned_.sum()), "rows": rows}
    print(json.dumps({"db": db_path, "work": str(work), "copies": out}, indent=1))


def compare(db_a: str, work_a: Path, db_b: str, work_b: Path, method: str, objects: str,
            turns: str = "all") -> None:
    """Per-copy AP of two databases (each with its own embeddings of the same seeded copies),
    paired: mean difference B - A with a paired bootstrap 95% interval (10,000 resamples, seed 0);
    ``turns``: all copies, or only those left upright / turned."""
    aps = []
    for db_path, work in ((db_a, work_a), (db_b, work_b)):
        feats, labels, _, _ = load_db(db_path)
        data = np.load(work / f"{objects}.npz")
        qlab = labels[data["rows"]]
        npos = (labels[None, :] == qlab[:, None]).sum(1)
        keep = {"all": np.ones(len(qlab), bool), "upright": data["turns"] == 0, "turned": data["turns"] > 0}[turns]
        ap = per_query_ap(Searcher(feats).ranked(method, {}, data["vecs"], False), labels, qlab, npos)
        aps.append((data["rows"][keep], ap[keep]))
    (rows_a, ap_a), (rows_b, ap_b) = aps
    if not np.array_equal(rows_a, rows_b):
        sys.exit(f"hard_queries.py: error: {work_a} and {work_b} do not hold copies of the same rows")
    d = ap_b - ap_a
    lo, hi = np.percentile(np.random.default_rng(0).choice(d, (10_000, len(d))).mean(axis=1), [2.5, 97.5])
    print(f"{len(d)} {objects} copies ({turns}), {method}: mAP {ap_a.mean():.4f} -> {ap_b.mean():.4f}, difference "
          f"{d.mean():+.4f} (95% {lo:+.4f} .. {hi:+.4f}); better {int((d > 1e-9).sum())}, "
          f"worse {int((d < -1e-9).sum())}, level {int((np.abs(d) <= 1e-9).sum())}")


def choose(db_path: str, work: Path) -> None:
    feats, labels, _, _ = load_db(db_path)
    data = np.load(work / "train.npz")
    s = Searcher(feats)
    best, t0 = {}, time.perf_counter()
    for method, grid in GRID.items():
        for rotations in (False, True):
            if rotations and not RERANKERS[method].comparable_scores:
                continue
            rows = []
            for params in grid:
                rows.append((copies_score(s, labels, data, method, params, rotations), params))
            rows.sort(key=lambda r: (-r[0]["map"], -r[0]["ns"]))
            defaults = copies_score(s, labels, data, method, {}, rotations)
            best[f"{method}{' +rotations' if rotations else ''}"] = {
                "method": method, "rotations": rotations, "defaults": RERANKERS[method].defaults,
                "defaults_score": defaults, "chosen": rows[0][1], "chosen_score": rows[0][0],
                "settings_tried": len(grid), "top3": [[r[0], r[1]] for r in rows[:3]]}
            print(method, "rotations" if rotations else "", defaults, "->", rows[0], file=sys.stderr, flush=True)
    print(json.dumps({"db": db_path, "train_queries": int(len(data["rows"])),
                      "turned": int((data["turns"] > 0).sum()), "seconds": round(time.perf_counter() - t0),
                      "best": best}, indent=1))


def apply(db_path: str, work: Path, settings: str, corel: str | None, corel_queries: str | None) -> None:
    from ris.extractor import FeatureExtractor

    chosen = json.loads(Path(settings).read_text())["best"]
    feats, labels, ids, root = load_db(db_path)
    s = Searcher(feats)
    data = np.load(work / "test.npz")
    test = data["rows"]
    with FeatureDB(db_path) as db:
        extractor = FeatureExtractor.from_attrs(db.attrs)
    originals = embed_files(extractor, [root / ids[r] for r in test])  # held-out photos, 4 turns each
    npos_o = (labels[None, :] == labels[test][:, None]).sum(1) - 1
    upright, turned_ = data["turns"] == 0, data["turns"] > 0
    cs = None
    if corel:
        cfeats, clabels, cids, croot = load_db(corel)
        index = {i: r for r, i in enumerate(cids)}
        cq = np.unique([index[line.strip()] for line in Path(corel_queries).read_text().splitlines() if line.strip()])
        with FeatureDB(corel) as cdb:
            cext = FeatureExtractor.from_attrs(cdb.attrs)
        cvecs = embed_files(cext, [croot / cids[r] for r in cq])
        cs = Searcher(cfeats)
        cpos = (clabels[None, :] == clabels[cq][:, None]).sum(1) - 1
    out = {}
    for name, c in chosen.items():
        for which, params in (("defaults", {}), ("chosen", c["chosen"])):
            m, rot = c["method"], c["rotations"]
            row = {"params": {**RERANKERS[m].defaults, **params},
                   "held_out_copies": copies_score(s, labels, data, m, params, rot),
                   "held_out_copies_upright": copies_score(s, labels, data, m, params, rot, upright),
                   "held_out_copies_turned": copies_score(s, labels, data, m, params, rot, turned_)}
            # the held-out originals, as ris-eval --split test scores them (own row excluded, N-S counts it);
            # without rotations the stored vectors, as ris-eval; with them, the photos embedded at 4 turns
            q = originals if rot else feats[test][:, None]
            row["held_out_originals"] = score(s.ranked(m, params, q, rot, rows=test), labels, labels[test], npos_o, 1)
            if cs is not None:
                cq_vecs = cvecs if rot else cfeats[cq][:, None]
                row["corel"] = score(cs.ranked(m, params, cq_vecs, rot, rows=cq), clabels, clabels[cq], cpos, 1)
            out[f"{name} ({which})"] = row
            print(name, which, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"db": db_path, "held_out_queries": int(len(test)), "corel": corel, "rows": out}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["make", "choose", "apply", "verify", "score", "compare"],
                    help="make the copies and embeddings, choose settings on train, apply them once held out, "
                         "verify, score defaults, compare two databases (see above)")
    ap.add_argument("db", help="UKBench-style ris feature database (HDF5): its images are copied, its rows "
                                "searched (compare: database A)")
    ap.add_argument("--work", required=True, type=Path, help="folder for the transformed copies and embeddings")
    ap.add_argument("--objects", default="train", choices=["train", "test"],
                    help="whose copies: train = objects not held out, test = the held-out 20%% (make, compare) "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of each image's crop, downscale, turn and JPEG quality (make) (default: %(default)s)")
    ap.add_argument("--settings", help="choose's JSON output (apply)")
    ap.add_argument("--corel", help="a second database scored with --corel-queries (apply)")
    ap.add_argument("--corel-queries", help="Corel query list, one image id per line; needed with --corel (apply)")
    ap.add_argument("--sample", type=int, default=200, help="training copies verified (verify)")
    ap.add_argument("--rerank", nargs="+", choices=sorted(RERANKERS),
                    help="re-rankers at their defaults (score: default none dba+qe; compare: one, default dba+qe)")
    ap.add_argument("--rotations", action="store_true", help="also score with rotations (score)")
    ap.add_argument("--other", help="database B (compare; DB is A)")
    ap.add_argument("--other-work", type=Path, help="B's copies and embeddings (compare)")
    ap.add_argument("--turns", default="all", choices=["all", "upright", "turned"], help="copies compared (compare)")
    a = ap.parse_args()
    if a.step == "make":
        make(a.db, a.work, a.objects, a.seed)
    elif a.step == "choose":
        choose(a.db, a.work)
    elif a.step == "verify":
        from hard_verify import verify  # its own module (it needs local features)

        verify(a.db, a.work, a.sample)
    elif a.step == "score":
        score_defaults(a.db, a.work, a.rerank or ["none", "dba+qe"], a.rotations)
    elif a.step == "compare":
        if not (a.other and a.other_work) or len(a.rerank or []) > 1:
            ap.error("compare needs --other and --other-work, and at most one --rerank")
        compare(a.db, a.work, a.other, a.other_work, (a.rerank or ["dba+qe"])[0], a.objects, a.turns)
    else:
        apply(a.db, a.work, a.settings, a.corel, a.corel_queries)


if __name__ == "__main__":
    main()
