"""Embedding heads and how they are trained: the ``HEADS`` and ``MININGS`` registries.

The blog's design: one shared base network applied to query, positive and negative, outputs
concatenated, loss ``max(0, m + D(q, p) - D(q, n))``. For P x K batches the same base network is
trained with in-batch mining (batch-hard, semi-hard, batch-all) on the embeddings directly.
Learned whitening is the head fitted in closed form instead.

Layers and losses are written with ``keras.ops`` (any Keras backend); Keras is imported inside
the functions, so the registries load without it (``ris-train --help`` lists their names).
Adding a head or a miner is one entry in its dict, its function here, and its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import keras

DISTANCES: tuple[str, ...] = ("euclidean", "cosine")


@dataclass(frozen=True)
class Head:
    """One head architecture. ``trained``: "triplet" (built by ``build_embedding_head``, trained
    with a miner's loss, best epoch on val) or "fitted" (closed form on the training objects:
    ``ris.train``). ``top(x, skip, out_dim)`` puts a triplet head's last layers on the hidden
    layers' output ``x``; ``skip`` is the pooled input. ``starts_raw``: the untrained head ranks
    like its input, so epoch 0 (the off-the-shelf ranking) competes for the best epoch."""

    help: str
    trained: str = "triplet"
    top: Callable | None = None
    starts_raw: bool = False


@dataclass(frozen=True)
class Mining:
    """How triplets are formed. ``select`` None: random (q, p, n) row triplets through
    ``build_triplet_network``, loss ``triplet_loss``. Otherwise P x K batches of labelled rows, and
    ``select(d, pos, neg, margin)`` turns the batch's (B, B) distances and its positive / negative
    pair masks (0/1 floats) into each anchor's loss (``mined_triplet_loss``)."""

    help: str
    select: Callable | None = None

    @property
    def triplet_inputs(self) -> bool:
        """True: batches of (q, p, n) triplets; False: P x K batches of rows with their labels."""
        return self.select is None


def build_embedding_head(
    input_shape: Sequence[int],
    hidden: Sequence[int] = (512, 512),
    out_dim: int = 256,
    pooling: str = "gap",
    l2_normalize: bool = True,
    dropout: float = 0.1,
    arch: str = "residual",
    shallow: int = 0,
    name: str = "embedding",
) -> keras.Model:
    """Stored feature (vector or conv map) -> embedding of a triplet-trained ``HEADS[arch]``.

    Maps are pooled first, then Dense ``hidden`` layers, then the head's ``top``.
    """
    import keras

    from ris.layers import Columns, GlobalPool, L2Normalize

    head = HEADS.get(arch)
    if head is None or head.trained != "triplet":
        triplet = [n for n, h in HEADS.items() if h.trained == "triplet"]
        raise ValueError(f"arch must be one of {triplet}, not {arch!r} (fitted heads: see build_whitening_head)")
    if shallow:
        if len(input_shape) != 1:
            raise ValueError("the shallow branch needs pooled features, not conv maps")
        deep_dim = int(input_shape[0])
        inp = keras.Input((deep_dim + shallow * shallow * 3,), name="features_and_thumbnail")
        x = Columns(0, deep_dim, name="deep")(inp)
        thumb = keras.layers.Reshape((shallow, shallow, 3), name="thumbnail")(
            Columns(deep_dim, deep_dim + shallow * shallow * 3, name="thumb_flat")(inp))
    else:
        inp = keras.Input(tuple(input_shape), name="features")
        x = inp
    if len(input_shape) == 3:
        x = GlobalPool(pooling, name="pool")(x)
    skip = x
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    x = head.top(x, skip, out_dim)
    if shallow:
        x = keras.layers.Concatenate(name="deep_and_shallow")([L2Normalize(name="deep_l2")(x), shallow_branch(thumb)])
    if l2_normalize:
        x = L2Normalize(name="l2norm")(x)
    return keras.Model(inp, x, name=name)


def _mlp_top(x, skip, out_dim: int):
    """The blog's base network ends in a projection to ``out_dim``."""
    import keras

    return keras.layers.Dense(out_dim, name="projection")(x)


def _residual_top(x, skip, out_dim: int):
    """The MLP's output, projected back to the input size and zero-initialised, is added to the
    pooled input: training starts from the off-the-shelf ranking and only learns a correction
    (with a few hundred objects a fresh MLP forgets more ImageNet knowledge than it learns)."""
    import keras

    from ris.layers import L2Normalize

    delta = keras.layers.Dense(int(skip.shape[-1]), kernel_initializer="zeros", name="correction")(x)
    return keras.layers.Add(name="residual")([L2Normalize(name="input_l2")(skip), delta])


