"""Choose the colour histogram part of a fusion (ris/colour.py: bins, weight) on UKBench *training*
objects, then score the choice once on the held-out objects, their hard copies and Corel
(bench/quality.md, 2026-12-02).

The CNN parts are single-backbone databases of the same images (``ris-extract`` once per
backbone), fused with ``--base-weights`` as ``ris.fusion.fuse`` fuses them; the colour part is
computed here from each database image (``load_image`` at the part's size, as a fused extraction
squashes it) for every bin layout of the grid. The training queries are every image of the objects
``ris-eval --split test`` does not hold out (seed 0, 20%), searching the whole collection; with
``--hard WORK`` also the synthetic hard copies of ``scripts/hard_queries.py make`` (WORK/train.npz,
made from a database whose recipe is the fusion of the given parts with the same weights). Nothing
here looks at the held-out objects, their copies or Corel before the choice is printed. Rules,
fixed before their runs: ``--rule dba`` (``accurate``, which re-ranks): best dba+qe mAP of the
full-size training queries, then their plain mAP, then plain mAP of the training copies;
``--rule relit`` (``fast``, which does not re-rank; needs ``--relit WORK``, the relit copies of
``scripts/photometric_check.py``): among the settings whose relit training copies lose at most
0.001 plain mAP against the base, the best plain mAP of the training hard copies, then of the
full-size training queries.

    python scripts/colour_choose.py --uk uk-mnv2-224.h5 --hard hard --corel corel-mnv2-224.h5 \\
        --corel-queries corel_queries.txt
    python scripts/colour_choose.py --uk uk-mnv2-224.h5 uk-lite2-384.h5 --base-weights 1+0.5 \\
        --hard hard-fused-224 --corel corel-mnv2-224.h5 corel-lite2-384.h5
    python scripts/colour_choose.py --uk uk-mnv2-224.h5 --hard hard --relit photo --rule relit \\
        --weights 0.15,0.25,0.35,0.5 --bins 20x10x5,16x4x4 --corel corel-mnv2-224.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_choose import load, scores  # noqa: E402
from hard_queries import Searcher, per_query_ap  # noqa: E402

from ris.colour import ColourDescriptor  # noqa: E402
from ris.featuredb import FeatureDB  # noqa: E402
from ris.fusion import fuse  # noqa: E402
from ris.images import load_image  # noqa: E402
from ris.protocol import read_query_ids  # noqa: E402
from ris.splits import rows_of, split_objects  # noqa: E402

BINS = {"20x10x5": (20, 10, 5), "16x4x4": (16, 4, 4), "18x3x3": (18, 3, 3), "8x3x3": (8, 3, 3)}


def histograms(files: list[Path], bins: tuple[int, int, int], size: int) -> np.ndarray:
    desc = ColourDescriptor("grid", bins, size)
    return np.concatenate([desc.describe(load_image(f, size)[None]) for f in files])


def db_files(path: str) -> list[Path]:
    with FeatureDB(path) as db:
        root = Path(db.dataset_root or ".")
        return [root / i for i in db.image_ids]


def with_colour(base: list[np.ndarray], base_w: list[float], colour: np.ndarray, w: float) -> np.ndarray:
    return fuse([*base, colour], [*base_w, w])


def hard_score(work: Path, objects: str, gallery: np.ndarray, labels: np.ndarray, colour_of: dict,
               rel_w: float | None, rerank: str) -> float:
    """mAP of the upright descriptors of WORK's copies fused with their colour at relative weight
    ``rel_w`` (None: the base alone) against ``gallery`` (already fused the same way)."""
    data = np.load(work / f"{objects}.npz")
    rows, vecs = data["rows"], np.asarray(data["vecs"][:, 0], np.float32)
    if rel_w is not None:
        vecs = fuse([vecs, colour_of[objects]], [1.0, rel_w])
    qlab = labels[rows]
    npos = (labels[None, :] == qlab[:, None]).sum(1)
    idx = Searcher(gallery).ranked(rerank, {}, vecs[:, None, :], False)
    return float(per_query_ap(idx, labels, qlab, npos).mean())


def relit_vectors(part_dbs: list[str], files: list[Path], base_w: list[float]) -> np.ndarray:
    """The relit copies described by each CNN part's own recipe, fused with the base weights."""
    from ris.extractor import FeatureExtractor
    from ris.topk import l2_normalize

    parts = []
    for path in part_dbs:
        with FeatureDB(path) as db:
            ext = FeatureExtractor.from_attrs(db.attrs)
        parts.append(l2_normalize(np.concatenate([ext.embed(np.stack([load_image(f, ext.max_size) for f in files[s:s + 32]]))
                                                  for s in range(0, len(files), 32)])))
    return fuse(parts, base_w) if len(parts) > 1 else parts[0]


