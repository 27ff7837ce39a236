"""ris-train: fit the embedding head (learned whitening or a triplet-loss head) on stored features,
split by object."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ris.cli.common import (EXIT_INTERRUPTED, EXIT_OK, HelpFormatter, auto_or, folds, fraction, given_options,
                            int_at_least, nonnegative_float, nonnegative_int, number_list, positive_float, positive_int,
                            print_json, run)

if TYPE_CHECKING:
    from ris.train import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    from ris.head import DISTANCES, HEADS, MININGS

    p = argparse.ArgumentParser(
        prog="ris-train",
        description="Train an embedding head on a feature database. Objects are split seeded into "
                    "train / val / test; test objects are never used for training or any choice and are "
                    "scored at the end against the raw features. The default head is learned whitening, "
                    "fitted in closed form with its settings chosen by cross-validation over the training "
                    "objects; --arch mlp|residual train Dense heads (shared weights) with triplet loss "
                    "max(0, m + D(q,p) - D(q,n)), the best epoch chosen on the val objects.",
        formatter_class=HelpFormatter)
    p.add_argument("--features-db", default="feats.h5", help="labelled HDF5 feature database from ris-extract")
    p.add_argument("--output", default="model.keras", help="where to save the best head (.keras); history "
                   "CSV and a loss-curve PNG are written beside it")
    p.add_argument("--arch", default="whiten", choices=list(HEADS),
                   help="; ".join(f"{name} = {head.help}" for name, head in HEADS.items()))
    p.add_argument("--whiten-shrinkage", type=auto_or(nonnegative_float), default="auto",
                   help="whiten: multiple of the mean eigenvalue added to the within-object covariance "
                        "(e.g. 0.1 to 3); auto = chosen by 3-fold cross-validation inside the training set")
    p.add_argument("--whiten-power", type=auto_or(positive_float), default="auto",
                   help="whiten: eigenvalue exponent, 0.5 = full whitening, 0.25 = partial; auto = chosen")
    p.add_argument("--whiten-dim", type=auto_or(positive_int), default="auto", help="whiten: output dimensions (256, 512); auto = chosen")
    p.add_argument("--shallow", type=nonnegative_int, default=0, metavar="PX",
                   help="add a shallow CNN branch on PX x PX thumbnails (e.g. 32) for colour and texture, "
                        "beside the deep features (thumbnails are read from the database's image folder)")
    p.add_argument("--hidden", type=number_list(positive_int, allow_empty=True), default="512,512", help="hidden Dense layer sizes, comma-separated ('' = none)")
    p.add_argument("--out-dim", type=positive_int, default=256, help="embedding size (mlp; residual keeps the input size; whiten: see --whiten-dim)")
    p.add_argument("--no-l2", action="store_true", help="do not L2-normalise the embedding")
    p.add_argument("--dropout", type=fraction, default=0.1, help="dropout after each hidden layer")
    p.add_argument("--distance", default="euclidean", choices=DISTANCES, help="D in the loss and for ranking")
    p.add_argument("--margin", type=positive_float, default=0.2, help="triplet margin m")
    p.add_argument("--mining", default="batch-hard", choices=list(MININGS),
                   help="; ".join(f"{name} = {m.help}" for name, m in MININGS.items()))
    p.add_argument("--epochs", type=positive_int, default=60, help="maximum epochs (triplet heads)")
    p.add_argument("--patience", type=positive_int, default=10,
                   help="stop after this many epochs without val N-S gain (triplet heads)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="triplets per batch (random mining)")
    p.add_argument("--p", type=int_at_least(2), default=32, help="objects per P x K batch")
    p.add_argument("--k", type=int_at_least(2), default=4, help="views per object in a P x K batch")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--test-fraction", type=fraction, default=0.2,
                   help="share of objects held out for testing (with --folds: 1/K instead)")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="share of objects for choosing the epoch (triplet heads; learned whitening fits on them too)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split, sampling and initialisation")
    p.add_argument("--split-by", default="object", choices=["object", "image"],
                   help="object = hold out whole objects (UKBench); image = split the images of every class "
                        "(Corel's 50/50 category protocol; use --test-fraction 0.5)")
    p.add_argument("--unseen-classes", type=nonnegative_int, default=0,
                   help="with --split-by image: keep this many classes out of training entirely; all their "
                        "images are held-out queries (as ris-eval --model scores them), also reported separately")
    p.add_argument("--folds", type=folds, default=0, help="K-fold (0 = off, else K >= 2): train one head per "
                   "fold (output gets a .foldN suffix) and report mean and std of held-out scores; the folds "
                   "hold out whole objects, or with --split-by image 1/K of the images of every class")
    p.add_argument("--quiet", action="store_true", help="no progress lines (per epoch; per inner fold of learned whitening)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p


def config_from_args(args) -> "TrainConfig":
    from ris.train import TrainConfig

    return TrainConfig(arch=args.arch, shallow=args.shallow, hidden=tuple(args.hidden), out_dim=args.out_dim, l2_normalize=not args.no_l2, dropout=args.dropout,
                       distance=args.distance, margin=args.margin, mining=args.mining, epochs=args.epochs,
                       batch_size=args.batch_size, p=args.p, k=args.k, learning_rate=args.lr,
                       patience=args.patience, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
                       seed=args.seed, split_by=args.split_by, unseen_classes=args.unseen_classes,
                       whiten_shrinkage=args.whiten_shrinkage, whiten_power=args.whiten_power,
                       whiten_dim=args.whiten_dim)


# Options that set only one kind of head: given for another, they would be silently ignored.
TRIPLET_ONLY = ("hidden", "out_dim", "dropout", "distance", "margin", "mining", "epochs", "patience",
                "batch_size", "p", "k", "lr")
WHITEN_ONLY = ("whiten_shrinkage", "whiten_power", "whiten_dim")


def refuse_unused(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """One line naming the options given (not at their defaults) that the chosen head does not use."""
    from ris.errors import RisError
    from ris.head import HEADS

    triplet = HEADS[args.arch].trained == "triplet"
    unused = WHITEN_ONLY if triplet else TRIPLET_ONLY
    if args.arch == "residual":
        unused = unused + ("out_dim",)  # the correction keeps the input size
    if args.split_by == "object" and args.unseen_classes:
        raise RisError(f"--unseen-classes {args.unseen_classes} applies to --split-by image (classes whose images "
                       "are all held out); --split-by object holds out whole objects already")
    given = given_options(args, parser, unused)
    if not given:
        return
    why = ("they set the triplet heads, --arch residual|mlp; learned whitening is fitted in closed form"
           if not triplet else "they set learned whitening, --arch whiten" if given[0].startswith("--whiten")
           else "the residual head adds its correction at the input's size")
    raise RisError(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --arch {args.arch} "
                   f"({why})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unused(args, parser)
    from dataclasses import asdict

    from ris.train import train_head

    cfg = config_from_args(args)
    if args.folds and args.folds > 1:
        from ris.kfold import format_summary, summarize_folds, train_folds

        results = train_folds(args.features_db, args.output, cfg, args.folds, progress=not args.quiet)
        summary = summarize_folds(results)
        if args.json:
            print_json({"folds": [asdict(r) for r in results], "summary": summary})
        else:
            print(format_summary(summary, args.folds))
        return EXIT_OK
    r = train_head(args.features_db, args.output, cfg, progress=not args.quiet)
    if args.json:
        print_json(asdict(r))
        return _interrupted(r)
    if r.epochs_run:
        from ris.train_report import best_epoch_text

        print(f"saved {r.model_path} ({best_epoch_text(r.best_epoch, r.epochs_run)}; {r.seconds_per_epoch:.2f} s/epoch); "
              f"history {r.history_path}, plot {r.plot_path or '(matplotlib missing)'}")
    else:
        print(f"saved {r.model_path} (learned whitening, closed form, fitted in {r.seconds:.1f} s); inner "
              f"cross-validation table {r.history_path}, plot {r.plot_path or '(matplotlib missing)'}")
    if r.scores:
        raw, head = r.scores["raw"], r.scores["head"]
        kind = (f"test objects ({r.split['test']})" if cfg.split_by == "object"
                else f"test images of {r.split['test']} classes")
        role = r.scores["protocol"].partition("; ")[2]  # what the training images in it are to a query
        print(f"held-out {kind}, {raw['queries']} queries searching the whole collection "
              f"(as ris-eval --model scores them; {role}): N-S raw {raw['ns_score']:.4f} -> head {head['ns_score']:.4f}"
              f"{_perfect(raw)};  mAP {raw['map']:.4f} -> {head['map']:.4f}")
        raw, head = r.scores["test_gallery"]["raw"], r.scores["test_gallery"]["head"]
        print(f"  searching only each other (the fold protocol, which flatters): N-S {raw['ns_score']:.4f} -> "
              f"{head['ns_score']:.4f}{_perfect(raw)};  mAP {raw['map']:.4f} -> {head['map']:.4f}")
    return _interrupted(r)


def _interrupted(r) -> int:
    """EXIT_INTERRUPTED, with one line, when Ctrl-C/SIGTERM ended the epochs early (the best complete
    one is what was saved); EXIT_OK otherwise."""
    if r.interrupted_by is None:
        return EXIT_OK
    from ris.train_report import epoch_zero_note

    print(f"ris-train: interrupted ({r.interrupted_by}) after {r.epochs_run} complete epochs: the best epoch so far "
          f"({r.best_epoch}) is saved in {r.model_path}{epoch_zero_note(r.best_epoch)}; run the same command again "
          "to train every epoch", file=sys.stderr)
    return EXIT_INTERRUPTED


def _perfect(scores: dict) -> str:
    """Where groups have fewer than 4 images (Holidays' scenes), the N-S a perfect search scores."""
    p = scores.get("ns_perfect", 4.0)
    return f" (a perfect search scores {p:.3f}: groups of fewer than 4)" if p < 4.0 else ""


def entry() -> None:
    sys.exit(run("ris-train", main))


if __name__ == "__main__":
    entry()