def shallow_branch(thumb, width: int = 32, out_dim: int = 64):
    """Flipkart-style shallow CNN on a small thumbnail: colour and texture the deep net discards.

    Its last layer starts near zero (not at zero: with every thumbnail mapped to the same point the
    triplet gradient of the branch would vanish), so the joint embedding starts as the deep one and
    the branch only contributes what the triplets teach it.
    """
    import keras

    y = thumb
    for i, filters in enumerate((width, width * 2)):
        y = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"shallow_conv{i}")(y)
    y = keras.layers.GlobalAveragePooling2D(name="shallow_pool")(y)
    init = keras.initializers.RandomNormal(stddev=1e-3)
    return keras.layers.Dense(out_dim, kernel_initializer=init, name="shallow_out")(y)


def build_triplet_network(base: keras.Model) -> keras.Model:
    """Three inputs, one shared ``base``, outputs concatenated along the feature axis."""
    import keras

    shape = tuple(base.input_shape[1:])
    q, p, n = (keras.Input(shape, name=s) for s in ("query", "positive", "negative"))
    out = keras.layers.Concatenate(name="triplet")([base(q), base(p), base(n)])
    return keras.Model([q, p, n], out, name="triplet_network")


def pair_distance(a, b, distance: str):
    from keras import ops

    if distance == "euclidean":
        return ops.sqrt(ops.maximum(ops.sum(ops.square(a - b), axis=-1), 1e-12))
    if distance == "cosine":
        a = a / ops.maximum(ops.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / ops.maximum(ops.norm(b, axis=-1, keepdims=True), 1e-12)
        return 1.0 - ops.sum(a * b, axis=-1)
    raise ValueError(f"distance must be one of {DISTANCES}")


def distance_matrix(x, distance: str):
    from keras import ops

    if distance == "euclidean":
        sq = ops.sum(ops.square(x), axis=1)
        d2 = sq[:, None] - 2.0 * ops.matmul(x, ops.transpose(x)) + sq[None, :]
        return ops.sqrt(ops.maximum(d2, 1e-12))
    if distance == "cosine":
        x = x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)
        return 1.0 - ops.matmul(x, ops.transpose(x))
    raise ValueError(f"distance must be one of {DISTANCES}")


def triplet_loss(margin: float = 0.2, distance: str = "euclidean") -> Callable:
    """The blog's loss on concatenated (q | p | n) outputs; ``y_true`` is ignored."""
    from keras import ops

    def loss(y_true, y_pred):
        dim = ops.shape(y_pred)[-1] // 3
        q, p, n = y_pred[:, :dim], y_pred[:, dim : 2 * dim], y_pred[:, 2 * dim :]
        return ops.maximum(margin + pair_distance(q, p, distance) - pair_distance(q, n, distance), 0.0)

    loss.__name__ = f"triplet_{distance}"
    return loss


