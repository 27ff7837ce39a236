"""Seeded train / val / test splits of a labelled database: by object, or inside every class.

Objects (labels) are split, never their images, for UKBench-style retrieval: ``test`` objects are
held out from every decision, ``val`` objects (carved from the training side) choose the best
epoch. Corel-style category retrieval splits the images of every class instead. Training,
evaluation and the k-fold loop all split here, so the same arguments give the same parts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ris.errors import RisError

SPLIT_BY = ("object", "image")


def split_objects(labels: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
                  fold: int | None = None, folds: int = 5) -> dict[str, np.ndarray]:
    """Label ids of train / val / test objects, seeded; ``fold`` picks the k-fold test part."""
    objects = np.unique(labels[labels >= 0])
    if len(objects) < 3:
        raise RisError(f"need at least 3 labelled objects to split, found {len(objects)}")
    if fold is not None and folds > len(objects):
        raise RisError(f"{folds} folds need at least {folds} labelled objects, found {len(objects)}")
    perm = np.random.default_rng(seed).permutation(objects)
    if fold is not None:
        parts = np.array_split(perm, folds)
        test = parts[fold]
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    else:
        n_test = max(1, int(round(len(perm) * test_fraction))) if test_fraction > 0 else 0
        test, rest = perm[:n_test], perm[n_test:]
    n_val = max(1, int(round(len(objects) * val_fraction))) if val_fraction > 0 else 0
    val, train = rest[:n_val], rest[n_val:]
    if len(train) < 2:
        raise RisError("too few training objects after the split; lower --test-fraction/--val-fraction")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def rows_of(labels: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Database rows whose label is one of ``objects``, in row order."""
    return np.nonzero(np.isin(labels, objects))[0]


def split_images(labels: np.ndarray, test_fraction: float = 0.5, val_fraction: float = 0.1, seed: int = 0,
                 unseen_classes: int = 0, fold: int | None = None,
                 folds: int = 5) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Row ids of train / val / test images, split inside every class (Corel's 50/50 protocol).

    ``unseen_classes`` classes (seeded) give no image to train or val, and every one of their images
    is test: an image the head never trained on is a held-out query (``ris.protocol``), so ris-train
    scores what ris-eval --model scores. ``fold``: k-fold inside every class instead of
    ``test_fraction``: the test images of fold k are part k of each seen class's seeded permutation, so
    the ``folds`` test sets partition the seen classes' images (an unseen class is tested whole in
    every fold). Returns (rows per part, unseen class ids).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    if len(classes) < 2 + unseen_classes:
        raise RisError(f"need at least {2 + unseen_classes} labelled classes, found {len(classes)}")
    unseen = np.sort(rng.choice(classes, size=unseen_classes, replace=False)) if unseen_classes else classes[:0]
    if fold is not None:  # a fold past every class's size would hold out no image: scored 0, or nothing
        largest = max(int((labels == c).sum()) for c in classes if c not in unseen)
        if folds > largest:
            raise RisError(f"{folds} folds inside every class need a class of at least {folds} images; "
                           f"the largest has {largest} (use --folds {largest} or fewer)")
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in classes:
        rows = rng.permutation(np.nonzero(labels == c)[0])
        if fold is not None:
            chunks = np.array_split(rows, folds)
            test, rest = chunks[fold], np.concatenate([ch for i, ch in enumerate(chunks) if i != fold])
        else:
            n_test = int(round(len(rows) * test_fraction))
            test, rest = rows[:n_test], rows[n_test:]
        if c in unseen:  # never trained on: all held out (still drawn above: the seen classes' parts are unchanged)
            parts["test"].append(rows)
            continue
        n_val = int(round(len(rows) * val_fraction))
        parts["test"].append(test)
        parts["val"].append(rest[:n_val])
        parts["train"].append(rest[n_val:])
    out = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    return out, unseen


def make_split(labels: np.ndarray, split_by: str = "object", test_fraction: float = 0.2, val_fraction: float = 0.1,
               seed: int = 0, fold: int | None = None, folds: int = 5,
               unseen_classes: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rows of train / val / test, and a description stored with the model.

    The defaults are ``ris-train``'s, so ``make_split(labels)`` is the split a default head was
    trained and scored on.
    """
    if split_by == "object":
        objs = split_objects(labels, test_fraction, val_fraction, seed, fold, folds)
        rows = {k: rows_of(labels, v) for k, v in objs.items()}
        return rows, {"by": "object", "objects": {k: v.tolist() for k, v in objs.items()}}
    if split_by == "image":
        rows, unseen = split_images(labels, test_fraction, val_fraction, seed, unseen_classes, fold, folds)
        return rows, {"by": "image", "unseen_classes": unseen.tolist()}
    raise RisError(f"--split-by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
