"""faiss IVF-RaBitQ (1-4 bit codes, no codebook training) on the index_scale data, without re-ranking:
does any code within ~100 bytes per vector reach recall@10 0.90? (bench/README.md, 2026-12-02)

    python bench/rabitq_check.py --n 1000000 --nlist 4096 --bits 2,3

Data: ``search_scale.make_sampler`` (the generator of bench/index_scale.py, seed 0, 256-d), 200
held-out queries; truth by exact L2 search. One faiss thread. Bytes per vector = the written
index's size / n (codes, per-vector factors, ids, coarse centroids).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_scale import make_sampler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    ap.add_argument("--nlist", type=int, default=4096, help="coarse cells")
    ap.add_argument("--bits", default="2,3", help="RaBitQ bits per dimension, comma-separated")
    ap.add_argument("--probes", default="16,32,64", help="cells searched, comma-separated")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = args.n, 256
    draw = make_sampler(dim, 0)
    x = np.concatenate([draw(min(100_000, n - s), stream=i) for i, s in enumerate(range(0, n, 100_000))])
    q = draw(200, stream=10**9)
    flat = faiss.IndexFlatL2(dim)
    flat.add(x)
    truth = flat.search(q, 10)[1]
    del flat
    t0 = time.perf_counter()
    coarse = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, args.nlist)
    sample = x[np.random.default_rng(0).choice(n, min(n, 50 * args.nlist), replace=False)]
    coarse.train(sample)
    print(f"coarse k-means ({args.nlist} cells, {len(sample)} rows): {time.perf_counter() - t0:.0f} s", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        t0 = time.perf_counter()
        index = faiss.IndexIVFRaBitQ(coarse.quantizer, dim, args.nlist, faiss.METRIC_L2, True, bits)
        index.train(sample)  # the coarse cells are already trained: only the RaBitQ set-up runs
        index.add(x)
        build = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "i.faiss")
            faiss.write_index(index, path)
            per_vector = os.path.getsize(path) / n
        for probes in (int(p) for p in args.probes.split(",")):
            params = faiss.IVFRaBitQSearchParameters()
            params.nprobe, params.qb = probes, 8
            found, ms = [], []
            for row in q:
                t = time.perf_counter()
                found.append(index.search(row[None], 10, params=params)[1][0])
                ms.append(1000 * (time.perf_counter() - t))
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            one = np.mean([t[0] in f for f, t in zip(found, truth)])
            print(f"n={n} bits={bits} probes={probes}: recall@10 {recall:.3f}, 1-recall@10 {one:.3f}, "
                  f"p50 {np.percentile(ms, 50):.2f} ms, {per_vector:.1f} bytes/vector, build {build:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
