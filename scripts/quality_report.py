"""Build bench/quality.md: one row per configuration, each with the exact command that makes it.

Protocol (stated in the report):
- UKBench-1000: 5 folds over the 250 objects (seed 0). Each fold's 50 objects are held out from
  training and from every choice; its 200 images query each other (closed set). N-S counts the
  query (perfect 4.0). Triplet heads choose their epoch on 10% validation objects taken from the
  training side; learned whitening has no epochs: it is fitted on the training and validation
  objects, its settings chosen by 3-fold cross-validation over them. Mean +- std over folds, plus
  the paired difference head - raw per fold.
- Corel-1k: images split 50/50 inside every class (seed 0); the 500 test images query each other;
  mAP and precision@10 exclude the query. With --unseen-classes 2, two classes give no training
  image; all their images are queries, also scored alone.

    python scripts/quality_report.py --runs /tmp/ris-quality --out bench/quality.md

Feature databases are extracted into --runs (skipped when present); the UKBench and Corel folders
default to ../shared/data beside the checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

DESCRIPTORS = [  # (model, pooling, size, scales)
    ("mobilenet_v2", "gap", 224, "1"),
    ("mobilenet_v2", "mac", 224, "1"),
    ("mobilenet_v2", "gem", 224, "1"),
    ("mobilenet_v2", "rmac", 224, "1"),
    ("mobilenet_v2", "gap", 320, "1"),
    ("mobilenet_v2", "gem", 320, "1,0.707,0.5"),
    ("efficientnet_lite0", "gap", 224, "1"),
    ("efficientnet_lite1", "gap", 240, "1"),
    ("efficientnet_lite2", "gap", 260, "1"),
    ("efficientnet_lite2", "gem", 260, "1"),
    ("efficientnet_lite2", "gem", 384, "1,0.707,0.5"),
]
HEADS = [  # (label, ris-train flags)
    ("blog: MLP 512-512-256, random triplets", ["--arch", "mlp", "--mining", "random"]),
    ("MLP 512-512-256, batch-hard", ["--arch", "mlp", "--mining", "batch-hard"]),
    ("residual, random triplets", ["--arch", "residual", "--mining", "random"]),
    ("residual, batch-hard", ["--arch", "residual", "--mining", "batch-hard"]),
    ("residual, semi-hard", ["--arch", "residual", "--mining", "semi-hard"]),
    ("residual, batch-all", ["--arch", "residual", "--mining", "batch-all"]),
    ("residual, batch-hard, cosine, margin 0.1", ["--arch", "residual", "--distance", "cosine", "--margin", "0.1"]),
    ("learned whitening, settings by inner cross-validation (default)", ["--arch", "whiten"]),
    ("residual, batch-hard + shallow CNN on 32 px thumbnails", ["--arch", "residual", "--shallow", "32"]),
]
RERANKS = ["qe", "dba+qe", "diffusion", "kreciprocal"]
FINDINGS = open(Path(__file__).with_name("quality_findings.md")).read().strip() \
    if Path(__file__).with_name("quality_findings.md").exists() else ""


def db_name(ds: str, model: str, pool: str, size: int, scales: str) -> str:
    return f"{ds}-{model}-{pool}-{size}-{scales.replace(',', '_')}.h5"


def extract_cmd(src: Path, db: Path, model: str, pool: str, size: int, scales: str) -> str:
    return (f"ris-extract --dataset {src} --features-db {db.name} --model {model} --pool {pool} "
            f"--resize {size} --scales {scales}")


def ensure_db(src: Path, db: Path, model: str, pool: str, size: int, scales: str) -> float | None:
    """Extract if missing; returns images/s (from the database, or this run)."""
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.featuredb import FeatureDB

    if not db.exists():
        cfg = ExtractConfig(model=model, pooling=pool, input_size=size,
                            scales=tuple(float(s) for s in scales.split(",")))
        extract_features(src, db, cfg, ExtractOptions(progress=False))
    with FeatureDB(db) as f:
        ips = f.attrs.get("images_per_second")
        n = len(f)
    if ips is None:  # made by an earlier run: its wall time (TF start-up included) is in extract.log
        log = db.parent / "extract.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == db.name and parts[2] == "s":
                return n / float(parts[1])
    return float(ips) if ips is not None else None


def ms(v: dict) -> str:
    return f"{v['mean']:.3f} +- {v['std']:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="/tmp/ris-quality", help="folder for feature databases and models")
    p.add_argument("--ukbench", default=str(SHARED / "ukbench1000"), help="UKBench-1000 folder")
    p.add_argument("--corel", default=str(SHARED / "corel1k"), help="Corel-1k folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "quality.md"), help="markdown report to write")
    p.add_argument("--quick", action="store_true", help="2 descriptors, 3 heads (a smoke run)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite --out from the JSON beside it (e.g. after editing quality_findings.md)")
    args = p.parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).write_text(render(report))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from ris.evaluate import evaluate_folds
    from ris.kfold import summarize_folds, train_folds
    from ris.train import train_head

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    uk, corel = Path(args.ukbench), Path(args.corel)
    descriptors = DESCRIPTORS[:1] + DESCRIPTORS[-1:] if args.quick else DESCRIPTORS
    heads = HEADS[:1] + HEADS[3:4] + HEADS[-1:] if args.quick else HEADS
    report: dict = {"descriptors": [], "heads": [], "rerank": [], "corel_heads": []}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    # 1. descriptors, off the shelf
    best = None
    for model, pool, size, scales in descriptors:
        row = {"model": model, "pooling": pool, "size": size, "scales": scales}
        for ds, src in (("uk", uk), ("corel", corel)):
            db = runs / db_name(ds, model, pool, size, scales)
            row[f"{ds}_ips"] = ensure_db(src, db, model, pool, size, scales)
            row[f"{ds}_extract"] = extract_cmd(src, db, model, pool, size, scales)
        ukdb = runs / db_name("uk", model, pool, size, scales)
        r = evaluate_folds(ukdb, 5, gallery="split")  # the fold protocol: each fold searches itself
        row["uk"] = r["summary"]
        row["uk_eval"] = f"ris-eval --features-db {ukdb.name} --folds 5 --gallery split"
        c = _corel_raw(runs / db_name("corel", model, pool, size, scales))
        row["corel"] = c
        report["descriptors"].append(row)
        log(f"{model} {pool} {size} {scales}: UK {ms(r['summary']['ns_score'])}, Corel mAP {c['map']:.3f}")
        if best is None or r["summary"]["ns_score"]["mean"] > best[1]:
            best = ((model, pool, size, scales), r["summary"]["ns_score"]["mean"])
    baseline = descriptors[0]
    chosen = [baseline] + ([best[0]] if best[0] != baseline else [])

    # 2. heads, 5-fold on UKBench, for the baseline and the best descriptor
    for desc in chosen:
        ukdb = runs / db_name("uk", *desc)
        for label, flags in heads:
            t = time.perf_counter()
            results = train_folds(ukdb, runs / "models" / f"{ukdb.stem}-{_slug(label)}.keras", _cfg(flags), 5,
                                  progress=False, log=lambda s: None)
            summary = summarize_folds(results)
            report["heads"].append({
                "descriptor": desc, "head": label, "summary": summary,
                "delta_ns": summary["delta"]["ns_score"], "delta_map": summary["delta"]["map"],
                "seconds_per_epoch": (round(float(np.mean(per_epoch)), 3) if (per_epoch := [
                    r.seconds_per_epoch for r in results if r.seconds_per_epoch is not None]) else None),
                "seconds": round(time.perf_counter() - t, 1),
                "command": f"ris-train --features-db {ukdb.name} --folds 5 " + " ".join(flags)})
            log(f"  head {label}: {ms(summary['head']['ns_score'])} (raw {ms(summary['raw']['ns_score'])}), "
                f"delta {summary['delta']['ns_score']['mean']:+.4f}")

    # 3. re-ranking of the off-the-shelf descriptor
    for desc in chosen:
        ukdb = runs / db_name("uk", *desc)
        cdb = runs / db_name("corel", *desc)
        for method in RERANKS:
            r = evaluate_folds(ukdb, 5, rerank=method, gallery="split")
            c = _corel_raw(cdb, method)
            report["rerank"].append({"descriptor": desc, "rerank": method, "uk": r["summary"], "corel": c,
                                     "command": f"ris-eval --features-db {ukdb.name} --folds 5 --gallery split --rerank {method}"})
            log(f"  rerank {method}: UK {ms(r['summary']['ns_score'])}, Corel mAP {c['map']:.3f}")

    # 4. Corel heads: all classes seen, and two classes unseen
    for desc in chosen:
        cdb = runs / db_name("corel", *desc)
        for arch in ("whiten", "residual"):
            for unseen in (0, 2):
                flags = ["--arch", arch, "--split-by", "image", "--test-fraction", "0.5", "--unseen-classes", str(unseen)]
                res = train_head(cdb, runs / "models" / f"{cdb.stem}-{arch}-unseen{unseen}.keras", _cfg(flags),
                                 progress=False, log=lambda s: None)
                report["corel_heads"].append({"descriptor": desc, "head": arch, "unseen_classes": unseen,
                                              "scores": res.scores,
                                              "command": f"ris-train --features-db {cdb.name} " + " ".join(flags)})
                log(f"  corel head {arch} unseen={unseen}: mAP {res.scores['raw']['map']:.3f} -> "
                    f"{res.scores['head']['map']:.3f}")

    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    Path(args.out).write_text(render(report))
    log(f"wrote {args.out}")
    return 0


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:40]


def _cfg(flags: list[str]):
    from ris.cli.train import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["--quiet", *flags]))


def _corel_raw(db: Path, rerank: str = "none") -> dict:
    """Off-the-shelf scores on the Corel test half (the split ris-train --split-by image uses)."""
    from ris.embed import raw_descriptors
    from ris.evaluate import _score
    from ris.featuredb import FeatureDB
    from ris.splits import make_split

    with FeatureDB(db) as f:
        labels = f.labels
        rows, _ = make_split(labels, "image", test_fraction=0.5)
        s = _score(raw_descriptors(f.read_rows(rows["test"])), labels[rows["test"]], rerank)
    return {"map": s["map"], "precision_at_10": s["precision_at"]["10"]}


def render(rep: dict) -> str:
    body = __doc__.split("\n\n    python")[0].split("\n", 1)[1].strip()
    out = ["# Retrieval quality", "", body, "", FINDINGS, ""]
    out += ["Machine: the project's 2-core CPU sandbox (no GPU). img/s is the extraction speed of that run on",
            "2 cores shared with other jobs: compare within the table, not across machines.", ""]
    out += ["## Descriptors, off the shelf", "",
            "| backbone | pooling | size | scales | UKBench N-S (5-fold) | top-4 % | mAP | Corel mAP | Corel P@10 | img/s | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["descriptors"]:
        u = r["uk"]
        ips = f"{r['uk_ips']:.0f}" if r.get("uk_ips") else "-"
        out.append(f"| {r['model']} | {r['pooling']} | {r['size']} | {r['scales']} | {ms(u['ns_score'])} | "
                   f"{u['top4_accuracy']['mean']:.2f} | {u['map']['mean']:.4f} | {r['corel']['map']:.4f} | "
                   f"{r['corel']['precision_at_10']:.4f} | {ips} | `{r['uk_extract']}` then `{r['uk_eval']}` |")
    out += ["", "## Trained heads (UKBench-1000, 5-fold, held-out objects)", "",
            "Delta = head - off-the-shelf on the same fold (paired), mean +- std over folds; \"better\" = folds",
            "where the head's mAP is higher. s/fold = training time per fold (whitening: the inner",
            "cross-validation included).", "",
            "| descriptor | head | off-the-shelf N-S | head N-S | delta N-S | head mAP | delta mAP (better) | s/fold | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["heads"]:
        d, s = r["descriptor"], r["summary"]
        out.append(f"| {d[0]} {d[1]} {d[2]}px x{d[3]} | {r['head']} | {ms(s['raw']['ns_score'])} | "
                   f"{ms(s['head']['ns_score'])} | {r['delta_ns']['mean']:+.4f} +- {r['delta_ns']['std']:.4f} | "
                   f"{ms(s['head']['map'])} | {r['delta_map']['mean']:+.4f} +- {r['delta_map']['std']:.4f} "
                   f"({r['delta_map']['folds_better']}/5) | {r['seconds'] / 5:.0f} | `{r['command']}` |")
    out += ["", "## Re-ranking (off-the-shelf descriptor, no training)", "",
            "| descriptor | re-ranking | UKBench N-S (5-fold) | UKBench mAP | Corel mAP | Corel P@10 | command |",
            "|---|---|---|---|---|---|---|"]
    for r in rep["rerank"]:
        d = r["descriptor"]
        out.append(f"| {d[0]} {d[1]} {d[2]}px x{d[3]} | {r['rerank']} | {ms(r['uk']['ns_score'])} | "
                   f"{ms(r['uk']['map'])} | {r['corel']['map']:.4f} | {r['corel']['precision_at_10']:.4f} | "
                   f"`{r['command']}` |")
    out += ["", "## Corel-1k: trained head, 50 training / 50 test images per class", "",
            "| descriptor | head | classes kept out of training | off-the-shelf mAP | head mAP | head P@10 | unseen-class queries: off-the-shelf / head mAP | command |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rep["corel_heads"]:
        d, s = r["descriptor"], r["scores"]
        un = s.get("unseen_classes")
        uns = f"{un['raw']['map']:.4f} / {un['head']['map']:.4f}" if un else "-"
        out.append(f"| {d[0]} {d[1]} {d[2]}px x{d[3]} | {r.get('head', '')} | {r['unseen_classes']} | {s['raw']['map']:.4f} | "
                   f"{s['head']['map']:.4f} | {s['head']['precision_at']['10']:.4f} | {uns} | `{r['command']}` |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
