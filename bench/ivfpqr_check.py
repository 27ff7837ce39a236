"""Does re-ranking with a second, residual PQ code (faiss IndexIVFPQR, Jegou et al. 2011's
"re-ranking with source coding") reach recall@10 0.90 without the stored vectors, within the
budget PQ96x8 spends (104 bytes per vector with the id)? A one-off check for issue 12's goal.

It regenerates the 1M x 256 synthetic vectors of ``bench/index_scale.py`` (same generator, seed and
streams) and reads that script's queries and exact top-10 from its --workdir:

    python bench/index_scale.py --n 1000000 --kinds ivfpq --workdir W --threads 1   # once: W/truth.npy
    python bench/ivfpqr_check.py --workdir W "IVF4096,PQ32+64"
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factories", nargs="+", help="faiss index_factory strings, e.g. IVF4096,PQ32+64")
    p.add_argument("--workdir", required=True, help="bench/index_scale.py's workdir (queries.npy, truth.npy)")
    p.add_argument("--n", type=int, default=1_000_000,
                   help="synthetic vectors regenerated; must be the --n the workdir was made with "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="faiss (OpenMP) threads (default: %(default)s)")
    args = p.parse_args(argv)
    import faiss

    from search_scale import make_sampler

    faiss.omp_set_num_threads(args.threads)
    draw = make_sampler(256, 0)
    x = np.concatenate([draw(min(100_000, args.n - s), stream=i) for i, s in enumerate(range(0, args.n, 100_000))])
    work = Path(args.workdir)
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 262_144), replace=False)]
    for factory in args.factories:
        t0 = time.perf_counter()
        index = faiss.index_factory(256, factory)
        index.train(sample)
        t1 = time.perf_counter()
        index.add(x)
        t2 = time.perf_counter()
        path = work / "ivfpqr_check.faiss"
        faiss.write_index(index, str(path))
        size = os.path.getsize(path)
        path.unlink()
        print(f"{factory}: train {t1 - t0:.0f} s, add {t2 - t1:.0f} s, {size / 1e6:.1f} MB ({size / len(x):.1f} B/vector)")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        for nprobe, k_factor in ((32, 4), (64, 4), (64, 16), (64, 64)):
            ivf.nprobe = nprobe
            if hasattr(ivf, "k_factor"):  # IVFPQR: how many first-stage candidates per result are re-ranked
                ivf.k_factor = k_factor
            found, lat = np.zeros((len(q), 10), np.int64), []
            for i in range(len(q)):
                t = time.perf_counter()
                found[i] = index.search(q[i : i + 1], 10)[1][0]
                lat.append(time.perf_counter() - t)
            recall = np.mean([len(set(a.tolist()) & set(b[:10].tolist())) / 10 for a, b in zip(found, truth)])
            print(f"  nprobe {nprobe}, k_factor {k_factor}: recall@10 {recall:.3f}, p50 {np.median(lat) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
