"""Does a recipe survive changes of light? Photometric copies of a UKBench-style database's images
(gamma, exposure, white balance), each searching the whole collection, paired between databases
of different recipes (bench/quality.md, 2026-12-02: is the colour histogram part fragile?).

Each image of the chosen objects (split as ``ris-eval --split test``: seed 0, 20% held out) is
changed, seeded per image: gamma 0.5-2.0, exposure x0.6-1.4, per-channel gains 0.8-1.2 (a white
balance shift), then JPEG quality 90. Copies are embedded with each database's own recipe
(``FeatureExtractor.from_attrs``) and searched with the database's rows as gallery; the copy's own
original counts as relevant, as in ``scripts/hard_queries.py``. Nothing is chosen from these
numbers; they only say where a recipe loses.

    python scripts/photometric_check.py uk-a.h5 uk-b.h5 --work photo [--objects train|test] [--rerank none dba+qe]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hard_queries import Searcher, load_db, per_query_ap, split_rows  # noqa: E402


def relight(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma 0.5-2.0, exposure x0.6-1.4, per-channel gains 0.8-1.2, clipped to 8 bits."""
    x = rgb.astype(np.float32) / 255.0
    x = x ** float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # gamma, log-uniform
    x = x * rng.uniform(0.6, 1.4) * rng.uniform(0.8, 1.2, 3)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def make_copies(db_path: str, work: Path, objects: str, seed: int) -> tuple[np.ndarray, list[Path]]:
    """Write the copies once (the same bytes for every database); returns (rows, files)."""
    from ris.images import decode_image

    feats, labels, ids, root = load_db(db_path)
    rows = split_rows(labels, objects)
    folder = work / objects
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for r in rows:
        path = folder / f"{r:05d}.jpg"
        if not path.is_file():
            img = relight(decode_image(root / ids[r]), np.random.default_rng([seed, int(r)]))
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(path)
    return rows, files


def copy_aps(db_path: str, rows: np.ndarray, files: list[Path], rerank: str) -> np.ndarray:
    from ris.extractor import FeatureExtractor
    from ris.featuredb import FeatureDB
    from ris.images import load_image

    with FeatureDB(db_path) as db:
        extractor = FeatureExtractor.from_attrs(db.attrs)
    feats, labels, _, _ = load_db(db_path)
    vecs = np.concatenate([extractor.embed(np.stack([load_image(f, extractor.max_size) for f in files[s : s + 32]]))
                           for s in range(0, len(files), 32)])
    qlab = labels[rows]
    npos = (labels[None, :] == qlab[:, None]).sum(1)
    return per_query_ap(Searcher(feats).ranked(rerank, {}, vecs[:, None, :], False), labels, qlab, npos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="database A (same images as B)")
    ap.add_argument("b", help="database B")
    ap.add_argument("--work", type=Path, required=True, help="folder for the copies")
    ap.add_argument("--objects", choices=["train", "test"], default="train",
                    help="whose images are relit: train = objects not held out, test = the held-out 20%% "
                         "(default: %(default)s)")
    ap.add_argument("--rerank", nargs="+", default=["none", "dba+qe"],
                    help="re-rankers scored, each at its default settings (default: none dba+qe)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of each image's gamma, exposure and gains; copies already in --work are reused "
                         "(default: %(default)s)")
    args = ap.parse_args()
    rows, files = make_copies(args.a, args.work, args.objects, args.seed)
    for rerank in args.rerank:
        ap_a, ap_b = (copy_aps(db, rows, files, rerank) for db in (args.a, args.b))
        d = ap_b - ap_a
        lo, hi = np.percentile(np.random.default_rng(0).choice(d, (10_000, len(d))).mean(axis=1), [2.5, 97.5])
        print(f"{len(d)} {args.objects} relit copies, {rerank}: mAP {ap_a.mean():.4f} -> {ap_b.mean():.4f}, "
              f"difference {d.mean():+.4f} (95% {lo:+.4f} .. {hi:+.4f}); better {int((d > 1e-9).sum())}, "
              f"worse {int((d < -1e-9).sum())}", flush=True)


if __name__ == "__main__":
    main()
