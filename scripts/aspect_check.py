"""Input geometry, measured off the shelf: squashing every image to a square (what ris does) against
keeping its aspect ratio, at equal pixel counts (bench/quality.md, 2026-12-02, fourth round).

    python scripts/aspect_check.py ../shared/data/ukbench1000 --labels ukbench --queries train
    python scripts/aspect_check.py ../shared/data/corel1k

Modes (``MODE:SIDE``): ``squash`` = SIDE x SIDE; ``area`` = the aspect ratio kept, SIDE^2 pixels;
``short`` = the aspect ratio kept, shorter side SIDE; ``crop`` = shorter side SIDE, centre SIDE x
SIDE. MobileNetV2 (offline ImageNet weights), GAP, every image searching the whole collection
(query excluded). ``--queries train`` scores only UKBench's training objects (the objects outside
ris's default held-out split), so that nothing is chosen on held-out objects. Each mode is paired
with the ``squash`` mode of the same pixel count (95% paired bootstrap over queries).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ris.backbones import get_backbone  # noqa: E402
from ris.images import decode_image, find_images, make_labels  # noqa: E402
from ris.splits import rows_of, split_objects  # noqa: E402

DEFAULT_MODES = "squash:224,area:224,crop:224,squash:256,area:256,crop:256,squash:274,area:274"


def input_image(img: np.ndarray, mode: str, side: int) -> np.ndarray:
    """The network input for one decoded RGB image under ``mode``."""
    h, w = img.shape[:2]
    if mode == "squash":
        size = (side, side)
    elif mode == "area":
        r = w / h
        size = (max(32, round(side * np.sqrt(r))), max(32, round(side / np.sqrt(r))))
    elif mode in ("short", "crop"):
        s = side / min(h, w)
        size = (max(side, round(w * s)), max(side, round(h * s)))
    else:
        raise SystemExit(f"unknown mode {mode!r}: squash, area, short or crop")
    out = cv2.resize(img, size, interpolation=cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR)
    if mode == "crop":
        y, x = (out.shape[0] - side) // 2, (out.shape[1] - side) // 2
        out = out[y:y + side, x:x + side]
    return out


def descriptors(images: list[np.ndarray], mode: str, side: int, trunk, backbone, batch: int = 32) -> np.ndarray:
    """L2-normalised GAP descriptors; images of one input shape go through the network together."""
    inputs = [input_image(im, mode, side) for im in images]
    out = None
    by_shape: dict[tuple, list[int]] = {}
    for k, x in enumerate(inputs):
        by_shape.setdefault(x.shape, []).append(k)
    for rows in by_shape.values():
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            maps = np.asarray(trunk(backbone.preprocess(np.stack([inputs[k] for k in part])), training=False))
            pooled = maps.mean(axis=(1, 2))
            out = np.zeros((len(images), pooled.shape[1]), np.float32) if out is None else out
            out[part] = pooled
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def per_query_ap(feats: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """AP of each query over the whole collection, the query itself excluded."""
    sim = feats[queries] @ feats.T
    sim[np.arange(len(queries)), queries] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]
    rel = labels[order] == labels[queries, None]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    return (rel * hits / ranks).sum(1) / np.maximum(rel.sum(1), 1)


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    d = b - a
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (10_000, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="an image folder (with groundtruth.tsv, or UKBench names)")
    p.add_argument("--labels", default="auto", help="as ris-extract --labels (default auto)")
    p.add_argument("--queries", default="all", choices=["all", "train"],
                   help="all images, or only the training objects of ris's default split (default all)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"MODE:SIDE,... (default {DEFAULT_MODES})")
    args = p.parse_args(argv)
    root = Path(args.dataset)
    ids = find_images(root)
    labels, _, _ = make_labels(ids, args.labels, root)
    queries = np.nonzero(labels >= 0)[0]
    if args.queries == "train":
        held_out = set(rows_of(labels, split_objects(labels, 0.2, 0.1, 0)["test"]).tolist())
        queries = np.array([q for q in queries if q not in held_out])
    backbone = get_backbone("mobilenet_v2")
    trunk = backbone.build("imagenet")
    images = [decode_image(root / i) for i in ids]
    aps: dict[tuple[str, int], np.ndarray] = {}
    print(f"{root}: {len(ids)} images, {len(queries)} queries ({args.queries})")
    for item in args.modes.split(","):
        mode, side = item.split(":")
        t = time.perf_counter()
        aps[(mode, int(side))] = ap = per_query_ap(descriptors(images, mode, int(side), trunk, backbone), labels, queries)
        line = f"{mode:>6} {side:>4}  mAP {ap.mean():.4f}  ({time.perf_counter() - t:.0f} s)"
        base = aps.get(("squash", int(side)))
        if mode != "squash" and base is not None:
            d, lo, hi = paired_interval(base, ap)
            line += f"  vs squash {side}: {d:+.4f} ({lo:+.4f} .. {hi:+.4f})"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
