"""Index kinds at scale: exact vs HNSW vs faiss IVF-PQ vs Milvus Lite, in one run.

A ris feature database of N synthetic vectors is written with ``FeatureWriter`` (the mixture of
``bench/search_scale.py``: 1024 Gaussians, power-law spectrum, L2-normalised; queries are
held-out draws), streamed in 100k-row batches. The exact top 10 of every query is computed once
by streaming the database. Then, per index kind, two fresh processes:

* build: ``open_search_index(kind)`` exactly as ``ris-search --index KIND`` does (build, save);
  wall time, peak RSS (VmHWM) and the size of what it saved;
* serve: open the saved index, answer the queries one at a time (k = 10, 3 warm-up queries);
  p50/p95 latency, recall@10 against exact, and the memory it holds: resident set after
  the queries minus the process before opening the index (split into anonymous memory and
  file pages: a memory-mapped index is counted by the pages its queries touched).

    python bench/index_scale.py --n 1000000 --kinds exact,hnsw,ivfpq,milvus --workdir /tmp/ris-1m --json out.json
    python bench/index_scale.py --n 10000000 --kinds ivfpq --workdir /tmp/ris-10m --json out10m.json

The database and the ground truth are kept in --workdir and reused by later runs with the same
N, dim and seed; indexes are rebuilt unless --keep-indexes. --ivfpq-params overrides fields of
``ris.faiss_index.IvfPqParams`` for the build (e.g. ``m=96`` or ``m=128,nbits=4,fastscan=1``), to
compare code shapes on the same data:

    python bench/index_scale.py --n 1000000 --kinds ivfpq --workdir /tmp/ris-1m --ivfpq-params m=96 --json pq96.json

--two-level K1 (bench-side) trains the coarse cells by a two-level k-means (K1 centroids, then the
nlist cells split over their groups by size) instead of faiss's one k-means of nlist centroids:

    python bench/index_scale.py --n 1000000 --kinds ivfpq --workdir /tmp/ris-1m --ivfpq-params nlist=16384,m=96,opq_dim=192 --two-level 128

Besides recall@10 each run reports 1-recall@10 (``r1_at_10``: the fraction of queries whose exact
nearest neighbour is among the 10 answers, the "R@10" of the faiss papers), a weaker measure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

K = 10


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss() -> dict:
    return {"rss_mb": _status_mb("VmRSS"), "anon_mb": _status_mb("RssAnon"), "file_mb": _status_mb("RssFile"),
            "hwm_mb": _status_mb("VmHWM")}


# -- data ------------------------------------------------------------------------------------------

def make_database(work: Path, n: int, dim: int, seed: int, queries: int) -> dict:
    from search_scale import make_sampler

    from ris.featurewriter import FeatureWriter

    db, qpath, meta_path = work / "feats.h5", work / "queries.npy", work / "data.json"
    want = {"n": n, "dim": dim, "seed": seed, "queries": queries}
    if db.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("want") == want:
        return json.loads(meta_path.read_text())
    for p in work.glob("feats.h5*"):
        p.unlink() if p.is_file() else shutil.rmtree(p)
    draw = make_sampler(dim, seed)
    t0 = time.perf_counter()
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (dim,), [])
    step = 100_000
    for i, s in enumerate(range(0, n, step)):
        x = draw(min(step, n - s), stream=i)
        w.add([f"img{j:09d}.jpg" for j in range(s, s + len(x))], x, [""] * len(x))
    w.finish({})
    write_s = time.perf_counter() - t0
    q = draw(queries, stream=10**9)  # held out: never written to the database
    np.save(qpath, q)
    t0 = time.perf_counter()
    truth = exact_truth(db, q)
    np.save(work / "truth.npy", truth)
    meta = {"want": want, "write_seconds": write_s, "truth_seconds": time.perf_counter() - t0,
            "db_bytes": db.stat().st_size}
    meta_path.write_text(json.dumps(meta))
    return meta


def exact_truth(db: Path, q: np.ndarray) -> np.ndarray:
    from ris.featuredb import FeatureDB
    from ris.index import ExactIndex

    with FeatureDB(db) as f:  # streamed: the database is never held in memory twice
        return ExactIndex(f.features, "euclidean", block_rows=262144, cache_bytes=0).search(q, K)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@10: |top 10 ∩ exact top 10| / 10, averaged over the queries."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth)]))


def one_recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """1-recall@10: the fraction of queries whose exact nearest neighbour is in the top 10."""
    return float(np.mean([int(b[0]) in set(a.tolist()) for a, b in zip(found, truth)]))


def parse_params(text: str | None) -> dict:
    """``"m=96,nbits=4,fastscan=1"`` -> IvfPqParams overrides, typed like the dataclass fields."""
    from dataclasses import fields

    from ris.faiss_index import IvfPqParams

    types = {f.name: f.type for f in fields(IvfPqParams)}
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        kind = types.get(key)
        kind = kind if kind is None or isinstance(kind, str) else kind.__name__
        try:
            if not value:
                raise ValueError
            out[key] = value if kind == "str" else bool(int(value)) if kind == "bool" else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--ivfpq-params: {item!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(types)} and an integer VALUE (0/1 for opq, fastscan)") from None
        if kind is None:
            raise ValueError(f"--ivfpq-params: {key!r} is not a field of IvfPqParams ({', '.join(types)})")
    return out


# -- phases (each in its own process) ---------------------------------------------------------------

def _target(kind: str, work: Path) -> str:
    return f"milvus:{work / 'feats.milvus.db'}" if kind == "milvus" else kind


def index_files(kind: str, work: Path) -> list[Path]:
    if kind == "milvus":
        return [p for p in (work / "feats.milvus.db").rglob("*") if p.is_file()] if (work / "feats.milvus.db").exists() else []
    if kind == "exact":
        return []
    return [p for p in work.glob(f"feats.h5.{kind}*") if p.is_file()]


def phase_build(kind: str, work: Path, overrides: dict | None = None, two_level: int = 0) -> dict:
    import ris.faiss_index  # noqa: F401 (sets up OpenMP before anything loads faiss)
    from ris.featuredb import FeatureDB
    from ris.index import open_search_index
    from ris.index_state import source_of

    if kind == "ivfpq" and overrides:  # the build sizes its params with choose_params: override them there
        choose = ris.faiss_index.choose_params
        ris.faiss_index.choose_params = lambda n, dim, **o: choose(n, dim, **{**overrides, **o})
    coarse: dict = {}
    if kind == "ivfpq" and two_level:
        from two_level import patch_two_level

        patch_two_level(two_level, coarse)
    t0 = time.perf_counter()
    with FeatureDB(work / "feats.h5") as db:
        index = open_search_index(str(db.path), db.features, "euclidean", kind=_target(kind, work),
                                  source=source_of(db))
        n = len(index)
    out = {"build_seconds": time.perf_counter() - t0, "vectors": n, **_rss(),
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "index_bytes": sum(p.stat().st_size for p in index_files(kind, work))}
    if kind == "ivfpq":
        out["params"] = index.params.__dict__
        out["factory"] = index.params.factory(index.dim)
        out["code_bytes"] = index.params.code_bytes(index.dim)
        if two_level:
            out["two_level"] = {"k1": two_level, **coarse}
    return out


def phase_serve(kind: str, work: Path, settings: list[dict]) -> dict:
    import ris.faiss_index  # noqa: F401
    from ris.featuredb import FeatureDB
    from ris.index import open_search_index
    from ris.index_state import source_of

    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    with FeatureDB(work / "feats.h5") as db:
        source = source_of(db)
        base = _rss()
        t0 = time.perf_counter()
        index = open_search_index(str(db.path), db.features, "euclidean", kind=_target(kind, work), source=source,
                                  build=False, threshold=0)
        open_s, opened = time.perf_counter() - t0, _rss()
        rows = []
        chosen = int(index.params.nprobe) if kind == "ivfpq" else None  # the build's choice ('default')
        for s in settings or [{}]:
            if chosen is not None:
                s = {"nprobe": chosen, **s}
            for attr, v in s.items():
                if attr in ("nprobe", "rerank"):
                    setattr(index.params, attr, v)
                    index._apply_search_params()
                else:
                    setattr(index, attr, v)
            for x in q[:3]:
                index.search(x[None], K)
            ms, found = [], []
            for x in q:
                t = time.perf_counter()
                found.append(index.search(x[None], K)[1][0])
                ms.append((time.perf_counter() - t) * 1e3)
            ms = np.array(ms)
            found = np.array(found)
            ids = np.where(found >= 0, source["ids"][found], -1)  # rows -> the ids the ground truth was made with
            rows.append({"settings": s, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                         "recall_at_10": recall_at(ids, truth), "r1_at_10": one_recall_at(ids, truth), **{f"after_{k}": v for k, v in _rss().items()}})
        return {"type": type(index).__name__, "open_seconds": open_s, "base": base, "opened": opened, "runs": rows}


SETTINGS = {
    "exact": [{}],
    "hnsw": [{"ef_search": 64}, {"ef_search": 128}],
    "ivfpq": [{"nprobe": p, "rerank": r} for p in (16, 32, 64) for r in (0, 100)],
    "milvus": [{"ef": 64}, {"ef": 128}],
}


def settings_for(kind: str, nprobes: str | None) -> list[dict]:
    """The search settings served: ``--nprobes 32,96,default`` replaces IVF-PQ's probes (``default``:
    what the build chose, ``choose_params``), each with and without re-ranking."""
    if kind != "ivfpq" or not nprobes:
        return SETTINGS[kind]
    probes = [None if p == "default" else int(p) for p in nprobes.split(",") if p]
    return [({} if p is None else {"nprobe": p}) | {"rerank": r} for p in probes for r in (0, 100)]


def _child(phase: str, kind: str, work: Path, threads: int, params: str | None = None,
           nprobes: str | None = None, two_level: int = 0) -> dict:
    env = dict(os.environ, RIS_FAISS_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--phase", phase, "--kind", kind, "--workdir", str(work)]
    if params:
        cmd += ["--ivfpq-params", params]
    if nprobes:
        cmd += ["--nprobes", nprobes]
    if two_level:
        cmd += ["--two-level", str(two_level)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:], "seconds": time.perf_counter() - t0}
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines()[-3:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (database rows) (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="dimensions of each vector (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200,
                   help="held-out queries timed one at a time and scored against the exact top 10 "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and queries (default: %(default)s)")
    p.add_argument("--kinds", default="exact,hnsw,ivfpq,milvus",
                   help="comma-separated index kinds measured, in this order (default: %(default)s)")
    p.add_argument("--workdir", default="/tmp/ris-index-bench",
                   help="folder for the database, queries, ground truth and saved indexes; the data is reused "
                        "by later runs with the same --n, --dim, --seed and --queries (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="faiss threads (RIS_FAISS_THREADS)")
    p.add_argument("--keep-indexes", action="store_true", help="reuse indexes a previous run saved")
    p.add_argument("--ivfpq-params", default=None, metavar="FIELD=VALUE,...",
                   help="override IvfPqParams fields for the ivfpq build, e.g. m=96 or m=128,nbits=4,fastscan=1")
    p.add_argument("--nprobes", default=None, metavar="N,...",
                   help="ivfpq: probes served (integers, or 'default': the build's choice), each with and without "
                        "re-ranking (default: 16,32,64)")
    p.add_argument("--two-level", type=int, default=0, metavar="K1",
                   help="ivfpq, bench-side: train the coarse cells by a two-level k-means (K1 groups, then the "
                        "cells split over them by size) instead of one k-means of nlist centroids (default: off)")
    p.add_argument("--json", default=None, help="also write the results here as JSON (rewritten after every kind)")
    p.add_argument("--phase", choices=["build", "serve"], help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    try:
        overrides = parse_params(args.ivfpq_params)
    except ValueError as exc:
        p.error(str(exc))
    if args.phase:  # child process
        r = phase_build(args.kind, work, overrides, args.two_level) if args.phase == "build" else phase_serve(args.kind, work, settings_for(args.kind, args.nprobes))
        print(json.dumps(r, default=float))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
            "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version(),
            "load_avg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"data: N={args.n} dim={args.dim} in {work}", file=sys.stderr, flush=True)
    info["data"] = make_database(work, args.n, args.dim, args.seed, args.queries)
    info["kinds"] = {}
    for kind in args.kinds.split(","):
        if not args.keep_indexes:
            for f in index_files(kind, work):
                f.unlink()
            if kind == "milvus" and (work / "feats.milvus.db").exists():
                shutil.rmtree(work / "feats.milvus.db")
        print(f"[{kind}] build ...", file=sys.stderr, flush=True)
        build = _child("build", kind, work, args.threads, args.ivfpq_params, two_level=args.two_level) if kind != "exact" else {"build_seconds": 0.0}
        print(f"[{kind}] {build}", file=sys.stderr, flush=True)
        serve = _child("serve", kind, work, args.threads, nprobes=args.nprobes)
        info["kinds"][kind] = {"build": build, "serve": serve}
        print(f"[{kind}] {json.dumps(serve)[:600]}", file=sys.stderr, flush=True)
        if args.json:  # after every kind: a later crash keeps what was measured
            Path(args.json).write_text(json.dumps(info, indent=1, default=float))
    info["load_avg_end"] = os.getloadavg()
    print(table(info))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1, default=float))
    return 0


def table(info: dict) -> str:
    lines = [f"N={info['args']['n']} dim={info['args']['dim']} queries={info['args']['queries']} "
             f"load avg {info['load_avg_start'][0]:.1f} -> {info.get('load_avg_end', [float('nan')])[0]:.1f}",
             "| kind | settings | build s | build peak RSS MB | index on disk MB | index RAM MB (anon + file) "
             "| p50 ms | p95 ms | recall@10 | 1-recall@10 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in info["kinds"].items():
        b, s = r["build"], r["serve"]
        if "error" in s or "error" in b:
            lines.append(f"| {kind} | error | | | | | | | | {(s.get('error') or b.get('error'))[-200:]!r} |")
            continue
        for run in s["runs"]:
            anon = run["after_anon_mb"] - s["base"]["anon_mb"]
            file_ = run["after_file_mb"] - s["base"]["file_mb"]
            lines.append(f"| {kind} | {json.dumps(run['settings'])} | {b.get('build_seconds', 0):.0f} | "
                         f"{b.get('hwm_mb', 0):.0f} | {b.get('index_bytes', 0) / 2**20:.0f} | "
                         f"{anon + file_:.0f} ({anon:.0f} + {file_:.0f}) | {run['p50_ms']:.2f} | {run['p95_ms']:.2f} | "
                         f"{run['recall_at_10']:.3f} | {run.get('r1_at_10', float('nan')):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
