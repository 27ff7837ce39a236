"""Real features with real PQ codes: each index kind scored against exact search, UKBench and Corel.

``ris`` trains an IVF-PQ index's codebooks on the database's own rows and only uses PQ codes from
~10,000 rows up (below, 8-bit scalar codes), so UKBench-1000 and Corel-1k alone never exercise
them. Here each collection is split in halves by object / class: the first half (500 photos) is
scored; the second half stays in the gallery unlabelled, with 12 altered copies of each of its
photos (``bench/distractors.py``) and 6 of each photo of the OTHER collection: 13,000 rows, every
distractor a real photo of no scored object or class, half of them from the scored collection's
own kind of pictures (so the codebooks cannot tell queries from distractors by where they come
from). Then, as a user runs them, through ``ris-extract``, ``ris-index build`` and ``ris-eval
--queries Q --index KIND --json``: every scored photo searches the whole database.

    python bench/real_pq_check.py --work /tmp/ris-real-pq [--model mobilenet_v2 | --preset fast] [--json out.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RUNS = [("exact", {}), ("hnsw", {}),
        ("ivfpq", {"--rerank": "100", "--nprobe": "32"}),  # ris's default settings
        ("ivfpq", {"--rerank": "0", "--nprobe": "32"}),
        ("ivfpq", {"--rerank": "0", "--nprobe": "64"})]


def cli(name: str, *args: str) -> str:
    """Run one ris command as a user would (its console script), return its stdout."""
    exe = shutil.which(name)
    cmd = [exe] if exe else [sys.executable, "-c", f"from ris.cli.{name[4:]} import entry; entry()"]
    done = subprocess.run([*cmd, *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"real_pq_check.py: {name} {' '.join(args)} exited {done.returncode}")
    return done.stdout


def halves(dataset: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(file, label) of the first half of the labels (sorted), and the files of the second half."""
    with open(dataset / "groundtruth.tsv", newline="") as fh:
        rows = [r[:2] for r in csv.reader(fh, delimiter="\t")][1:]
    groups = sorted({lab for _, lab in rows}, key=lambda s: (len(s), s))
    first = set(groups[: len(groups) // 2])
    return [(f, lab) for f, lab in rows if lab in first], [f for f, lab in rows if lab not in first]


def prepare(work: Path, name: str, other: str, copies: int, other_copies: int) -> tuple[Path, Path, Path]:
    """The dataset folder, labels and queries for one collection (written once)."""
    from distractors import write_distractors  # bench/ is on sys.path when run as a script

    root = work / name
    images, labels, queries = root / "images", root / "labels.tsv", root / "queries.txt"
    if queries.exists():
        return images, labels, queries
    scored, rest = halves(DATA / name)
    for sub, files in (("scored", [f for f, _ in scored]), ("others", rest)):
        # every photo goes through the copies' processing (size, JPEG) without being altered, so
        # that queries and distractors differ in what they show, not in how they were saved
        write_distractors(DATA / name, images / sub, 1, seed=2, mild=True, files=[DATA / name / f for f in files])
    write_distractors(images / "others", images / "altered-others", copies)
    write_distractors(DATA / other, images / "altered-other-collection", other_copies, seed=1)
    labels.write_text("".join(f"{f}\t{lab}\n" for f, lab in scored))  # matched by file name
    queries.write_text("".join(f"scored/{f}\n" for f, _ in scored))
    return images, labels, queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ris-real-pq"), help="work folder (default: /tmp/ris-real-pq)")
    p.add_argument("--model", default="mobilenet_v2", help="ris-extract --model (default: mobilenet_v2)")
    p.add_argument("--preset", default=None, help="ris-extract --preset instead of --model (fast, accurate)")
    p.add_argument("--copies", type=int, default=12, help="altered copies of each unscored photo (default: 12)")
    p.add_argument("--other-copies", type=int, default=6, help="altered copies of each photo of the other collection (default: 6)")
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    args = p.parse_args()
    results = []
    for name, other in (("ukbench1000", "corel1k"), ("corel1k", "ukbench1000")):
        images, labels, queries = prepare(args.work, name, other, args.copies, args.other_copies)
        recipe = ["--preset", args.preset] if args.preset else ["--model", args.model]
        db = args.work / name / f"{args.preset or args.model}.h5"
        if not db.exists():
            cli("ris-extract", "--dataset", str(images), "--features-db", str(db), *recipe,
                "--labels", str(labels), "--no-progress")
        for kind, settings in RUNS:
            built = None
            if settings:
                built = json.loads(cli("ris-index", "build", "--features-db", str(db), "--index", kind, "--json",
                                       *[a for kv in settings.items() for a in kv]))
            r = json.loads(cli("ris-eval", "--features-db", str(db), "--queries", str(queries), "--index", kind, "--json"))
            r["collection"], r["settings"], r["recipe"] = name, settings, " ".join(recipe)
            r["index_params"] = None if built is None else built.get("params")
            results.append(r)
            ex, ix = r["exact"], r["indexed"]
            print(f"{name:12s} {kind:6s} {' '.join(f'{k} {v}' for k, v in settings.items()):26s} "
                  f"exact N-S {ex['ns_score']:.3f} mAP {ex['map']:.4f} R@1 {ex['recall_at']['1']:.3f} | "
                  f"index N-S {ix['ns_score']:.3f} mAP {ix['map']:.4f} R@1 {ix['recall_at']['1']:.3f} | "
                  f"delta N-S {r['delta']['ns_score']:+.3f} mAP {r['delta']['map']:+.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
