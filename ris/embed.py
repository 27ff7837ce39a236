"""Descriptors of stored features: off the shelf (pooled, L2-normalised) or through a saved head.

A head is what ``ris.modelio.load_model`` returns: a ``ris.whiten.WhiteningHead`` (NumPy) for
learned whitening, a Keras model for triplet heads. Keras is imported only to run a Keras head,
so scoring raw features or a whitening head never loads TensorFlow.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def raw_descriptors(features: np.ndarray, pooling: str = "gap") -> np.ndarray:
    """Off-the-shelf descriptor of stored features: pooled if maps, L2-normalised."""
    from ris.pooling import pool_numpy
    from ris.topk import l2_normalize

    return l2_normalize(pool_numpy(features, pooling) if features.ndim == 4 else features)


def embed_features(head, features, batch: int = 4096) -> np.ndarray:
    """Run ``head`` over stored features in batches (an h5py dataset or an array) -> float32 rows."""
    from ris.whiten import WhiteningHead

    if isinstance(head, WhiteningHead):
        run, out_dim = head, head.output_dim
    else:
        import keras

        def run(x):
            return keras.ops.convert_to_numpy(head(x, training=False))

        out_dim = int(head.output_shape[-1])
    outs = [run(np.asarray(features[s : s + batch], dtype=np.float32))
            for s in range(0, int(features.shape[0]), batch)]
    if not outs:
        return np.zeros((0, out_dim), np.float32)
    return np.concatenate(outs).astype(np.float32)


def head_inputs(meta: dict[str, Any], db, rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """What a saved head eats for these database rows: features, plus thumbnails if it has a
    shallow branch."""
    size = int(meta.get("config", {}).get("shallow", 0) or 0)
    if not size:
        return feats
    from ris.thumbs import database_thumbnails, with_thumbnails

    return with_thumbnails(feats, database_thumbnails(db, size)[rows])
