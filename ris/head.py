"""Embedding heads and how they are trained: the ``HEADS`` and ``MININGS`` registries.

The blog's design: one shared base network applied to query, positive and negative, outputs
concatenated, loss ``max(0, m + D(q, p) - D(q, n))``. For P x K batches the same base network is
trained with in-batch mining (batch-hard, semi-hard, batch-all) on the embeddings directly.
Learned whitening is the head fitted in closed form instead (``ris.whiten``); it has an entry here
so that ``--arch`` lists it.

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
    ``ris.whiten``, called by ``ris.train``). ``top(x, skip, out_dim)`` puts a triplet head's last
    layers on the hidden layers' output ``x``; ``skip`` is the pooled input. ``starts_raw``: the untrained head ranks
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
        raise ValueError(f"arch must be one of {triplet}, not {arch!r} (fitted heads: see ris.whiten)")
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
        from ris.layers import unit_rows

        return 1.0 - ops.sum(unit_rows(a) * unit_rows(b), axis=-1)
    raise ValueError(f"distance must be one of {DISTANCES}")


def distance_matrix(x, distance: str):
    from keras import ops

    if distance == "euclidean":
        sq = ops.sum(ops.square(x), axis=1)
        d2 = sq[:, None] - 2.0 * ops.matmul(x, ops.transpose(x)) + sq[None, :]
        return ops.sqrt(ops.maximum(d2, 1e-12))
    if distance == "cosine":
        from ris.layers import unit_rows

        x = unit_rows(x)
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
