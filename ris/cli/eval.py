"""ris-eval: UKBench N-S score, top-4 %, mAP, recall@k for raw features and a trained head."""
from __future__ import annotations

import argparse
import sys

from ris.cli.common import (EXIT_OK, EXIT_PARTIAL, HelpFormatter, folds, fraction, nonnegative_int, ns_threshold,
                            print_json, run)


def build_parser() -> argparse.ArgumentParser:
    from ris.rerank import RERANKERS
    from ris.verify import SETTINGS_HELP as VERIFY_SETTINGS_HELP
    from ris.verify import parse_settings as verify_settings
    from ris.index import index_arg, index_help, index_metavar

    p = argparse.ArgumentParser(
        prog="ris-eval",
        description="Score retrieval on a labelled feature database: every image of the split queries all "
                    "images of the database (--gallery all; --gallery split: only each other). N-S counts the query itself (perfect 4.0 on UKBench); mAP, recall@k "
                    "and precision@10 exclude it. A query with no other image of its group in the split has "
                    "nothing to find: no metric scores it (N-S, top-4, mAP, R@k, P@k alike), and their number "
                    "is reported (queries_without_relevant). With --model, the trained head is scored on the "
                    "same queries as the off-the-shelf features: its held-out objects, or every labelled image of a "
                    "collection it never saw; its training images are never scored as held-out queries.",
        formatter_class=HelpFormatter)
    p.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    p.add_argument("--model", default=None, help="trained head (.keras from ris-train); its stored split is used")
    p.add_argument("--split", default=None, choices=["test", "all"],
                   help="objects to score: 'test' = held-out objects, 'all' = every labelled image "
                        "(default: test with --model, all without)")
    p.add_argument("--gallery", default="all", choices=["all", "split"],
                   help="what the scored queries search: 'all' = every labelled image of the database (the "
                        "whole-collection protocol; a head's training images stay in it: for a head trained by "
                        "object, of other objects, distractors; for one trained with ris-train --split-by image, "
                        "of the query's own class too, relevant), 'split' = only each other "
                        "(the fold protocol: fewer distractors, higher scores)")
    p.add_argument("--queries", default=None, metavar="FILE",
                   help="score only these queries: one image id per line (path relative to the dataset folder, "
                        "as in the database; each once: a repeated id is refused); every other image is gallery only, unlabelled ones as distractors "
                        "(Holidays/Oxford style); reports mAP and recall@k; not with --gallery split or --split test")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="split seed when no --model gives the split")
    p.add_argument("--test-fraction", type=fraction, default=0.2, help="held-out share of objects when no --model")
    p.add_argument("--folds", type=folds, default=0,
                   help="k-fold over objects: score the off-the-shelf features on each fold's held-out objects "
                        "(the folds of ris-train --folds, same seed) and report mean and std; not with --model, "
                        "--queries, --verify or --split")
    p.add_argument("--split-by", default="object", choices=["object", "image"],
                   help="with --folds: hold out whole objects (classes) per fold, or each class's images, as "
                        "ris-train --folds --split-by does")
    p.add_argument("--rerank", default="none", choices=list(RERANKERS),
                   help="re-rank results: " + "; ".join(f"{name} = {m.help}" for name, m in RERANKERS.items()))
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="geometric verification: re-rank each query's top K with RootSIFT + RANSAC inliers "
                        "(ris.verify; local features built from the images on first use and kept beside the "
                        "database); 0 = off")
    p.add_argument("--verify-settings", type=verify_settings, default={}, metavar="KEY=VALUE[,...]",
                   help=VERIFY_SETTINGS_HELP)
    p.add_argument("--rotations", action="store_true",
                   help="describe every scored query again from its image file (under the database's dataset "
                        "folder) at 0/90/180/270 degrees, as ris-search --rotations does; each gallery image keeps "
                        "its best score. 4 forward passes per scored query; --rerank none, qe or dba+qe; not with "
                        "--verify, --index or --folds")
    from ris import presets

    presets.add_argument(p, "eval")
    p.add_argument("--index", default=None, type=index_arg, metavar=index_metavar(),
                   help="also score retrieval through this index (the one ris-search uses, built or caught up "
                        "as there), beside exact search on the same queries, gallery (--split, --gallery, "
                        "--queries) and ranked-list depth (100); not with --rerank, --verify or --folds; "
                        "kinds: " + index_help())
    p.add_argument("--min-ns", type=ns_threshold, default=None,
                   help="exit with status 1 (a requested check failed) if the best N-S score is below this "
                        "(for CI); errors exit 2")
    p.add_argument("--json", action="store_true", help="print the scores as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    from ris import presets

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = presets.apply(parser.parse_args(argv), parser, "eval", argv)
    from ris.evaluate import evaluate_db, format_table

    _refuse_ignored(args)
    presets.warn_other_recipe("ris-eval", args.preset, args.features_db)
    if args.model is not None:  # a history CSV/PNG a killed ris-train left from an earlier run
        from ris.train_report import stale_report

        stale = stale_report(args.model)
        if stale:
            print(f"ris-eval: warning: {stale}", file=sys.stderr)
    if args.index is not None:
        from ris.index_eval import evaluate_index, format_index_table

        r = evaluate_index(args.features_db, args.index, args.model, args.split, args.seed, args.test_fraction,
                           gallery=args.gallery, queries=args.queries)
        print_json(r) if args.json else print(format_index_table(r))
        if args.min_ns is not None and r["indexed"]["ns_score"] < args.min_ns:
            print(_below(r["indexed"]["ns_score"], args.min_ns, r["indexed"].get("ns_perfect", 4.0)), file=sys.stderr)
            return 1
        return 0
    if args.folds and args.folds > 1:
        from ris.evaluate import evaluate_folds

        r = evaluate_folds(args.features_db, args.folds, args.seed, args.rerank, split_by=args.split_by,
                           gallery=args.gallery)
        if args.json:
            print_json(r)
        else:
            s = r["summary"]
            from ris.evaluate import recipe_line

            print(f"{args.features_db}: {recipe_line(r)}, rerank {r['rerank']}; {args.folds} folds of held-out "
                  f"{'objects' if args.split_by == 'object' else 'images of every class'} (seed {args.seed}), "
                  "searching "
                  + ("the whole collection" if args.gallery == "all" else "only their fold"))
            print("  ".join(f"{k} {v['mean']:.4f} +- {v['std']:.4f}" for k, v in s.items()))
            if r["ns_perfect"] < 4.0:  # groups smaller than 4: the folds' N-S is read against this, not 4.0
                from ris.metrics import ns_note

                print(f"{ns_note(r['ns_perfect'])} (mean over the folds)")
        best = r["summary"]["ns_score"]["mean"]
        if args.min_ns is not None and best < args.min_ns:
            print(_below(best, args.min_ns, r["ns_perfect"]), file=sys.stderr)
            return EXIT_PARTIAL
        return EXIT_OK
    split = args.split or ("test" if args.model else "all")
    result = evaluate_db(args.features_db, args.model, split, seed=args.seed, test_fraction=args.test_fraction,
                         rerank=args.rerank, gallery=args.gallery, queries=args.queries,
                         verify={"k": args.verify, **args.verify_settings} if args.verify > 0 else None,
                         rotations=args.rotations)
    if args.json:
        print_json(result)
    else:
        print(format_table(result))
    if args.min_ns is not None:
        best = max(result[k]["ns_score"] for k in ("raw", "head") if k in result)
        if best < args.min_ns:
            print(_below(best, args.min_ns, result["raw"].get("ns_perfect", 4.0)), file=sys.stderr)
            return EXIT_PARTIAL
    return EXIT_OK


def _below(ns: float, required: float, perfect: float) -> str:
    """The --min-ns failure line; where groups are smaller than 4 it says what a perfect search
    scores, so a threshold no search can reach is not read as a poor search."""
    return (f"ris-eval: N-S {ns:.4f} is below the required {required}"
            + (f" (a perfect search scores {perfect:.4f} on these groups: some have fewer than 4 images)"
               if perfect < 4.0 else ""))


def _refuse_ignored(args: argparse.Namespace) -> None:
    """One line for options another option would make ris-eval ignore: a score that silently
    leaves out what was asked for is a wrong result."""
    from ris.errors import RisError

    folds = bool(args.folds and args.folds > 1)
    preset = f" (from --preset {args.preset})" if args.preset else ""
    rules = [
        ("--rotations", args.rotations, [("--index", args.index is not None), ("--folds", folds)],
         "it scores one split by exact search"),
        ("--index", args.index is not None,
         [(f"--rerank {args.rerank}{preset}", args.rerank != "none"), ("--verify", args.verify > 0),
          ("--folds", folds)],
         "it scores the index's own ranked lists beside exact search's, with no re-ranking"),
        ("--folds", folds,
         [("--model", args.model is not None), ("--queries", args.queries is not None), ("--verify", args.verify > 0),
          (f"--split {args.split}", args.split is not None)],
         "it scores the off-the-shelf features on each fold's held-out objects"),
        ("--queries", args.queries is not None,
         [("--gallery split", args.gallery == "split"), (f"--split {args.split}", args.split == "test")],
         "the listed queries search every other image of the database"),
    ]
    for flag, given, others, why in rules:
        clash = [name for name, on in others if on]
        if given and clash:
            raise RisError(f"{flag} cannot be combined with {' and '.join(clash)} ({why})")
    # the seed draws the held-out objects of --split test (without --model) and the folds of --folds;
    # the test fraction only the former. Anywhere else they would be ignored while the report
    # read as if they had been used
    if args.split_by != "object" and not folds:
        raise RisError("--split-by image needs --folds (it chooses how each fold holds out images)")
    own_split = args.model is None and args.queries is None and args.split == "test"
    for flag, given, used in (("--seed", args.seed != 0, own_split or folds),
                              ("--test-fraction", args.test_fraction != 0.2, own_split)):
        if given and not used:
            scored = ("the model's own held-out split" if args.model is not None else
                      "the --queries list" if args.queries is not None else
                      "k folds of 1/k each" if folds else "every labelled image (--split all)")
            folds_too = " and the folds of --folds" if flag == "--seed" else ""
            raise RisError(f"{flag} would be ignored: ris-eval scores {scored} here; it chooses the held-out "
                           f"objects of --split test without --model{folds_too}")


def entry() -> None:
    sys.exit(run("ris-eval", main))


if __name__ == "__main__":
    entry()
