"""Evaluation memory and time at scale: N-S + mAP over 100,000 stored vectors.

Writes N synthetic descriptors (groups of ``--group`` views of one object, ``--dim`` dimensions)
into an HDF5 feature database with ``ris.featuredb.FeatureWriter``, the way ``ris-extract`` does,
then scores every image against all the others with ``ris.evaluate.evaluate_db(split="all")``
(what ``ris-eval --split all`` runs: read the rows, L2-normalise, ``evaluate_retrieval`` in blocks
of 256 queries). Reports wall time and peak RSS of each phase: VmHWM reset through /proc/self/clear_refs
at the start of the phase, and the process-lifetime ``ru_maxrss``.

The data: object centres ~ N(0, I) scaled by a power-law spectrum (per-axis std ~ i^-0.5, like the
decaying PCA spectrum of CNN features), each view = centre + ``--sigma`` x N(0, I) x the same
spectrum, L2-normalised. ``--sigma`` sets the difficulty (N-S ~ 3 at the default on 100k).

    python bench/eval_memory.py --n 100000 --dim 256 --json /tmp/eval_memory.json
    /usr/bin/time -v python bench/eval_memory.py --phase eval --path /tmp/evalmem.h5   # eval only

``--phase write`` writes the database and keeps it (``--path``); ``--phase eval`` only evaluates an
existing one, so that ``/usr/bin/time -v`` sees the evaluation's peak alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from peak_memory import reset_hwm, vm_hwm_mb  # noqa: E402  (bench/ is on sys.path when run as a script)


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_db(path: Path, n: int, dim: int, group: int, sigma: float, seed: int, chunk: int = 8192) -> dict:
    from ris.featuredb import FeatureWriter
    from ris.topk import l2_normalize

    n_obj = -(-n // group)
    spectrum = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    names = [str(i) for i in range(n_obj)]
    attrs = {"model": "synthetic", "weights": "none", "layer": "none", "input_size": 0, "scales": [1.0],
             "pooling": "gap", "normalized": True, "dataset_root": "synthetic", "labels_mode": "synthetic"}
    path.unlink(missing_ok=True)
    Path(str(path) + ".partial").unlink(missing_ok=True)
    w = FeatureWriter(path, attrs, (dim,), names)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        obj = np.arange(s, e) // group
        # centre of object o: its own seeded draw, so any chunking gives the same data
        centres = np.stack([np.random.default_rng([seed, int(o)]).standard_normal(dim, dtype=np.float32)
                            for o in np.unique(obj)])
        centres = centres[obj - obj[0]]
        noise = np.random.default_rng([seed, 1 << 30, s]).standard_normal((e - s, dim), dtype=np.float32)
        x = l2_normalize((centres + sigma * noise) * spectrum)
        w.add([f"img{i:07d}.jpg" for i in range(s, e)], x, [names[o] for o in obj])
    w.finish({"num_images": n, "num_failed": 0})
    return {"rows": n, "objects": n_obj, "bytes": path.stat().st_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000,
                   help="synthetic vectors (database rows) written (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="dimensions of each vector (default: %(default)s)")
    p.add_argument("--group", type=int, default=4, help="views per object (UKBench: 4)")
    p.add_argument("--sigma", type=float, default=0.8, help="view noise relative to the object centre")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: %(default)s)")
    p.add_argument("--phase", choices=["all", "write", "eval"], default="all",
                   help="write: only write the database to --path; eval: only evaluate an existing --path; "
                        "all: both (default: %(default)s)")
    p.add_argument("--path", default=None, help="HDF5 database (default: a temp file, removed after 'all')")
    p.add_argument("--json", default=None, help="also write the results (times, peak RSS, scores) here as JSON")
    args = p.parse_args(argv)

    tmpdir = None
    if args.path:
        path = Path(args.path)
    else:
        if args.phase == "eval":
            sys.exit("--phase eval needs --path")
        tmpdir = tempfile.TemporaryDirectory(prefix="ris-evalmem-")
        path = Path(tmpdir.name) / "feats.h5"
    info = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "python": platform.python_version(),
            "numpy": np.__version__, "load_avg_start": [round(v, 2) for v in os.getloadavg()],
            "args": vars(args), "phases": {}}
    info["rss_at_start_mb"] = round(vm_hwm_mb() or 0, 1)

    if args.phase in ("all", "write"):
        reset = reset_hwm()
        t = time.perf_counter()
        out = write_db(path, args.n, args.dim, args.group, args.sigma, args.seed)
        info["phases"]["write"] = {**out, "seconds": round(time.perf_counter() - t, 1),
                                   "peak_rss_mb": round(vm_hwm_mb(), 1) if reset else None,
                                   "ru_maxrss_mb": round(ru_maxrss_mb(), 1)}
        print(f"[write] {info['phases']['write']}", file=sys.stderr, flush=True)

    if args.phase in ("all", "eval"):
        from ris.evaluate import evaluate_db

        reset = reset_hwm()
        t = time.perf_counter()
        result = evaluate_db(path, split="all")
        dt = time.perf_counter() - t
        raw = result["raw"]
        info["phases"]["evaluate_db"] = {
            "seconds": round(dt, 1), "peak_rss_mb": round(vm_hwm_mb(), 1) if reset else None,
            "ru_maxrss_mb": round(ru_maxrss_mb(), 1), "images": result["images"], "objects": result["objects"],
            "ns_score": raw["ns_score"], "map": raw["map"], "recall_at": raw["recall_at"]}
        print(f"[evaluate_db] {info['phases']['evaluate_db']}", file=sys.stderr, flush=True)

    info["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    info["ru_maxrss_mb"] = round(ru_maxrss_mb(), 1)
    print(f"\nN={args.n} dim={args.dim} group={args.group} sigma={args.sigma}; "
          f"{info['machine']}; load avg start/end {info['load_avg_start'][0]}/{info['load_avg_end'][0]}")
    print(f"{'phase':<14}{'time s':>9}{'peak RSS MB':>13}{'ru_maxrss MB':>14}  result")
    for name, r in info["phases"].items():
        res = (f"N-S {r['ns_score']}, mAP {r['map']}, R@1 {r['recall_at'].get('1')}" if "ns_score" in r
               else f"{r['rows']} rows, {r['bytes'] / 1e6:.0f} MB file")
        print(f"{name:<14}{r['seconds']:>9}{r['peak_rss_mb'] or 0:>13.0f}{r['ru_maxrss_mb']:>14.0f}  {res}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
