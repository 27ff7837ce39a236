"""Mean squared coarse residual of an IVF index's training-sample rows against held-out rows.

Why: with few training rows per cell the coarse k-means overfits its sample, and the PQ codebooks,
trained on the sample's residuals, then encode larger ones (bench/README.md, 2026-12-03). The
training sample is redrawn as ``ris.faiss_index._sample_rows`` draws it (seed 0).

    python bench/coarse_residuals.py /tmp/ivfcells-1m/feats.h5.ivfpq.*.faiss /tmp/ivfcells-1m/feats.h5 --train-rows 262144
"""
from __future__ import annotations

import argparse

import faiss
import h5py
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="the .faiss file ris saved")
    p.add_argument("db", help="the feature database (HDF5, dataset 'features')")
    p.add_argument("--train-rows", type=int, default=262144,
                   help="rows the index was trained on (its params' train_rows) (default: %(default)s)")
    p.add_argument("--rows", type=int, default=10000,
                   help="rows measured from the training sample and from the rest, each (default: %(default)s)")
    a = p.parse_args()
    faiss.omp_set_num_threads(1)
    idx = faiss.read_index(a.index, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    ds = h5py.File(a.db, "r")["features"]
    n = ds.shape[0]
    train = np.sort(np.random.default_rng(0).choice(n, a.train_rows, replace=False))
    held = np.setdiff1d(np.arange(n), train)
    opq = idx.chain.at(0) if isinstance(idx, faiss.IndexPreTransform) else None
    ivf = faiss.extract_index_ivf(idx)
    faiss.ParameterSpace().set_index_parameter(idx, "quantizer_efSearch", 128)

    def tr(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(opq.apply(x) if opq is not None else x, dtype=np.float32)

    groups = {}
    rng = np.random.default_rng(5)
    for name, rows in (("training sample", train), ("held out", held)):
        groups[name] = tr(np.asarray(ds[np.sort(rng.choice(rows, a.rows, replace=False))], np.float32))
    for name, x in groups.items():
        d = ivf.quantizer.search(x, 1)[0][:, 0]
        print(f"{ivf.nlist} cells, {name}: mean squared residual {d.mean():.4f} (mean |x|^2 {np.mean((x ** 2).sum(1)):.3f})")


if __name__ == "__main__":
    main()
