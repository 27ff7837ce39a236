"""``--aspect keep`` on JAX: a batch of several shapes padded per shape to a full batch vs to buckets.

JAX compiles one program per batch shape, so ``ris`` pads short groups with zero images. Before
``ris.extractor.padded_rows``, every shape's rows in a mixed batch were padded to the full batch (a
collection of portraits and landscapes ran about two full batches per batch); now each group pads
to the smallest of batch, batch/2, /4, /8 that holds it (at most 4 programs per shape). Both run
here interleaved on the same images (the old way by patching ``padded_rows`` to the batch size),
each with a freshly built extractor, so compile time is inside the figures (one untimed run on
the first batch of images comes first: imports and XLA's start).

    KERAS_BACKEND=jax python bench/aspect_padding.py --dataset ../shared/data/corel1k --json out.json

Reports per variant: wall seconds and img/s of ``extract_features``, rows the network computed
(images + padding), and the distinct batch shapes it was given (each a compile on JAX).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def run_once(dataset: Path, limit: int | None, batch: int, size: int, bucketed: bool, work: Path) -> dict:
    import ris.extractor as ex
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig, FeatureExtractor

    data = dataset
    if limit:  # a subset, in the folder's sorted order
        data = work / "subset"
        if not data.exists():
            data.mkdir()
            files = sorted(p for p in dataset.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
            for p in files:
                os.symlink(p.resolve(), data / p.name)
    rows, shapes = [0], set()
    dispatch = FeatureExtractor._dispatch

    def counting(self, images, pad_to):
        n = len(images)
        padded = pad_to if pad_to and self._pad_batches and 0 < n < pad_to else n
        rows[0] += padded
        shapes.add((padded, *images[0].shape[:2]))
        return dispatch(self, images, pad_to)

    original = ex.padded_rows
    FeatureExtractor._dispatch = counting
    if not bucketed:
        ex.padded_rows = lambda n, pad_to: pad_to
    try:
        db = work / f"{'bucketed' if bucketed else 'full'}-{time.time_ns()}.h5"
        cfg = ExtractConfig(model="mobilenet_v2", weights="imagenet", input_size=size, pooling="gap", aspect="keep")
        t0 = time.perf_counter()
        s = extract_features(data, db, cfg, ExtractOptions(batch_size=batch, progress=False, log=lambda line: None))
        seconds = time.perf_counter() - t0
        db.unlink()
    finally:
        FeatureExtractor._dispatch = dispatch
        ex.padded_rows = original
    return {"variant": "buckets" if bucketed else "full batch per shape", "images": s.extracted,
            "seconds": round(seconds, 2), "img_per_s": round(s.extracted / seconds, 1),
            "rows_computed": rows[0], "batch_shapes": len(shapes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path, help="a folder of images in mixed orientations")
    ap.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="images per inference batch, the full batch that groups pad to (default: %(default)s)")
    ap.add_argument("--input-size", type=int, default=224,
                    help="MobileNetV2 input side in pixels; each image keeps its aspect ratio at about side x side "
                         "pixels, sides multiples of 32 (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    import keras

    work = Path(tempfile.mkdtemp(prefix="ris-aspect-pad-"))
    try:
        warm = work / "warm"
        warm.mkdir()
        run_once(a.dataset, a.batch_size, a.batch_size, a.input_size, True, warm)  # imports, XLA start: not timed
        runs = [run_once(a.dataset, a.limit, a.batch_size, a.input_size, bucketed, work)
                for _ in range(a.repeats) for bucketed in (False, True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        print(json.dumps(r))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs", "load_average": os.getloadavg(), "backend": keras.backend.backend(),
           "command": f"bench/aspect_padding.py --dataset {a.dataset} --batch-size {a.batch_size}", "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