def mined_triplet_loss(margin: float = 0.2, distance: str = "euclidean", mining: str = "batch-hard") -> Callable:
    """In-batch mining ``MININGS[mining]`` over a P x K batch; ``y_true`` holds the integer labels."""
    from keras import ops

    if mining not in MININGS or MININGS[mining].select is None:
        raise ValueError(f"in-batch mining must be one of {[n for n, m in MININGS.items() if m.select]}, not {mining!r}")
    select = MININGS[mining].select

    def loss(y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        d = distance_matrix(ops.cast(y_pred, "float32"), distance)
        same = ops.equal(labels[:, None], labels[None, :])
        eye = ops.eye(ops.shape(labels)[0], dtype="bool")
        pos = ops.cast(ops.logical_and(same, ops.logical_not(eye)), "float32")
        neg = ops.cast(ops.logical_not(same), "float32")
        return select(d, pos, neg, margin)

    loss.__name__ = f"{mining}_{distance}"
    return loss


def training_loss(mining: str, margin: float = 0.2, distance: str = "euclidean") -> Callable:
    """The loss that goes with ``MININGS[mining]``'s batches."""
    return triplet_loss(margin, distance) if MININGS[mining].triplet_inputs else mined_triplet_loss(margin, distance, mining)


def _batch_hard(d, pos, neg, margin):
    """Each anchor's hardest positive against its hardest negative."""
    from keras import ops

    hardest_pos = ops.max(d * pos, axis=1)
    hardest_neg = ops.min(d + 1e6 * (1.0 - neg), axis=1)
    return ops.maximum(margin + hardest_pos - hardest_neg, 0.0)


def _batch_all(d, pos, neg, margin):
    """Every valid (a, p, n) of the batch; the mean over those with a positive loss."""
    trip = margin + d[:, :, None] - d[:, None, :]  # (B, B, B)
    return _mean_active(trip, pos[:, :, None] * neg[:, None, :], d)


def _semi_hard(d, pos, neg, margin):
    """Negatives farther than the positive but inside the margin (FaceNet); all valid triplets
    when the batch has none."""
    from keras import ops

    trip = margin + d[:, :, None] - d[:, None, :]
    valid = pos[:, :, None] * neg[:, None, :]
    semi = ops.cast(ops.logical_and(d[:, None, :] > d[:, :, None], trip > 0.0), "float32") * valid
    return _mean_active(trip, ops.where(ops.sum(semi) > 0, semi, valid), d)


def _mean_active(trip, use, d):
    """The mean of the positive losses among the ``use``d triplets, as one value per anchor."""
    from keras import ops

    losses = ops.maximum(trip, 0.0) * use
    active = ops.cast(losses > 1e-9, "float32")
    return ops.sum(losses) / ops.maximum(ops.sum(active), 1.0) * ops.ones_like(d[:, 0])


HEADS: dict[str, Head] = {
    "mlp": Head("the blog's base network, Dense 512-512-256 (--hidden, --out-dim)", top=_mlp_top),
    "residual": Head("the same MLP adds a zero-initialised correction to the input feature, so training "
                     "starts from the off-the-shelf ranking", top=_residual_top, starts_raw=True),
    "whiten": Head("learned whitening (Radenovic et al.) fitted in closed form on the training objects, its "
                   "settings chosen by cross-validation inside them (see --whiten-*)", trained="fitted"),
}

MININGS: dict[str, Mining] = {
    "random": Mining("the blog's random (q, p, n) triplets, every image an anchor once per epoch"),
    "batch-hard": Mining("each anchor's hardest positive and negative in a P x K batch", _batch_hard),
    "semi-hard": Mining("negatives farther than the positive but inside the margin, in a P x K batch",
                        _semi_hard),
    "batch-all": Mining("every triplet of a P x K batch, averaged over those with a loss", _batch_all),
}


def one_blas_thread():
    """A context in which BLAS/LAPACK runs on one thread.

    Why: the whitening fit is many small decompositions (eigh of 1280 x 1280 and less). With
    OpenBLAS's default threads they spin-wait for cores that other work holds: on a busy 2-core
    machine one 1280 x 1280 eigh took 12.8-45.8 s instead of 1.2-1.7 s on one thread, and ris-demo
    750 s instead of 199 s (bench/README.md). One thread also makes the fit the same on any machine.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _within_scatter(x, labels):
    """Mean over all matching pairs of (x_a - x_b)(x_a - x_b)^T, from per-group scatter (no pair list)."""
    import numpy as np

    cov = np.zeros((x.shape[1], x.shape[1]))
    pairs = 0
    for g in np.unique(labels):
        xg = x[labels == g]
        k = len(xg)
        if k < 2:
            continue
        c = xg - xg.mean(0)
        cov += k * (c.T @ c)  # sum over a < b of the pair differences' outer products
        pairs += k * (k - 1) // 2
    if not pairs:
        raise ValueError("learned whitening needs groups with at least two images")
    return cov / pairs


def learned_whitening(features, labels, out_dim: int, shrinkage: float = 1.0, power: float = 0.5):
    """Radenovic et al.'s learned whitening (Lw): whiten the within-object scatter of matching
    pairs, then rotate to the principal axes of the whitened training set and keep ``out_dim``.

    Fitted in closed form on training objects only. ``shrinkage`` adds that multiple of the mean
    eigenvalue to the within-object covariance (a few hundred objects cannot estimate a 1280 x 1280
    matrix); ``power`` 0.5 whitens fully, smaller values partially. Returns (mean, P).
    """
    import numpy as np

    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    with one_blas_thread():
        mean = x.mean(0)
        cov = _within_scatter(x, labels)
        cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
        w, v = np.linalg.eigh(cov)
        pw = v / np.maximum(w, 1e-12) ** power
        xw = (x - mean) @ pw
        w2, v2 = np.linalg.eigh(np.cov(xw.T))
        order = np.argsort(w2)[::-1][: min(out_dim, x.shape[1])]
        return mean.astype(np.float32), (pw @ v2[:, order]).astype(np.float32)


# Searched by choose_whitening; "off" (the raw descriptor) is always a candidate.
WHITEN_GRID = {"shrinkage": (0.1, 0.3, 1.0, 3.0), "power": (0.5, 0.25), "dim": (256, 512)}


def _apply_whitening(x, mean, proj):
    import numpy as np

    from ris.topk import l2_normalize

    return l2_normalize((l2_normalize(np.asarray(x, np.float32)) - mean) @ proj)


def choose_whitening(features, labels, score: Callable, folds: int = 3, seed: int = 0,
                     grid: dict | None = None, max_eval: int = 4000) -> dict:
    """Pick shrinkage, power and size of learned whitening by cross-validation inside the training set.

    Why: the best regularisation depends on the backbone and on how many objects there are, and the
    held-out objects may not be used to choose it. The inner folds hold out whole groups, so the
    choice is made for objects (or classes) the head has not seen. ``score(descriptors, labels)`` is higher-better (N-S or mAP). Returns the choice, its mean inner
    gain over the raw descriptor and the whole table; ``{"off": True}`` when nothing beat raw.
    Each held-out part is scored on at most ``max_eval`` images (whole groups, seeded), so the
    choice costs about the same on 100k training images as on 1k.
    """
    with one_blas_thread():  # many small fits and scorings: threads only spin on a busy machine
        return _choose_whitening(features, labels, score, folds, seed, grid, max_eval)


def _choose_whitening(features, labels, score: Callable, folds: int, seed: int, grid: dict | None,
                      max_eval: int) -> dict:
    import numpy as np

    from ris.topk import l2_normalize

    grid = grid or WHITEN_GRID
    x = l2_normalize(np.asarray(features, np.float32))
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(np.unique(labels)), folds)
    held = [np.isin(labels, p) for p in parts]
    dims = sorted(d for d in grid["dim"] if d <= x.shape[1]) or [x.shape[1]]
    table: dict[tuple, list[float]] = {}
    raw = []
    for te in held:
        tr = ~te
        if te.sum() > max_eval:  # score a seeded subset of the held-out groups
            groups, sizes = np.unique(labels[te], return_counts=True)
            order = rng.permutation(len(groups))
            keep = groups[order][: max(2, int(np.searchsorted(np.cumsum(sizes[order]), max_eval)))]
            te = te & np.isin(labels, keep)
        if len(np.unique(labels[te])) < 2 or len(np.unique(labels[tr])) < 2:
            continue
        raw.append(score(x[te], labels[te]))
        for shrink in grid["shrinkage"]:
            for power in grid["power"]:
                mean, proj = learned_whitening(x[tr], labels[tr], max(dims), shrink, power)
                for d in dims:
                    table.setdefault((shrink, power, d), []).append(
                        score(_apply_whitening(x[te], mean, proj[:, :d]), labels[te]))
    if not raw:
        raise ValueError("too few groups to choose the whitening by cross-validation")
    gains = {k: float(np.mean(v) - np.mean(raw)) for k, v in table.items()}
    best = max(gains, key=gains.get)
    rows = [{"shrinkage": k[0], "power": k[1], "dim": k[2], "inner_gain": g} for k, g in sorted(gains.items())]
    if gains[best] <= 0:
        return {"off": True, "inner_gain": 0.0, "inner_raw": float(np.mean(raw)), "table": rows}
    return {"off": False, "shrinkage": best[0], "power": best[1], "dim": best[2], "inner_gain": gains[best],
            "inner_raw": float(np.mean(raw)), "table": rows}


def build_whitening_head(mean, projection, l2_normalize: bool = True, name: str = "embedding") -> keras.Model:
    """A fixed linear head: (x - mean) @ P, then L2. Saved and used like a trained head."""
    import keras
    import numpy as np

    from ris.layers import L2Normalize

    inp = keras.Input((projection.shape[0],), name="features")
    dense = keras.layers.Dense(projection.shape[1], name="whitening", trainable=False)
    x = dense(L2Normalize(name="input_l2")(inp))
    dense.set_weights([projection, -(np.asarray(mean) @ projection)])
    if l2_normalize:
        x = L2Normalize(name="l2norm")(x)
    return keras.Model(inp, x, name=name)
