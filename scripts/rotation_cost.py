"""Milliseconds per query of ris-search's path (decode, forward pass(es), search) without and with
--rotations, one query at a time as ris-search answers them (engine set-up excluded, one warm-up
query first).

    python scripts/rotation_cost.py DB [QUERIES [RERANK]]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from ris.search import SearchEngine

db_path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
rerank = sys.argv[3] if len(sys.argv) > 3 else "none"
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
