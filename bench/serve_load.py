"""ris-serve under load, on loopback: latency percentiles, requests/s, errors and peak RSS.

The database: the first ``--images`` UKBench images (../shared/data/ukbench1000; the demo's
synthetic collection when absent) with MobileNetV2 GAP features, grown to ``--rows`` rows by
appending synthetic vectors (real rows + Gaussian noise, rectified and L2-normalised, like pooled
ReLU features), searched through a learned-whitening head of 256 dimensions (the kind of head
``ris-train`` makes by default; fixed settings here, no cross-validation). Set-up files are kept
in ``--workdir`` and reused, so only the first run pays for extraction.

Measured: (1) in process, ``SearchEngine.search(path)`` (decode + CNN + search) and
``search_row`` for the same queries the HTTP clients send; (2) the real server (``ris-serve`` in
a subprocess, uvicorn) under 1, 4 and 16 concurrent clients (threads, one keep-alive connection
each) for search-by-upload and search-by-id. HTTP overhead = HTTP p50 at concurrency 1 minus the
in-process p50 of the same queries.

    python bench/serve_load.py --workdir /tmp/serve_load --json /tmp/serve_load/result.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukbench1000"
K = 10


def build(workdir: Path, images: int, rows: int, log) -> tuple[Path, Path, list[Path]]:
    """(database with ``rows`` rows, head, query files): made once, then reused."""
    from ris.demo import offline_backbone
    from ris.extract import ExtractConfig, ExtractOptions, extract_features
    from ris.train import TrainConfig, train_head

    workdir.mkdir(parents=True, exist_ok=True)
    data, real = workdir / "images", workdir / "real.h5"
    if not real.exists():
        if (SHARED / "groundtruth.tsv").is_file():
            data.mkdir(exist_ok=True)
            for i in range(images):
                shutil.copy(SHARED / f"ukbench{i:05d}.jpg", data)
        else:
            from ris.demo_data import make_demo_dataset

            make_demo_dataset(data)
        log(f"extracting {data} -> {real}")
        extract_features(data, real, ExtractConfig(model=offline_backbone(), pooling="gap"),
                         ExtractOptions(labels="ukbench", progress=False, log=log))
    head = workdir / "head.keras"
    if not head.exists():
        log(f"fitting learned whitening (256 dims) -> {head}")
        train_head(real, head, TrainConfig(whiten_shrinkage=0.1, whiten_power=0.5, whiten_dim=256),
                   progress=False, log=log)
    big = workdir / f"grown-{rows}.h5"
    if not big.exists():
        grow(real, big, rows, log)
    return big, head, sorted(data.glob("*.jpg"))


def grow(real: Path, big: Path, rows: int, log) -> None:
    from ris.featuredb import FeatureDB
    from ris.featurewriter import FeatureWriter
    from ris.topk import l2_normalize

    with FeatureDB(real) as db:
        base = np.asarray(db.features[:], np.float32)
        attrs, names = dict(db.attrs), db.label_names
    need = rows - len(base)
    log(f"appending {need:,} synthetic rows -> {big}")
    shutil.copyfile(real, big)
    w = FeatureWriter(big, attrs, base.shape[1:], names, append=True)
    rng = np.random.default_rng(0)
    for start in range(0, need, 20000):
        n = min(20000, need - start)
        src = base[rng.integers(0, len(base), n)]
        x = l2_normalize(np.maximum(src + rng.normal(0, 0.02, src.shape).astype(np.float32), 0))
        w.add([f"synthetic/{start + i:06d}.jpg" for i in range(n)], x, [""] * n)
    w.finish()


def in_process(big: Path, head: Path, queries: list[Path], rows: list[int], repeat: int) -> dict:
    from ris.search import SearchEngine

    engine = SearchEngine(big, head)
    for q in queries[:3]:
        engine.search(q, K)
    up = []
    for q in (queries * repeat)[: max(len(queries), 30)]:
        t = time.perf_counter()
        engine.search(q, K)
        up.append((time.perf_counter() - t) * 1e3)
    by_id = []
    for r in rows:
        t = time.perf_counter()
        engine.search_row(r, K)
        by_id.append((time.perf_counter() - t) * 1e3)
    return {"upload_p50_ms": float(np.median(up)), "id_p50_ms": float(np.median(by_id)), "n": len(up)}


def multipart(path: Path) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{K}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def load(host: str, port: int, make_request, total: int, concurrency: int) -> dict:
    """``total`` requests from ``concurrency`` threads; latencies (ms) of the 200s, other outcomes."""
    lock, counter = threading.Lock(), iter(range(total))
    lat, errors, http_ms = [], {}, []

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            method, url, body, headers = make_request(i)
            t = time.perf_counter()
            try:
                conn.request(method, url, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except Exception as exc:  # noqa: BLE001  (counted, not raised: that is the measurement)
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            ms = (time.perf_counter() - t) * 1e3
            with lock:
                if status == 200:
                    lat.append(ms)
                    timing = json.loads(data)["timing_ms"]  # the server's own compute time
                    http_ms.append(ms - timing["total"] - timing.get("queue", 0))
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {"concurrency": concurrency, "requests": total, "ok": len(lat), "errors": errors,
            "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "rps": total / wall, "seconds": wall,
            "outside_compute_p50_ms": float(np.median(http_ms)) if http_ms else None}


def proc_status(pid: int, key: str) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ris-serve-load", help="set-up files, reused between runs")
    p.add_argument("--images", type=int, default=200, help="real UKBench images in the database")
    p.add_argument("--rows", type=int, default=100_000, help="database rows after appending synthetic vectors")
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated counts of concurrent HTTP clients (threads, one keep-alive "
                        "connection each); each level is measured (default: %(default)s)")
    p.add_argument("--upload-requests", type=int, default=48, help="search-by-upload requests per concurrency")
    p.add_argument("--id-requests", type=int, default=120, help="search-by-id requests per concurrency")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    big, head, files = build(Path(args.workdir), args.images, args.rows, log)
    queries = files[:: max(1, len(files) // 16)][:16]
    rng = np.random.default_rng(1)
    rows = [int(r) for r in rng.integers(0, args.rows, 64)]
    info = {"args": vars(args), "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "load_avg_start": os.getloadavg()}
    log("in-process baseline")
    info["in_process"] = in_process(big, head, queries, rows, repeat=2)

    from ris.serve.process import ServerProcess

    bodies = [multipart(q) for q in queries]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    with ServerProcess(["--features-db", str(big), "--model", str(head), "--port", "0", "--queue", "64"]) as server:
        host, port = server.url[len("http://"):].rsplit(":", 1)
        info["rss_after_load_mb"] = proc_status(server.pid, "VmRSS")
        upload = lambda i: ("POST", "/api/search", bodies[i % len(bodies)][0],  # noqa: E731
                            {"Content-Type": bodies[i % len(bodies)][1]})
        by_id = lambda i: ("GET", f"/api/search?id={rows[i % len(rows)]}&k={K}", None, {})  # noqa: E731
        load(host, int(port), upload, len(bodies), 1)  # warm-up: every query once
        load(host, int(port), by_id, len(rows), 1)
        for name, fn, n in (("upload", upload, args.upload_requests), ("id", by_id, args.id_requests)):
            for c in levels:
                r = load(host, int(port), fn, n, c)
                r["kind"] = name
                results.append(r)
                log(f"{name} c={c}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f}, {r['rps']:.1f} req/s, "
                    f"errors {r['errors'] or 0}")
        info["server_peak_rss_mb"] = proc_status(server.pid, "VmHWM")
        alive = server.proc.poll() is None
    info.update(results=results, server_survived=alive, server_exit=server.proc.returncode,
                load_avg_end=os.getloadavg())
    base = info["in_process"]
    c1 = {r["kind"]: r for r in results if r["concurrency"] == 1}
    info["http_overhead"] = {k: {"http_p50_ms": c1[k]["p50_ms"], "in_process_p50_ms": base[f"{k}_p50_ms"],
                                 "overhead_ms": c1[k]["p50_ms"] - base[f"{k}_p50_ms"],
                                 "overhead_pct": 100 * (c1[k]["p50_ms"] / base[f"{k}_p50_ms"] - 1),
                                 "outside_compute_p50_ms": c1[k]["outside_compute_p50_ms"]}
                             for k in c1}
    print(f"\n{args.rows:,} rows, k={K}, {info['cpus']} cpus, load avg {info['load_avg_start'][0]:.1f} -> "
          f"{info['load_avg_end'][0]:.1f}; server peak RSS {info['server_peak_rss_mb']:.0f} MB; "
          f"exit {info['server_exit']}")
    print("| search | concurrency | requests | errors | p50 ms | p95 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'by upload' if r['kind'] == 'upload' else 'by id'} | {r['concurrency']} | {r['requests']} | "
              f"{sum(r['errors'].values())} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['rps']:.1f} |")
    for k, o in info["http_overhead"].items():
        print(f"{k}: in-process p50 {o['in_process_p50_ms']:.1f} ms, HTTP p50 {o['http_p50_ms']:.1f} ms, "
              f"overhead {o['overhead_ms']:.1f} ms ({o['overhead_pct']:.0f}%); client latency minus the "
              f"server's compute time, p50 {o['outside_compute_p50_ms']:.1f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
