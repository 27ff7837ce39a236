"""Samplers: every triplet is (anchor, same-group other image, other-group image); P x K batches."""
from __future__ import annotations

import numpy as np
import pytest

from ris.errors import TooFewGroups
from ris.samplers import groups_of, pk_batches, random_triplets


def _labels() -> np.ndarray:
    """Groups of 4, 3 and 2 images, and a singleton (7) that has no positive."""
    return np.array([0, 1, 0, 2, 1, 0, 3, 1, 7, 2, 0, 3, 3, 4, 4, 4, 4, 5, 5, 5])


def test_groups_of_lists_every_row_once_in_row_order():
    labels = _labels()
    groups = groups_of(labels)
    assert groups[0].tolist() == [0, 2, 5, 10] and groups[7].tolist() == [8]
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(labels)))


def test_random_triplets_are_valid_and_every_pairable_image_anchors_once():
    labels = _labels()
    t = random_triplets(labels, np.random.default_rng(0))
    a, p, n = t.T
    assert (labels[a] == labels[p]).all() and (a != p).all()
    assert (labels[a] != labels[n]).all()
    assert sorted(a.tolist()) == [i for i in range(len(labels)) if i != 8]  # the singleton anchors nothing
    assert t.dtype == np.int64 and t.shape == (19, 3)


def test_random_triplets_draw_every_positive_not_always_the_same_one():
    labels = np.repeat(np.arange(3), 5)
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(30):
        t = random_triplets(labels, rng)
        seen |= {(int(a), int(p)) for a, p, _ in t if a == 0}
    assert seen == {(0, p) for p in (1, 2, 3, 4)}


def test_random_triplets_are_seeded_and_refuse_a_single_group():
    labels = _labels()
    assert np.array_equal(random_triplets(labels, np.random.default_rng(4)), random_triplets(labels, np.random.default_rng(4)))
    with pytest.raises(TooFewGroups, match="at least two groups"):
        random_triplets(np.zeros(4, np.int64), np.random.default_rng(0))
    assert random_triplets(np.arange(5), np.random.default_rng(0)).shape == (0, 3)  # no positive pair at all


@pytest.mark.parametrize("p,k", [(2, 4), (3, 2), (4, 3)])
def test_pk_batches_are_p_objects_times_k_views(p, k):
    labels = np.repeat(np.arange(12), 5)
    batches = pk_batches(labels, p, k, np.random.default_rng(0))
    assert len(batches) == 12 // p
    for b in batches:
        assert b.shape == (p * k,)
        per_object = labels[b].reshape(p, k)
        assert (per_object == per_object[:, :1]).all()  # K rows of one object, object after object
        assert len(set(per_object[:, 0].tolist())) == p
        assert all(len(set(b[i * k:(i + 1) * k].tolist())) == k for i in range(p))  # 5 views >= K: no repeats
    assert sorted(labels[np.concatenate(batches)][::k].tolist()) == list(range(12))  # each object once


def test_pk_batches_skip_singletons_fold_a_lone_last_object_in_and_repeat_small_groups():
    labels = np.concatenate([np.repeat(np.arange(7), [4, 4, 4, 4, 4, 2, 4]), [99]])  # 7 pairable objects, 1 alone
    batches = pk_batches(labels, 3, 4, np.random.default_rng(2))
    assert [len(b) for b in batches] == [12, 16]  # 3 + 4 objects: the 7th does not train alone
    rows = np.concatenate(batches)
    assert 99 not in labels[rows].tolist()
    small = rows[labels[rows] == 5]
    assert len(small) == 4 and set(small.tolist()) == set(np.nonzero(labels == 5)[0].tolist())  # drawn with replacement
