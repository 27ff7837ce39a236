"""Search at scale: exact vs HNSW on N synthetic feature vectors stored in HDF5.

Data: a seeded Gaussian mixture (1024 clusters) with a power-law spectrum (per-axis std ~ i^-0.5
in a random rotation, like the decaying PCA spectrum of CNN features), L2-normalised. Queries are
held-out draws from the same mixture, so they are not in the database.

    python bench/search_scale.py --n 1000000 --dim 256 --queries 200 --json runs/search_1m.json

Per phase it reports wall time and peak RSS: VmHWM after resetting it through
/proc/self/clear_refs (Linux), and the process-lifetime ru_maxrss from resource.getrusage.
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

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ris.index import ExactIndex, HnswIndex, build_hnsw_from_db  # noqa: E402
from ris.topk import l2_normalize  # noqa: E402

from peak_memory import reset_hwm, vm_hwm_mb  # noqa: E402  (bench/ is on sys.path when run as a script)

K = 10


def make_sampler(dim: int, seed: int, clusters: int = 1024, decay: float = 0.5, spread: float = 1.0):
    """Return draw(n, stream): the same mixture for every stream, independent seeded draws."""
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -decay

    def draw(n: int, stream: int) -> np.ndarray:
        r = np.random.default_rng([seed, stream])
        x = centers[r.integers(0, clusters, n)] + spread * r.standard_normal((n, dim), dtype=np.float32)
        return l2_normalize((x * scale) @ rot)

    return draw


class Phase:
    """Time a block and record its peak RSS (VmHWM reset at entry where Linux allows)."""

    results: dict[str, dict] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> dict:
        self.reset = reset_hwm()
        self.rec = {}
        self.t0 = time.perf_counter()
        return self.rec

    def __exit__(self, *exc) -> None:
        self.rec["seconds"] = time.perf_counter() - self.t0
        self.rec["peak_rss_mb"] = vm_hwm_mb() if self.reset else None
        self.rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Phase.results[self.name] = self.rec
        print(f"[{self.name}] {self.rec['seconds']:.1f} s, peak RSS {self.rec['peak_rss_mb'] or 0:.0f} MB",
              file=sys.stderr, flush=True)


def latencies(fn, queries: np.ndarray, warmup: int = 3) -> tuple[np.ndarray, list]:
    """Per-query wall time (ms) of ``fn(q[None])``, one query at a time, and the results."""
    for q in queries[:warmup]:
        fn(q[None])
    out, ms = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q[None])[1][0])
        ms.append((time.perf_counter() - t) * 1e3)
    return np.array(ms), out


def pct(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def recall_at(found, truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / K for f, t in zip(found, truth)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (database rows) (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="dimensions of each vector (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="held-out queries for latency and recall")
    p.add_argument("--stream-queries", type=int, default=10, help="queries for the streamed-from-HDF5 exact run")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and queries (default: %(default)s)")
    p.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"],
                   help="distance of the exact and HNSW searches (default: %(default)s)")
    p.add_argument("--M", type=int, default=32, help="HNSW graph degree (links per node) (default: %(default)s)")
    p.add_argument("--ef-construction", type=int, default=200,
                   help="HNSW candidate list size while building (default: %(default)s)")
    p.add_argument("--ef-search", default="32,64,128,256", help="comma list; each is measured")
    p.add_argument("--memory", action="store_true", help="keep the HDF5 file in memory (h5py core driver)")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)

    info = {"args": vars(args), "cpus": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
            "load_avg_start": os.getloadavg(), "numpy": np.__version__,
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    draw = make_sampler(args.dim, args.seed)
    queries = draw(args.queries, stream=10**9)  # held out: never written to the database
    tmp = tempfile.TemporaryDirectory(prefix="ris-bench-")
    h5path = os.path.join(tmp.name, "feats.h5")
    kw = {"driver": "core", "backing_store": False} if args.memory else {}
    f = h5py.File(h5path, "w", **kw)
    chunk = max(1, min(1024, (1 << 20) // (4 * args.dim)))  # as ris.featuredb writes it
    ds = f.create_dataset("features", shape=(0, args.dim), maxshape=(None, args.dim), dtype="float32",
                          chunks=(chunk, args.dim))
    with Phase("generate+write"):
        step = 100_000
        for i, start in enumerate(range(0, args.n, step)):
            x = draw(min(step, args.n - start), stream=i)
            ds.resize(start + len(x), axis=0)
            ds[start:] = x
        f.flush()

    exact = ExactIndex(ds, args.metric, cache_bytes=0)
    with Phase("exact streamed single") as r:
        ms, _ = latencies(lambda q: exact.search(q, K), queries[: args.stream_queries], warmup=1)
        r.update(pct(ms))
    with Phase("exact load into RAM") as r:
        exact = ExactIndex(ds, args.metric)
        r["in_memory"] = exact.in_memory
    with Phase("exact single") as r:
        ms, single = latencies(lambda q: exact.search(q, K), queries)
        r.update(pct(ms))
    with Phase("exact batched") as r:
        t = time.perf_counter()
        _, truth = exact.search(queries, K)
        r["ms_per_query"] = (time.perf_counter() - t) * 1e3 / len(queries)
        r["single_vs_batch_recall"] = recall_at(single, truth)
    del exact, single

    with Phase("hnsw build"):
        hnsw = build_hnsw_from_db(ds, args.metric, M=args.M, ef_construction=args.ef_construction)
    idx_path = os.path.join(tmp.name, "feats.h5.hnsw")
    with Phase("hnsw save") as r:
        hnsw.save(idx_path)
        r["file_mb"] = json.loads(Path(idx_path + ".json").read_text())["index_bytes"] / 2**20  # the graph it names
    del hnsw
    with Phase("hnsw load") as r:
        hnsw = HnswIndex.load(idx_path)
    for ef in [int(e) for e in args.ef_search.split(",")]:
        with Phase(f"hnsw search ef={ef}") as r:
            hnsw.ef_search = ef
            ms, found = latencies(lambda q: hnsw.search(q, K), queries)
            r.update(pct(ms), ef_search=ef, recall_at_10=recall_at(found, truth))
    f.close()
    tmp.cleanup()
    info["load_avg_end"] = os.getloadavg()
    info["phases"] = Phase.results

    print(f"\nN={args.n} dim={args.dim} metric={args.metric} queries={args.queries} "
          f"cpus={info['cpus']} load avg start/end {info['load_avg_start'][0]:.1f}/{info['load_avg_end'][0]:.1f}")
    print(f"{'phase':<24}{'time s':>9}{'p50 ms':>9}{'p95 ms':>9}{'ms/q':>9}{'recall@10':>10}{'peak RSS MB':>12}")
    for name, r in Phase.results.items():
        cols = [r.get("p50_ms"), r.get("p95_ms"), r.get("ms_per_query"), r.get("recall_at_10")]
        cells = "".join(f"{c:>9.2f}" if c is not None else f"{'':>9}" for c in cols[:3])
        cells += f"{cols[3]:>10.3f}" if cols[3] is not None else f"{'':>10}"
        print(f"{name:<24}{r['seconds']:>9.1f}{cells}{r['peak_rss_mb'] or r['ru_maxrss_mb']:>12.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
