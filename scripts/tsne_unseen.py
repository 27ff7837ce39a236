"""Where do unseen objects land? t-SNE of head embeddings, training objects next to held-out ones.

Answers the blog's reader question with a picture and two numbers per group: the mean distance
between views of one object, and the mean distance from an image to the nearest image of another
object (smaller / larger = tighter, better separated clusters).

    python scripts/tsne_unseen.py --features-db uk.h5 --model head.keras --output bench/tsne_ukbench.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def cluster_stats(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from ris.topk import pairwise_distances

    d = pairwise_distances(x, x, "euclidean")
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    intra = d[same].mean()
    other = np.where(labels[:, None] == labels[None, :], np.inf, d).min(axis=1).mean()
    return {"intra_object": round(float(intra), 4), "nearest_other_object": round(float(other), 4),
            "ratio": round(float(intra / other), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features-db", required=True, help="labelled feature database")
    p.add_argument("--model", required=True, help="trained head (.keras) whose split says which objects it saw")
    p.add_argument("--objects", type=int, default=30, help="objects drawn from each group (train, unseen)")
    p.add_argument("--output", default="bench/tsne_ukbench.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the object draw and t-SNE")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from ris.embed import embed_features, raw_descriptors
    from ris.featuredb import FeatureDB
    from ris.modelio import load_model

    head, meta = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    with FeatureDB(args.features_db) as db:
        names = db.label_names
        labels = db.labels
        index = {n: i for i, n in enumerate(names)}
        groups = {}
        for part in ("train", "test"):
            ids = np.array([index[n] for n in meta["split"][part]])
            groups[part] = rng.choice(ids, size=min(args.objects, len(ids)), replace=False)
        rows = np.nonzero(np.isin(labels, np.concatenate(list(groups.values()))))[0]
        feats = db.read_rows(rows)
    lab = labels[rows]
    seen = np.isin(lab, groups["train"])
    spaces = {"off-the-shelf descriptor": raw_descriptors(feats), "trained head": embed_features(head, feats)}
    stats = {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, (title, x) in zip(axes, spaces.items()):
        stats[title] = {"training objects": cluster_stats(x[seen], lab[seen]),
                        "unseen objects": cluster_stats(x[~seen], lab[~seen])}
        xy = TSNE(n_components=2, perplexity=15, random_state=args.seed, init="pca").fit_transform(x)
        colours = plt.cm.tab20(np.searchsorted(np.unique(lab), lab) % 20)
        ax.scatter(xy[seen, 0], xy[seen, 1], c=colours[seen], marker="o", s=28, label="training objects")
        ax.scatter(xy[~seen, 0], xy[~seen, 1], c=colours[~seen], marker="^", s=40, edgecolors="k",
                   linewidths=0.5, label="unseen objects")
        s_tr, s_un = stats[title]["training objects"], stats[title]["unseen objects"]
        ax.set_title(f"{title}\nintra/nearest-other: train {s_tr['ratio']:.2f}, unseen {s_un['ratio']:.2f}")
        ax.set_xticks([]), ax.set_yticks([])
        ax.legend(loc="lower right")
    fig.suptitle(f"t-SNE of {len(rows)} images ({args.objects} training + {args.objects} unseen objects, "
                 f"4 views each; colour = object)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(json.dumps(stats, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
