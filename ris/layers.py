"""The Keras layers that ris models are saved with: ``GlobalPool``, ``L2Normalize`` and ``Columns``.

Kept apart from ``ris.pooling`` and ``ris.head`` so that their registries (and every CLI's
``--help``) load without Keras. ``GlobalPool`` has no pooling code of its own: it dispatches through
``ris.pooling.POOLING`` with ``keras.ops``. Its config keys (method, p, trainable_p, eps) and its
registered names (``ris>GlobalPool``...) are unchanged since the layers lived in ``ris.pooling``
and ``ris.head``, so models saved then still load once this module is imported (``ris.modelio.load_model``
does).
"""
from __future__ import annotations

import keras
from keras import ops

from ris.pooling import POOLING, check_pooling


@keras.saving.register_keras_serializable(package="ris")
class GlobalPool(keras.layers.Layer):
    """(B, h, w, C) -> (B, C) with ``POOLING[method]``. GeM's exponent ``p`` is learnable when
    ``trainable_p``."""

    def __init__(self, method: str = "gap", p: float = 3.0, trainable_p: bool = False, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        check_pooling(method)
        self.method, self.p_init, self.trainable_p, self.eps = method, float(p), bool(trainable_p), float(eps)
        self.pooling = POOLING[method]

    def build(self, input_shape):
        if self.pooling.uses_p:
            self.p = self.add_weight(
                name="p", shape=(), initializer=keras.initializers.Constant(self.p_init), trainable=self.trainable_p
            )
        if self.pooling.fixed_size and (input_shape[1] is None or input_shape[2] is None):
            raise ValueError(f"{self.method} pooling needs a fixed input size")

    def call(self, x):
        return self.pooling.pool(ops, x, self.p if self.pooling.uses_p else self.p_init, self.eps)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        cfg = super().get_config()
        cfg.update(method=self.method, p=self.p_init, trainable_p=self.trainable_p, eps=self.eps)
        return cfg


@keras.saving.register_keras_serializable(package="ris")
class L2Normalize(keras.layers.Layer):
    """Unit-length rows, so Euclidean and cosine rankings agree."""

    def call(self, x):
        return unit_rows(x)


def unit_rows(x):
    """Rows divided by their length (a zero row stays zero). Why not ``x / max(norm(x), eps)``: the
    norm's derivative at a zero row is 0/0, which JAX carries through ``maximum`` as NaN (one step
    of training turned every weight NaN); the squared length's derivative there is 0."""
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-24))


@keras.saving.register_keras_serializable(package="ris")
class Columns(keras.layers.Layer):
    """Columns [start, stop) of a 2-D input: one stored row carries deep feature and thumbnail."""

    def __init__(self, start: int, stop: int, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), int(stop)

    def call(self, x):
        return x[:, self.start : self.stop]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.stop - self.start)

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}
