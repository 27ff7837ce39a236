"""Extraction throughput: the blog's loop vs ``ris-extract``, same images, same backbone, one run.

The blog's loop: serial ``cv2.imread`` + resize, then ``model.predict`` per batch of 32.
``ris-extract``: threaded decoding (reduced-size JPEG decoding where the input size allows)
overlapped with a compiled forward pass whose BatchNorms are folded into the convolutions, features
streamed into HDF5. It is also timed with BN folding off, to show what each part buys. The three
run interleaved ``--repeats`` times, so load from other tenants hits all of them alike.

    python bench/extract_throughput.py --dataset ../shared/data/ukbench1000 --limit 480 --json out.json

Prints img/s for both and the ratio per backbone. Ratios are what to compare across machines.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def blog_loop(paths: list[Path], model, backbone, size: int, batch: int = 32) -> float:
    """Seconds for the blog's serial loop (decode, resize, predict per batch)."""
    import cv2

    feats = []
    t0 = time.perf_counter()
    for s in range(0, len(paths), batch):
        imgs = []
        for p in paths[s : s + batch]:
            img = cv2.imread(str(p))
            imgs.append(cv2.cvtColor(cv2.resize(img, (size, size)), cv2.COLOR_BGR2RGB))
        x = backbone.preprocess(np.stack(imgs))
        feats.append(model.predict(x, verbose=0))
    np.concatenate(feats)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/ukbench1000"),
                   help="folder of JPEGs")
    p.add_argument("--models", default="mobilenet_v2,efficientnet_lite0", help="comma-separated backbones")
    p.add_argument("--limit", type=int, default=480, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for both pipelines")
    p.add_argument("--weights", default="imagenet", help="weights for the backbones ('none' = random, same speed)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="ris-extract's precision (the blog's loop stays float32): bfloat16 pays off on CPUs "
                        "with AVX512_BF16 or AMX")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repetitions of the three pipelines; medians are reported")
    p.add_argument("--json", default=None, help="write results as JSON to this file")
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from ris.backbones import get_backbone
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig, FeatureExtractor
    from ris.images import find_images
    from ris.layers import GlobalPool

    root = Path(args.dataset)
    files = find_images(root)[: args.limit]
    if not files:
        sys.exit(f"{root}: no images")
    rows = []
    tmp = Path(tempfile.mkdtemp())
    try:
        sub = tmp / "images"
        sub.mkdir()
        for f in files:  # same images, linked so both read identical bytes from the page cache
            os.symlink((root / f).resolve(), sub / Path(f).name)
        for name in args.models.split(","):
            bb = get_backbone(name)
            size = bb.input_size
            trunk = bb.build(args.weights)
            inp = keras.Input((size, size, 3))
            model = keras.Model(inp, GlobalPool("gap")(trunk(inp)))
            extractors = {
                "ris": FeatureExtractor(ExtractConfig(model=name, weights=args.weights, pooling="gap",
                                                      dtype=args.dtype)),
                "ris_unfolded": FeatureExtractor(ExtractConfig(model=name, weights=args.weights, pooling="gap",
                                                               dtype=args.dtype, fold_batchnorm=False)),
            }

            def run_ris(key: str) -> float:
                out = tmp / f"{key}.h5"
                out.unlink(missing_ok=True)
                s = extract_features(sub, out, extractors[key].config,
                                     ExtractOptions(labels="none", batch_size=args.batch_size, progress=False),
                                     extractor=extractors[key])
                return s.seconds

            blog_loop([root / f for f in files[:64]], model, bb, size, args.batch_size)  # warm-up
            for key in extractors:
                run_ris(key)
            times: dict[str, list[float]] = {"blog": [], "ris": [], "ris_unfolded": []}
            for rep in range(args.repeats):  # interleaved, so a noisy neighbour hits all three alike
                times["blog"].append(blog_loop([root / f for f in files], model, bb, size, args.batch_size))
                times["ris"].append(run_ris("ris"))
                times["ris_unfolded"].append(run_ris("ris_unfolded"))
                print(f"  {name} repeat {rep + 1}: blog {len(files) / times['blog'][-1]:.1f} img/s, ris "
                      f"{len(files) / times['ris'][-1]:.1f}, ris without BN folding "
                      f"{len(files) / times['ris_unfolded'][-1]:.1f}; ratio "
                      f"{times['blog'][-1] / times['ris'][-1]:.2f}x", flush=True)
            med = {k: float(np.median(v)) for k, v in times.items()}
            ratios = [b / r for b, r in zip(times["blog"], times["ris"])]
            ratios_unfolded = [b / r for b, r in zip(times["blog"], times["ris_unfolded"])]
            row = {"model": name, "input_size": size, "images": len(files), "repeats": args.repeats,
                   "batchnorm_folded": extractors["ris"].batchnorm_folded,
                   "blog_img_s": round(len(files) / med["blog"], 2), "ris_img_s": round(len(files) / med["ris"], 2),
                   "ris_unfolded_img_s": round(len(files) / med["ris_unfolded"], 2),
                   "ratio": round(float(np.median(ratios)), 2),  # median of the per-repeat ratios
                   "ratio_unfolded": round(float(np.median(ratios_unfolded)), 2),
                   "ratio_per_repeat": [round(r, 2) for r in ratios], "seconds": times}
            rows.append(row)
            print(f"{name:<20} {size:>4}px  blog loop {row['blog_img_s']:>7.1f} img/s   ris-extract "
                  f"{row['ris_img_s']:>7.1f} img/s   ratio {row['ratio']:.2f}x (median of {args.repeats}; "
                  f"min {min(ratios):.2f}x)   without BN folding {row['ris_unfolded_img_s']:.1f} img/s, "
                  f"{row['ratio_unfolded']:.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "keras_backend": keras.backend.backend(),
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "batch_size": args.batch_size, "ris_dtype": args.dtype, "dataset": str(root)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
