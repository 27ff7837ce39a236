"""Real-image distractors for index checks: seeded, altered copies of another collection's photos.

Why: an IVF-PQ index trains its codebooks on the database's own rows, and ``ris`` only uses PQ
codes from ~10,000 rows up (below, 8-bit scalar codes). UKBench-1000 and Corel-1k have 1,000
images each, so checking PQ's accuracy on real CNN features needs more real images; here they are
altered copies of the *other* collection (Corel photos as UKBench's distractors and the other way
round), so that none is a view of a scored query's object or class.

Each copy: a random crop keeping 40-90% of the area (aspect 3:4 to 4:3), a horizontal flip half
the time, a brightness / saturation change of up to +-25%, a short side of 240-360 px, JPEG at
quality 70-90; seeded per source image and copy, so a rerun writes the same files.

    python bench/distractors.py ../shared/data/corel1k WORK/uk/distractors --copies 12
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

SUFFIXES = {".jpg", ".jpeg", ".png"}


def altered(bgr: np.ndarray, rng: np.random.Generator, mild: bool = False) -> np.ndarray:
    """One seeded copy of ``bgr`` (crop, flip, light and colour, size), as BGR uint8; ``mild``: the
    size alone (the processing every copy gets, without changing what the photo shows)."""
    if mild:
        short = int(rng.integers(240, 361))
        scale = short / min(bgr.shape[:2])
        size = (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale)))
        return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    h, w = bgr.shape[:2]
    area = rng.uniform(0.4, 0.9) * h * w
    aspect = rng.uniform(0.75, 4 / 3)
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = bgr[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    hsv = cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 1] *= rng.uniform(0.75, 1.25)
    hsv[..., 2] *= rng.uniform(0.75, 1.25)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
    short = int(rng.integers(240, 361))
    scale = short / min(out.shape[:2])
    size = (max(1, round(out.shape[1] * scale)), max(1, round(out.shape[0] * scale)))
    return cv2.resize(out, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def write_distractors(source: Path, out: Path, copies: int, seed: int = 0, mild: bool = False,
                      files: list[Path] | None = None) -> int:
    """Write ``copies`` altered copies of every image under ``source`` (or of ``files``) into
    ``out``; returns the count. ``mild``: resized and re-encoded only (see ``altered``)."""
    if files is None:
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"distractors.py: error: {source}: no images")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, path in enumerate(files):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"distractors.py: skipped {path}: cannot decode", file=sys.stderr)
            continue
        for k in range(copies):
            rng = np.random.default_rng([seed, i, k])
            quality = int(rng.integers(70, 91))
            target = out / (f"{path.stem}.jpg" if mild and copies == 1 else f"d{i:05d}_{k:02d}.jpg")
            if not cv2.imwrite(str(target), altered(bgr, rng, mild), [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise SystemExit(f"distractors.py: error: {target}: cannot write")
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder of photos to alter (searched recursively)")
    p.add_argument("out", type=Path, help="folder to write the copies into (created)")
    p.add_argument("--copies", type=int, default=12, help="altered copies per source image (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the alterations (default: 0)")
    args = p.parse_args()
    n = write_distractors(args.source, args.out, args.copies, args.seed)
    print(f"{n} distractors in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
