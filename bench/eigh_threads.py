"""One 1280 x 1280 eigh on OpenBLAS's default threads and on one thread, alternately.

Run it with CPU-bound work beside it to see why the whitening fit limits BLAS to one thread
(bench/README.md, "The whitening fit on a busy machine"):

    python -c "while True: pass" & B1=$!; python -c "while True: pass" & B2=$!
    python bench/eigh_threads.py; kill $B1 $B2
"""
from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits


def main() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1280, 300))
    c = a @ a.T + np.eye(1280)
    print("blas threads:", [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
    for label in ("default", "1 thread", "default", "1 thread"):
        t = time.perf_counter()
        if label == "default":
            np.linalg.eigh(c)
        else:
            with threadpool_limits(1, user_api="blas"):
                np.linalg.eigh(c)
        print(f"{label}: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
