"""Milliseconds per query of the global search (exact, and each re-ranker) on a database, queries
answered one at a time as ris-search does (setup excluded, reported apart), and bytes per image.

    python scripts/query_cost.py DB [METHOD ...]
"""
import argparse
import json
import time

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db", metavar="DB", help="feature database (.h5) whose rows are both queries and gallery")
    p.add_argument("methods", nargs="*", default=["none", "dba+qe"], metavar="METHOD",
                   help="re-ranking methods to time, as ris-search --rerank names them; 'none' is the exact "
                        "search (default: none dba+qe)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so --help needs none of them
    from ris.embed import raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.rerank import Reranker

    db_path, methods = args.db, args.methods
    with FeatureDB(db_path) as db:
        x = raw_descriptors(db.read_rows(np.arange(len(db))))
    out = {"db": db_path, "images": len(x), "bytes_per_image": int(x.shape[1] * 4)}
    for m in methods:
        t0 = time.perf_counter()
        r = Reranker(x, m)
        setup = time.perf_counter() - t0
        q = np.random.default_rng(0).choice(len(x), 100, replace=False)
        t0 = time.perf_counter()
        for i in q:
            r.search(x[i:i + 1], 12)
        out[m] = {"setup_s": round(setup, 3), "ms_per_query": round(1000 * (time.perf_counter() - t0) / len(q), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
