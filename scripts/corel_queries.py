"""A seeded Corel-1k query list for ``ris-eval --queries``: 20 images of each class (files
c*100 .. c*100+99), so that verification's cost stays bounded on a 2-core machine.

    python scripts/corel_queries.py > corel_queries.txt
"""
import numpy as np

rng = np.random.default_rng(0)
print("\n".join(f"{c * 100 + j}.jpg" for c in range(10) for j in sorted(rng.choice(100, 20, replace=False))))
