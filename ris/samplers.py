"""What a triplet head is trained on each epoch: random (q, p, n) row triplets, or P x K batches.

Plain NumPy over label arrays; the Keras ``PyDataset`` that feeds them to ``fit`` is built only
when ``batches`` is called (Keras is imported there), so the samplers load and test without it.
"""
from __future__ import annotations

import numpy as np

from ris.errors import TooFewGroups


def groups_of(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Rows of every label, each group in row order."""
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    return {int(u): order[s:e] for u, s, e in zip(uniq, starts, list(starts[1:]) + [len(order)])}


def _pairable(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Groups with a positive pair (two or more images): only they can anchor a triplet."""
    return {g: rows for g, rows in groups_of(labels).items() if len(rows) >= 2}


def random_triplets(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(anchor, positive, negative) row triplets: every image of a group of two or more is an
    anchor once per epoch, its positive drawn at random from the other members of its group (not
    always the first and last member, as the blog's sampler did), its negative from any other group."""
    groups = _pairable(labels)
    if not groups:
        return np.zeros((0, 3), np.int64)
    if len(np.unique(labels)) < 2:
        raise TooFewGroups("random triplets need images of at least two groups: no negative to draw")
    anchors = np.concatenate(list(groups.values()))
    rng.shuffle(anchors)
    out = np.empty((len(anchors), 3), dtype=np.int64)
    n = len(labels)
    for i, a in enumerate(anchors):
        members = groups[int(labels[a])]
        pos = members[rng.integers(len(members) - 1)]
        if pos == a:
            pos = members[-1]
        neg = rng.integers(n)
        while labels[neg] == labels[a]:
            neg = rng.integers(n)
        out[i] = (a, pos, neg)
    return out


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """P objects x K views per batch (rows, object after object); every object with two or more
    images appears once per epoch. A group smaller than K is drawn with replacement; a lone last
    object joins the previous batch, which then holds P + 1 objects."""
    groups = _pairable(labels)
    objects = np.array(list(groups))
    rng.shuffle(objects)
    batches = []
    starts = list(range(0, len(objects), p))
    if len(starts) > 1 and len(objects) - starts[-1] < 2:
        starts.pop()  # a lone last object joins the previous batch
    for i, s in enumerate(starts):
        chunk = objects[s : starts[i + 1] if i + 1 < len(starts) else len(objects)]
        if len(chunk) < 2:
            continue
        rows = [rng.choice(groups[int(o)], size=k, replace=len(groups[int(o)]) < k) for o in chunk]
        batches.append(np.concatenate(rows))
    return batches


def batches(features: np.ndarray, labels: np.ndarray, triplets: bool, seed: int, batch_size: int = 128,
            p: int = 32, k: int = 4, fixed: bool = False):
    """A Keras ``PyDataset`` of fresh batches every epoch (``fixed``: the same ones, for validation).

    ``triplets``: ``batch_size`` (q, p, n) triplets per batch, inputs a 3-tuple and a dummy target;
    otherwise P x K batches of rows with their labels as the target (in-batch mining).
    """
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self._make()

        def _make(self):
            if triplets:
                t = random_triplets(labels, self.rng)
                self.batches = [t[s : s + batch_size] for s in range(0, len(t), batch_size)]
            else:
                self.batches = pk_batches(labels, p, k, self.rng)

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            b = self.batches[i]
            if triplets:
                x = (features[b[:, 0]], features[b[:, 1]], features[b[:, 2]])
                return x, np.zeros((len(b), 1), np.float32)
            return features[b], labels[b].astype(np.float32)

        def on_epoch_end(self):
            if not fixed:
                self._make()

    return Batches()
