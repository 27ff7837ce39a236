"""Milliseconds per query of ris-search's path (decode, forward pass(es), search) without and with
--rotations, one query at a time as ris-search answers them (engine set-up excluded, one warm-up
query first).

    python scripts/rotation_cost.py DB [QUERIES [RERANK]]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db", metavar="DB", help="feature database (.h5); its own images (seeded choice) are the queries")
    p.add_argument("queries", type=int, nargs="?", default=30, metavar="QUERIES",
                   help="timed queries, after one warm-up query (default: %(default)s)")
    p.add_argument("rerank", nargs="?", default="none", metavar="RERANK",
                   help="re-ranking method, as ris-search --rerank names it (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from ris.search import SearchEngine  # after parsing, so --help needs no backend

    db_path, n, rerank = args.db, args.queries, args.rerank
    out = {"db": db_path, "queries": n, "rerank": rerank}
    for rotations in (False, True):
        with SearchEngine(db_path, rerank=rerank, rotations=rotations) as engine:
            rows = np.random.default_rng(0).choice(len(engine.image_ids), n + 1, replace=False)
            paths = [Path(engine.root) / engine.image_ids[int(r)] for r in rows]
            engine.query(paths[0], 12)  # warm-up: the first forward pass builds the graph
            t0 = time.perf_counter()
            for p in paths[1:]:
                engine.query(p, 12)
            out["rotations" if rotations else "plain"] = round(1000 * (time.perf_counter() - t0) / n, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
