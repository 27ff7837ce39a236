"""Peak memory of ris-extract's decode stage on large PNGs: 2 and 6 workers, with and without the budget.

Why: decoding holds every image in flight at full size, so memory grew with the worker count (six
169-MP PNGs: 2.8 GB with 2 workers, 6.7 GB with 6). ``iter_decoded`` now also holds submission by
a budget of decode bytes (RIS_DECODE_BUDGET, default 1 GiB). This measures both, each run in a
fresh process: its VmHWM (peak RSS) minus its RSS after imports, over the decode of every image.
"No budget" passes a budget too large to bind, which is the file-count-only behaviour of before.

    python bench/decode_memory.py                      # 6 PNGs of 8000 x 8000 (64 MP), ~1 min on 2 cores
    python bench/decode_memory.py --side 13000         # the 169-MP case of the report (slower)
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
NO_BUDGET = 1 << 62


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, workers: int, budget: int, size: int) -> None:
    import cv2  # noqa: F401 - imported before the baseline is taken: not decode memory
    from PIL import Image  # noqa: F401

    from ris.decoding import iter_decoded
    from ris.images import find_images

    files = find_images(folder)
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    errors = [err for _, img, err in iter_decoded(Path(folder), files, size, workers, prefetch=128, budget=budget)
              if err]
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM"), "seconds": time.perf_counter() - t0,
                      "images": len(files), "errors": errors}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8000, help="PNG width and height in pixels")
    ap.add_argument("--images", type=int, default=6,
                    help="PNGs decoded per run (hard links to one generated file) (default: %(default)s)")
    ap.add_argument("--workers", default="2,6",
                    help="comma-separated decode worker counts; each is run with and without the budget "
                         "(default: %(default)s)")
    ap.add_argument("--size", type=int, default=224, help="model input size the images are resized to")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "WORKERS", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.size)
        return
    sys.path.insert(0, str(ROOT))
    from ris.decoding import decode_budget
    from ris.images import DECODE_BYTES_PER_PIXEL
    from ris.testing import make_large_png

    budget = decode_budget()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = make_large_png(Path(tmp) / "big00.png", args.side, args.side)
        for i in range(1, args.images):
            os.link(first, Path(tmp) / f"big{i:02d}.png")
        mp = args.side * args.side / 1e6
        print(f"{args.images} PNGs of {args.side}x{args.side} ({mp:.0f} MP, {mp * 3:.0f} MB as RGB, "
              f"{first.stat().st_size / 1e6:.1f} MB on disk); each counts {mp * DECODE_BYTES_PER_PIXEL:.0f} MB "
              f"of the {budget / 2**20:.0f} MiB budget; load average {os.getloadavg()[0]:.1f}")
        for workers in [int(w) for w in args.workers.split(",")]:
            for label, b in (("no budget", NO_BUDGET), (f"budget {budget / 2**20:.0f} MiB", budget)):
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", tmp,
                                      str(workers), str(b)], capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(workers=workers, budget=label, decode_mb=r["peak_mb"] - r["base_mb"])
                rows.append(r)
                print(f"workers {workers}, {label:>15}: peak RSS {r['peak_mb']:7.0f} MB "
                      f"(decode stage {r['decode_mb']:6.0f} MB over {r['base_mb']:.0f} MB after imports), "
                      f"{r['seconds']:.1f} s, {len(r['errors'])} errors", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"side": args.side, "images": args.images, "rows": rows,
                                               "loadavg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
