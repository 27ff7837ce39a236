"""``--rerank dba+qe`` at collection scale: building the DBA database once vs loading its cache.

DBA (database-side augmentation) needs every row's nearest neighbours: an O(N^2 D) pass. Before,
``ris-search --rerank dba+qe`` paid it on every run; now ``SearchEngine`` keeps the augmented
database beside the vectors (``<file>.dba-n2-a3.h5``) and only reloads it. This script times both
on seeded synthetic vectors (the ``bench/search_scale.py`` mixture), plus the per-query cost of the
two-pass dba+qe search against a plain exact search of the same database.

    python bench/rerank_cache.py --n 100000 --dim 256 --json /tmp/rerank_cache.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="database rows")
    p.add_argument("--dim", type=int, default=256, help="dimensions")
    p.add_argument("--queries", type=int, default=50, help="single queries timed")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic vectors and queries (default: %(default)s)")
    p.add_argument("--hnsw", action="store_true",
                   help="also build the DBA database from an HNSW index's neighbours and compare it with the exact one")
    p.add_argument("--M", type=int, default=32, help="HNSW graph degree (with --hnsw)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import h5py

    from ris.rerank import Reranker
    from ris.dba_cache import cached_dba
    from search_scale import make_sampler

    draw = make_sampler(args.dim, args.seed)
    db = draw(args.n, 0)
    queries = draw(args.queries, 1)
    res: dict = {"n": args.n, "dim": args.dim, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=db, chunks=(1024, args.dim))
        t = time.perf_counter()
        first = cached_dba(str(path), db)
        res["dba_build_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        again = cached_dba(str(path), db)
        res["dba_cache_load_s"] = round(time.perf_counter() - t, 3)
        res["cache_equal"] = bool(np.array_equal(first, again))
        res["cache_mb"] = round(sum(f.stat().st_size for f in Path(tmp).glob("*.dba-*")) / 1e6, 1)
        for method in ("none", "dba+qe"):
            r = Reranker(db, method, "euclidean", augmented=again if method == "dba+qe" else None)
            r.search(queries[:2], 10)  # warm-up
            times = []
            for q in queries:
                t = time.perf_counter()
                r.search(q[None], 10)
                times.append(time.perf_counter() - t)
            res[f"query_ms_p50_{method}"] = round(1e3 * float(np.median(times)), 2)
        if args.hnsw:
            from ris.index import HnswIndex
            from ris.rerank import dba_database

            t = time.perf_counter()
            index = HnswIndex(args.dim, "euclidean", M=args.M)
            index.add(db, 0)
            res["hnsw_build_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            approx = dba_database(db, 2, 3.0, index=index)
            res["dba_from_hnsw_s"] = round(time.perf_counter() - t, 2)
            res["dba_rows_equal_to_exact"] = round(float(np.isclose(again, approx, atol=1e-5).all(1).mean()), 4)
            a = Reranker(db, "dba+qe", "euclidean", augmented=again).search(queries, 10)[1]
            b = Reranker(db, "dba+qe", "euclidean", augmented=approx).search(queries, 10)[1]
            res["dba_qe_top10_overlap_exact_vs_hnsw"] = round(
                float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])), 4)
    res["speedup_per_search_run"] = round(res["dba_build_s"] / max(res["dba_cache_load_s"], 1e-6), 1)
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
