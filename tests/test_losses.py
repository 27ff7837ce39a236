"""Triplet losses against NumPy references, for both distances."""
import numpy as np
import pytest

from ris.head import mined_triplet_loss, triplet_loss


def np_dist(a, b, distance):
    if distance == "euclidean":
        return np.sqrt(np.maximum(((a - b) ** 2).sum(-1), 1e-12))
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 1 - (a * b).sum(-1)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_loss_matches_numpy(distance, margin):
    rng = np.random.default_rng(1)
    q, p, n = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(3))
    expected = np.maximum(0.0, margin + np_dist(q, p, distance) - np_dist(q, n, distance))
    got = np.asarray(triplet_loss(margin, distance)(None, np.concatenate([q, p, n], 1)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).any() and (expected == 0).any() or margin == 1.0


def test_triplet_loss_zero_when_negatives_far():
    q = np.zeros((4, 3), np.float32)
    p = q + 0.01
    n = q + 10
    assert float(np.asarray(triplet_loss(0.5, "euclidean")(None, np.concatenate([q, p, n], 1))).max()) == 0.0


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_matches_numpy(distance):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 3)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    margin = 0.3
    d = np.array([[np_dist(a, b, distance) for b in x] for a in x])
    same = labels[:, None] == labels[None]
    expected = []
    for i in range(12):
        pos = [d[i, j] for j in range(12) if same[i, j] and i != j]
        neg = [d[i, j] for j in range(12) if not same[i, j]]
        expected.append(max(0.0, margin + max(pos) - min(neg)))
    got = np.asarray(mined_triplet_loss(margin, distance, "batch-hard")(labels.astype(np.float32), x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_batch_all_averages_active_triplets():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 2)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    m = 0.5
    d = np.array([[np_dist(a, b, "euclidean") for b in x] for a in x])
    vals = []
    for a in range(6):
        for p in range(6):
            for n in range(6):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    vals.append(max(0.0, m + d[a, p] - d[a, n]))
    vals = np.array(vals)
    expected = vals.sum() / max((vals > 1e-9).sum(), 1)
    got = np.asarray(mined_triplet_loss(m, "euclidean", "batch-all")(labels.astype(np.float32), x))
    np.testing.assert_allclose(got.mean(), expected, rtol=1e-4)


def test_semi_hard_uses_negatives_inside_the_margin_and_falls_back_to_all():
    labels = np.repeat(np.arange(3), 2)
    m = 0.5

    def reference(x):
        d = np.array([[np_dist(a, b, "euclidean") for b in x] for a in x])
        valid = [(a, p, n) for a in range(6) for p in range(6) for n in range(6)
                 if a != p and labels[a] == labels[p] and labels[a] != labels[n]]
        semi = [t for t in valid if d[t[0], t[1]] < d[t[0], t[2]] < d[t[0], t[1]] + m]
        vals = np.array([max(0.0, m + d[a, p] - d[a, n]) for a, p, n in (semi or valid)])
        return vals.sum() / max((vals > 1e-9).sum(), 1), bool(semi)

    semi_hard = mined_triplet_loss(m, "euclidean", "semi-hard")
    batch_all = mined_triplet_loss(m, "euclidean", "batch-all")
    seen = set()
    for seed in range(6):
        x = np.random.default_rng(seed).normal(size=(6, 4)).astype(np.float32)
        if seed >= 3:  # positives on top of their anchor, negatives far: no semi-hard triplet
            x = np.repeat(x[::2], 2, axis=0) * np.float32(10.0)
        expected, has_semi = reference(x)
        seen.add(has_semi)
        got = np.asarray(semi_hard(labels.astype(np.float32), x))
        np.testing.assert_allclose(got, np.full(6, expected), rtol=1e-4, atol=1e-6)
        if seed == 0:  # a different average than batch-all's
            assert has_semi and abs(float(np.asarray(batch_all(labels.astype(np.float32), x)).mean()) - expected) > 1e-3
    assert seen == {True, False}  # both branches exercised


def test_random_mining_is_not_an_in_batch_loss():
    with pytest.raises(ValueError, match="in-batch mining"):
        mined_triplet_loss(0.2, "euclidean", "random")
