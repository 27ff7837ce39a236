"""faiss IVF additive-quantiser codes (PRQ, PLSQ, RQ, LSQ; optional OPQ in front) on the
index_scale data, without re-ranking: does any code within ~104 bytes per vector (code + norm +
8-byte id) reach recall@10 0.90 at 1M?

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/aq_check.py --n 1000000 \\
        --factories "IVF4096,PRQ32x3x8;IVF4096,PRQ16x6x8" --probes 16,32,64

Data: ``search_scale.make_sampler`` (the generator of bench/index_scale.py, seed 0, 256-d), drawn
in 100k-row streams exactly as bench/rabitq_check.py does, 200 held-out queries (stream 10**9);
truth = exact top 10 by ``faiss.IndexFlatL2``. x and the truth are cached in --workdir as .npy.
One faiss thread. The coarse quantiser (IVF4096 k-means on the training sample) is trained once
per (n, nlist, train rows) and cached; every factory reuses it as a flat quantiser over the
centroids (a pre-transform such as OPQ is trained first and the centroids are mapped through it:
the image of a cluster mean under a linear map is the mean of the mapped cluster).
Bytes per vector = the written index's size / n (codes, norms, ids, centroids, codebooks).
recall@10 = |approx top 10 & exact top 10| / 10; 1-recall@10 = fraction of queries whose exact
nearest neighbour is in the top 10. Latency: 200 single queries after 3 warm-ups, p50/p95 ms.
mse = mean squared reconstruction error (sa_encode/sa_decode) of --mse-rows database rows: a
cheap proxy of code quality for comparing shapes on small runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_scale import make_sampler  # noqa: E402


def data(n: int, workdir: str):
    """x (n x 256), q (200 x 256), exact top 10 of q; cached in workdir."""
    import faiss

    xp, qp, tp = (os.path.join(workdir, f"{s}_{n}.npy") for s in ("x", "q", "truth"))
    if all(os.path.exists(p) for p in (xp, qp, tp)):
        return np.load(xp, mmap_mode="r"), np.load(qp), np.load(tp)
    draw = make_sampler(256, 0)
    x = np.concatenate([draw(min(100_000, n - s), stream=i) for i, s in enumerate(range(0, n, 100_000))])
    q = draw(200, stream=10**9)
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    truth = flat.search(q, 10)[1]
    np.save(xp, x), np.save(qp, q), np.save(tp, truth)
    return x, q, truth


def coarse_centroids(sample: np.ndarray, nlist: int, path: str) -> np.ndarray:
    import faiss

    if os.path.exists(path):
        return np.load(path)
    t0 = time.perf_counter()
    km = faiss.Kmeans(sample.shape[1], nlist, niter=20, seed=1234, verbose=False)
    km.train(sample)
    np.save(path, km.centroids)
    print(f"coarse k-means ({nlist} cells, {len(sample)} rows): {time.perf_counter() - t0:.0f} s", flush=True)
    return km.centroids


_KEEP: list = []


def tune_aq(ivf, beam: int | None, lsq_iters: int | None) -> None:
    """Encoder knobs of the additive quantiser inside ``ivf`` (before training)."""
    import faiss

    aq = faiss.downcast_AdditiveQuantizer(ivf.aq)
    subs = [aq]
    if hasattr(aq, "nsplits"):  # product AQ: set on every sub-quantiser
        subs = [faiss.downcast_AdditiveQuantizer(aq.subquantizer(i)) for i in range(aq.nsplits)]
    for s in subs:
        if beam is not None and hasattr(s, "max_beam_size"):
            s.max_beam_size = beam
        if lsq_iters is not None and hasattr(s, "encode_ils_iters"):
            s.encode_ils_iters = lsq_iters


def build(factory: str, dim: int, sample: np.ndarray, centroids: np.ndarray, beam, lsq_iters):
    """index_factory(factory) with the cached coarse cells; returns (index, ivf, train seconds)."""
    import faiss

    index = faiss.index_factory(dim, factory)
    t0 = time.perf_counter()
    cents = centroids
    train_x = sample
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            vt.train(train_x)
            train_x = vt.apply(train_x)
            cents = vt.apply(cents)
        index.is_trained = True
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    q = faiss.IndexFlatL2(cents.shape[1])
    q.add(np.ascontiguousarray(cents, dtype=np.float32))
    ivf.quantizer = q
    ivf.own_fields = False
    _KEEP.append(q)  # the IVF does not own it: keep the Python object alive
    if hasattr(ivf, "aq"):
        tune_aq(ivf, beam, lsq_iters)
    ivf.train(train_x)  # quantiser trained with nlist entries: only the codes are trained
    return index, ivf, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    ap.add_argument("--nlist", type=int, default=4096, help="coarse cells")
    ap.add_argument("--train-rows", type=int, default=262_144, help="training sample (random rows of x, seed 0)")
    ap.add_argument("--factories", required=True,
                    help="faiss factory strings separated by ';', each with IVF{nlist}, e.g. "
                         "'IVF4096,PRQ32x3x8;OPQ32_256,IVF4096,PRQ32x3x8_Ncqint8'")
    ap.add_argument("--probes", default="16,32,64", help="cells searched, comma-separated")
    ap.add_argument("--beam", type=int, default=None, help="RQ/PRQ max_beam_size (faiss default 5)")
    ap.add_argument("--lsq-iters", type=int, default=None, help="LSQ/PLSQ encode_ils_iters (faiss default 16)")
    ap.add_argument("--mse-rows", type=int, default=20_000, help="database rows for the reconstruction MSE")
    ap.add_argument("--code-train-rows", type=int, default=None,
                    help="train the codes (and any OPQ) on only the first this many sample rows (quick estimates); "
                         "the coarse cells always use the whole sample")
    ap.add_argument("--add-rows", type=int, default=None,
                    help="add only this many rows (quick estimates of add speed and MSE; implies --no-search)")
    ap.add_argument("--no-search", action="store_true", help="train, add and report the MSE only")
    ap.add_argument("--workdir", default="/tmp/aq-work", help="cache of x, queries, truth, coarse centroids")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    print(f"load average {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    x, q, truth = data(args.n, args.workdir)
    print(f"data + truth: {time.perf_counter() - t0:.0f} s", flush=True)
    n, dim = x.shape
    rng = np.random.default_rng(0)
    sample = np.ascontiguousarray(x[np.sort(rng.choice(n, min(n, args.train_rows), replace=False))])
    centroids = coarse_centroids(sample, args.nlist,
                                 os.path.join(args.workdir, f"coarse_{n}_{args.nlist}_{len(sample)}.npy"))
    mse_rows = np.ascontiguousarray(x[np.sort(rng.choice(n, min(n, args.mse_rows), replace=False))])
    for factory in (f.strip() for f in args.factories.split(";") if f.strip()):
        print(f"--- {factory} (beam {args.beam}, lsq iters {args.lsq_iters}), load {os.getloadavg()[0]:.1f}",
              flush=True)
        try:
            index, ivf, train_s = build(factory, dim, sample[:args.code_train_rows], centroids, args.beam,
                                        args.lsq_iters)
        except RuntimeError as exc:
            print(f"{factory}: FAILED to build: {exc}", flush=True)
            continue
        print(f"trained in {train_s:.0f} s", flush=True)
        t0 = time.perf_counter()
        n_add = n if args.add_rows is None else min(n, args.add_rows)
        for s in range(0, n_add, 100_000):
            index.add(np.ascontiguousarray(x[s:min(s + 100_000, n_add)]))
            if s == 0:
                print(f"  first 100k rows added in {time.perf_counter() - t0:.1f} s", flush=True)
        add_s = time.perf_counter() - t0
        path = os.path.join(args.workdir, "tmp_index.faiss")
        faiss.write_index(index, path)
        per_vector = os.path.getsize(path) / n_add
        os.remove(path)
        mse = float(((index.sa_decode(index.sa_encode(mse_rows)) - mse_rows) ** 2).sum(1).mean())
        print(f"{factory}: code {ivf.code_size} B, {per_vector:.1f} bytes/vector, train {train_s:.0f} s, "
              f"add {add_s:.0f} s ({n_add / add_s:,.0f} rows/s), mse {mse:.5f}", flush=True)
        if args.no_search or n_add < n:
            continue
        for probes in (int(p) for p in args.probes.split(",")):
            ivf.nprobe = probes
            for row in q[:3]:
                index.search(row[None], 10)
            found, ms = [], []
            for row in q:
                t = time.perf_counter()
                found.append(index.search(row[None], 10)[1][0])
                ms.append(1000 * (time.perf_counter() - t))
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            one = np.mean([t[0] in f for f, t in zip(found, truth)])
            print(f"RESULT n={n} {factory} probes={probes}: recall@10 {recall:.3f}, 1-recall@10 {one:.3f}, "
                  f"p50 {np.percentile(ms, 50):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms, "
                  f"{per_vector:.1f} bytes/vector, train {train_s:.0f} s, add {add_s:.0f} s, mse {mse:.5f}",
                  flush=True)
        del index, ivf


if __name__ == "__main__":
    main()