def copies_map(gallery: np.ndarray, labels: np.ndarray, rows: np.ndarray, vecs: np.ndarray) -> float:
    qlab = labels[rows]
    npos = (labels[None, :] == qlab[:, None]).sum(1)
    return float(per_query_ap(Searcher(gallery).ranked("none", {}, vecs[:, None, :], False), labels, qlab, npos).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uk", nargs="+", required=True, help="UKBench CNN part databases (same images)")
    ap.add_argument("--base-weights", default="", help="fusion weights of the CNN parts, joined by '+' (default 1 each)")
    ap.add_argument("--corel", nargs="*", default=[], help="Corel CNN part databases, same order")
    ap.add_argument("--corel-queries", default="corel_queries.txt",
                    help="Corel query list for --corel, one image id per line (scripts/corel_queries.py "
                         "writes it) (default: %(default)s)")
    ap.add_argument("--hard", type=Path, default=None, help="hard_queries.py WORK of a database of this base recipe")
    ap.add_argument("--bins", default=",".join(BINS), help="bin layouts tried (H x S x V)")
    ap.add_argument("--weights", default="0.25,0.5,0.75,1", help="colour part weights tried")
    ap.add_argument("--size", type=int, default=224, help="side of the squashed image the histogram is taken at")
    ap.add_argument("--relit", type=Path, default=None, help="photometric_check.py WORK (train/, test/ relit copies)")
    ap.add_argument("--rule", choices=["dba", "relit"], default="dba", help="how the setting is chosen (see above)")
    args = ap.parse_args()

    ids, labels, parts = load(args.uk)
    bw = [float(w) for w in args.base_weights.split("+")] if args.base_weights else [1.0] * len(parts)
    norm = float(np.linalg.norm(bw))
    test = rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"])
    train = np.setdiff1d(np.nonzero(labels >= 0)[0], test)
    files = db_files(args.uk[0])
    base = fuse(parts, bw) if len(parts) > 1 else parts[0]
    hard_files = {}
    if args.hard:
        for objects in ("train", "test"):
            rows = np.load(args.hard / f"{objects}.npz")["rows"]
            hard_files[objects] = [args.hard / objects / f"{r:05d}.jpg" for r in rows]
    if args.rule == "relit" and not args.relit:
        sys.exit("colour_choose.py: --rule relit needs --relit WORK")
    relit = {}  # objects -> (rows, files, base vectors)
    if args.relit:
        for objects, rows in (("train", train), ("test", test)):
            rfiles = [args.relit / objects / f"{r:05d}.jpg" for r in rows]
            relit[objects] = (rows, rfiles, relit_vectors(args.uk, rfiles, bw))
    print(f"training queries: {len(train)}; held-out: {len(test)}; base weights {bw}", flush=True)
    base_relit = copies_map(base, labels, relit["train"][0], relit["train"][2]) if relit else 0.0
    for rr in ("none", "dba+qe"):
        s = scores(base, labels, train, rr)
        line = f"train  base alone {rr:<6} N-S {s['ns']:.3f} mAP {s['map']:.4f}"
        if args.hard:
            line += f" | copies mAP {hard_score(args.hard, 'train', base, labels, {}, None, rr):.4f}"
        print(line, flush=True)
    grid, colours = [], {}
    for name in args.bins.split(","):
        colours[name] = histograms(files, BINS[name], args.size)
        hard_colour = {o: histograms(f, BINS[name], args.size) for o, f in hard_files.items()}
        relit_colour = histograms(relit["train"][1], BINS[name], args.size) if relit else None
        alone = scores(colours[name], labels, train, "none")
        print(f"train  colour {name} alone: N-S {alone['ns']:.3f} mAP {alone['map']:.4f}", flush=True)
        for w in (float(x) for x in args.weights.split(",")):
            fused = with_colour(parts, bw, colours[name], w)
            row = {"bins": name, "weight": w, "plain": scores(fused, labels, train, "none"),
                   "dba": scores(fused, labels, train, "dba+qe"),
                   "copies": hard_score(args.hard, "train", fused, labels, hard_colour, w / norm, "none")
                   if args.hard else 0.0,
                   "relit": copies_map(fused, labels, relit["train"][0],
                                       fuse([relit["train"][2], relit_colour], [1.0, w / norm])) if relit else 0.0}
            grid.append(row)
            print(f"train  {name:<8} w={w:<5g} plain N-S {row['plain']['ns']:.3f} mAP {row['plain']['map']:.4f} | "
                  f"dba+qe N-S {row['dba']['ns']:.3f} mAP {row['dba']['map']:.4f} | copies plain mAP "
                  f"{row['copies']:.4f}" + (f" | relit plain mAP {row['relit']:.4f} (base {base_relit:.4f})"
                                             if relit else ""), flush=True)
    if args.rule == "dba":
        best = max(grid, key=lambda r: (r["dba"]["map"], r["plain"]["map"], r["copies"]))
    else:
        ok = [r for r in grid if r["relit"] >= base_relit - 0.001]
        if not ok:
            sys.exit("colour_choose.py: no setting keeps the relit training copies within 0.001 of the base")
        best = max(ok, key=lambda r: (r["copies"], r["plain"]["map"]))
    name, w = best["bins"], best["weight"]
    print(f"chosen on training objects: bins {name}, colour weight {w:g} (fusion weights "
          f"{'+'.join(f'{x:g}' for x in [*bw, w])})", flush=True)
    fused = with_colour(parts, bw, colours[name], w)
    hard_colour = {o: histograms(f, BINS[name], args.size) for o, f in hard_files.items()}
    for rr in ("none", "dba+qe"):
        b, s = scores(base, labels, test, rr), scores(fused, labels, test, rr)
        line = f"held-out {rr:<6} N-S {b['ns']:.3f} -> {s['ns']:.3f}, mAP {b['map']:.4f} -> {s['map']:.4f}"
        if args.hard:
            line += (f" | copies mAP {hard_score(args.hard, 'test', base, labels, {}, None, rr):.4f} -> "
                     f"{hard_score(args.hard, 'test', fused, labels, hard_colour, w / norm, rr):.4f}")
        print(line, flush=True)
    if relit:
        rows, rfiles, vecs = relit["test"]
        print(f"held-out relit copies, plain mAP {copies_map(base, labels, rows, vecs):.4f} -> "
              f"{copies_map(fused, labels, rows, fuse([vecs, histograms(rfiles, BINS[name], args.size)], [1.0, w / norm])):.4f}",
              flush=True)
    if args.corel:
        cids, clabels, cparts = load(args.corel)
        wanted = set(read_query_ids(args.corel_queries))
        q = np.array([r for r, i in enumerate(cids) if i in wanted])
        cbase = fuse(cparts, bw) if len(cparts) > 1 else cparts[0]
        cfused = with_colour(cparts, bw, histograms(db_files(args.corel[0]), BINS[name], args.size), w)
        for rr in ("none", "dba+qe"):
            b, s = scores(cbase, clabels, q, rr), scores(cfused, clabels, q, rr)
            print(f"corel {rr:<6} ({len(q)} queries) mAP {b['map']:.4f} -> {s['map']:.4f}, "
                  f"P@10 {b['p10']:.4f} -> {s['p10']:.4f}", flush=True)


if __name__ == "__main__":
    main()
