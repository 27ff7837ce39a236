"""Milliseconds per query of the global search (exact, and each re-ranker) on a database, queries
answered one at a time as ris-search does (setup excluded, reported apart), and bytes per image.

    python scripts/query_cost.py DB [METHOD ...]
"""
import json
import sys
import time

import numpy as np

from ris.featuredb import FeatureDB
from ris.rerank import Reranker
from ris.embed import raw_descriptors

db_path, methods = sys.argv[1], sys.argv[2:] or ["none", "dba+qe"]
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
