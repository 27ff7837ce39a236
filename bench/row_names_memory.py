"""Memory a SearchEngine holds per row for image names and labels: the whole columns as Python
lists (before 2026-12-02) against ``FeatureDB.row_names()`` + ``RowLabels`` (read on demand).

Why: at 10M rows the lists are on the order of a gigabyte, beside a compressed index of 0.5 GB.
Writes an N-row database (4-dim features: only the name and label columns matter here) with
realistic relative paths ("photos/2024/06/IMG_00123456.jpg", 100 labels), then, each in a fresh
process: RSS after opening the database, RSS after building the per-row names and labels the old
and the new way, and the time to name 12 random rows (what a search shows).

    python bench/row_names_memory.py --n 1000000 --json /tmp/row_names_1m.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_db(path: Path, n: int, batch: int = 200_000) -> float:
    import numpy as np

    from ris.featurewriter import FeatureWriter

    t0 = time.perf_counter()
    labels = [f"class{i:03d}" for i in range(100)]
    w = FeatureWriter(path, {"model": "bench"}, (4,), labels)
    feats = np.zeros((batch, 4), np.float32)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        names = [f"photos/{2000 + i % 25}/{1 + i % 12:02d}/IMG_{i:08d}.jpg" for i in range(start, start + m)]
        w.add(names, feats[:m], [labels[i % 100] for i in range(start, start + m)])
    w.finish({})
    return time.perf_counter() - t0


def child(path: str, mode: str) -> None:
    import numpy as np

    from ris.featuredb import FeatureDB, RowLabels

    db = FeatureDB(path)
    base = _rss_mb()
    t0 = time.perf_counter()
    if mode == "lists":  # what SearchEngine held before
        names = db.image_ids
        label_names = db.label_names
        labels = [label_names[l] if 0 <= l < len(label_names) else "" for l in db.labels]
    else:
        names = db.row_names()
        labels = RowLabels(db.labels, db.label_names)
    open_s = time.perf_counter() - t0
    held = _rss_mb() - base
    rows = np.random.default_rng(0).integers(0, len(names), 12)
    t1 = time.perf_counter()
    for _ in range(100):
        shown = list(zip(names.many(rows) if hasattr(names, "many") else [names[int(r)] for r in rows],
                         [labels[int(r)] for r in rows]))
    per_search_ms = (time.perf_counter() - t1) / 100 * 1000
    assert len(shown) == 12
    print(json.dumps({"mode": mode, "held_mb": round(held, 1), "open_s": round(open_s, 3),
                      "name_12_rows_ms": round(per_search_ms, 3)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows")
    p.add_argument("--workdir", default=None, help="where the database is written (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("DB", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    db = work / f"names-{args.n}.h5"
    write_s = write_db(db, args.n) if not db.exists() else 0.0
    out = {"n": args.n, "write_s": round(write_s, 1), "date": time.strftime("%Y-%m-%d"),
           "load_avg": os.getloadavg(), "runs": []}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for mode in ("lists", "on_demand"):
        r = subprocess.run([sys.executable, __file__, "--child", str(db), mode], capture_output=True, text=True,
                           env=env, check=True)
        out["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in out["runs"]:
        print(f"{args.n:>11,} rows  {r['mode']:<10} held {r['held_mb']:>8.1f} MB  built in {r['open_s']:>7.3f} s  "
              f"12 names per search {r['name_12_rows_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
