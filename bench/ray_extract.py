"""Extraction throughput: the local engine vs ``--engine ray`` with 1 and 2 actors, same images.

All three write a feature database from the same UKBench JPEGs with the same backbone and batch
size; img/s is ``ExtractSummary.images_per_second`` (rows written / seconds from the first batch to
the last commit: the model builds, the cluster start and the actors' start are not in it, for either
engine, and both have run one batch at the run's shape before it); the seconds with start-up are
printed beside it. The Ray runs use one local cluster started once here (loopback, no dashboard). The
engines run interleaved ``--repeats`` times so that load from other tenants hits all of them alike;
medians and per-repeat ratios against the local engine are printed. For the plan for large runs it
also times decoding alone on one core (the local engine's chunk decoder, in this process): decode
cores per accelerator = accelerator img/s / decode img/s per core; and the driver's writer alone
(rows/s that ``FeatureWriter.add`` commits): the ceiling of a run with one writer.

    python bench/ray_extract.py --limit 200 --json /tmp/ray_extract.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def writer_rows_per_second(path: Path, dim: int = 1280, batch: int = 256, batches: int = 40) -> float:
    """Rows/s the driver's one writer commits (``FeatureWriter.add``, flushed per batch): the
    ceiling of the single-writer design, whatever the cluster computes."""
    import numpy as np

    from ris.featurewriter import FeatureWriter

    feats = np.random.default_rng(0).standard_normal((batch, dim)).astype(np.float32)
    w = FeatureWriter(path, {"model": "bench"}, (dim,), [])
    t0 = time.perf_counter()
    for b in range(batches):
        w.add([f"img{b * batch + i:09d}.jpg" for i in range(batch)], feats, [""] * batch)
    rate = batch * batches / (time.perf_counter() - t0)
    w.discard()
    return rate


def warm_extractor(cfg, batch: int):
    """The local engine's extractor after one batch at the run's shape, as each Ray actor does
    before its first real batch: neither engine's img/s then counts the first-call cost."""
    import numpy as np

    from ris.extractor import FeatureExtractor

    ext = FeatureExtractor(cfg)
    ext.embed(np.zeros((batch, ext.max_size, ext.max_size, 3), np.uint8))
    return ext


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/ukbench1000"),
                   help="folder of JPEGs")
    p.add_argument("--limit", type=int, default=200, help="images per measurement (the first N by name)")
    p.add_argument("--model", default="mobilenet_v2", help="backbone (offline ImageNet weights for mobilenet_v2)")
    p.add_argument("--weights", default="imagenet", help="'imagenet' or 'none' (random init, same speed)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of every engine")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians are reported")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from ris.decoding import _decode_chunk
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.images import find_images
    from ris.ray_engine import RayOptions, extract_on_ray

    src = Path(args.dataset)
    names = find_images(src)[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="ris-bench-ray-"))
    data = work / "images"
    data.mkdir()
    for n in names:  # links: the images are read where they are
        (data / Path(n).name).symlink_to((src / n).resolve())
    cfg = ExtractConfig(model=args.model, weights=args.weights)

    t0 = time.perf_counter()
    _decode_chunk(str(data), [Path(n).name for n in names], cfg.resolved_size())
    decode_per_core = len(names) / (time.perf_counter() - t0)
    writer_rate = writer_rows_per_second(work / "writer.h5")

    t0 = time.perf_counter()
    ray.init(address="local", _node_ip_address="127.0.0.2", include_dashboard=False, log_to_driver=False,
             num_cpus=os.cpu_count(), logging_level="WARNING")
    cluster_start = time.perf_counter() - t0
    runs = {
        "local": lambda db: extract_features(data, db, cfg, ExtractOptions(batch_size=args.batch_size, progress=False),
                                             extractor=warm_extractor(cfg, args.batch_size)),
        "ray_1_actor": lambda db: extract_on_ray(data, db, cfg, batch_size=args.batch_size, progress=False,
                                                 options=RayOptions(actors=1)),
        "ray_2_actors": lambda db: extract_on_ray(data, db, cfg, batch_size=args.batch_size, progress=False,
                                                  options=RayOptions(actors=2)),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    busy: dict[str, list[float]] = {k: [] for k in runs if k != "local"}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    load = []
    try:
        for r in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                s = fn(work / f"{name}-{r}.h5")
                walls[name].append(round(time.perf_counter() - t0, 2))  # with the model builds / actor starts
                rates[name].append(s.images_per_second)
                if name in busy:  # share of the run the actors computed: < 1 means they waited for input
                    busy[name].append(round(s.embed_seconds / (s.seconds * s.actors), 3))
                load.append(os.getloadavg()[0])
                print(f"repeat {r} {name}: {s.images_per_second:.1f} img/s ({s.extracted} images, {s.seconds:.2f} s; "
                      f"{walls[name][-1]:.1f} s with start-up)", file=sys.stderr)
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(rates[k], rates["local"])) for k in runs if k != "local"}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "images": len(names), "model": args.model, "batch_size": args.batch_size,
              "img_per_s": rates, "median_img_per_s": med,
              "seconds_with_startup": walls, "actors_busy": busy, "ray_cluster_start_s": round(cluster_start, 2),
              "ratio_to_local": ratios,
              "decode_img_per_s_one_core": round(decode_per_core, 1),
              "writer_rows_per_s_1280_dims_batch_256": round(writer_rate), "load_average": load,
              "ray_version": ray.__version__, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    for k in runs:
        extra = f", {ratios[k]:.2f}x local" if k in ratios else ""
        print(f"{k:>13}: {med[k]:7.1f} img/s{extra}; {statistics.median(walls[k]):.1f} s with start-up")
    print(f"local Ray cluster start: {cluster_start:.1f} s")
    print(f"decoding alone, one core: {decode_per_core:.0f} img/s at {cfg.resolved_size()} px")
    print(f"the driver's writer: {writer_rate:,.0f} rows/s (1280 float32 dims, batches of 256)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
