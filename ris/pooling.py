"""Global descriptors from conv maps: GAP, MAC, GeM and R-MAC.

Written with ``keras.ops`` so pooling runs on the accelerator next to the trunk, on any Keras
backend, and only (B, C) vectors cross to the host instead of (B, h, w, C) maps.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from ris.options import POOLINGS  # noqa: E402


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """Square regions (y, x, h, w) of Tolias et al.'s R-MAC grid, as in cnnimageretrieval-pytorch."""
    side = min(height, width)
    steps = np.arange(2, 7)
    b = (max(height, width) - side) / (steps - 1)
    extra = int(steps[np.argmin(np.abs(((side**2 - side * b) / side**2) - overlap))] - 1) if height != width else 0
    extra_w, extra_h = (extra, 0) if width > height else (0, extra)
    regions: list[tuple[int, int, int, int]] = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        wl = int(math.floor(2 * side / (level + 1)))
        if wl < 1:
            break
        wl2 = int(math.floor(wl / 2 - 1))
        bw = (width - wl) / (level + extra_w - 1) if level + extra_w > 1 else 0
        bh = (height - wl) / (level + extra_h - 1) if level + extra_h > 1 else 0
        xs = [int(math.floor(wl2 + i * bw) - wl2) for i in range(level + extra_w)]
        ys = [int(math.floor(wl2 + i * bh) - wl2) for i in range(level + extra_h)]
        for y in ys:
            for x in xs:
                regions.append((max(0, y), max(0, x), min(wl, height), min(wl, width)))
    return regions


@keras.saving.register_keras_serializable(package="ris")
class GlobalPool(keras.layers.Layer):
    """(B, h, w, C) -> (B, C). GeM's exponent ``p`` is learnable when ``trainable_p``."""

    def __init__(self, method: str = "gap", p: float = 3.0, trainable_p: bool = False, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        if method not in POOLINGS or method == "none":
            raise ValueError(f"pooling must be one of {POOLINGS[:-1]}, got {method!r}")
        self.method, self.p_init, self.trainable_p, self.eps = method, float(p), bool(trainable_p), float(eps)
        self._regions: list[tuple[int, int, int, int]] | None = None

    def build(self, input_shape):
        if self.method == "gem":
            self.p = self.add_weight(
                name="p", shape=(), initializer=keras.initializers.Constant(self.p_init), trainable=self.trainable_p
            )
        if self.method == "rmac":
            h, w = input_shape[1], input_shape[2]
            if h is None or w is None:
                raise ValueError("R-MAC needs a fixed input size")
            self._regions = rmac_regions(int(h), int(w))

    def call(self, x):
        if self.method == "gap":
            return ops.mean(x, axis=(1, 2))
        if self.method == "mac":
            return ops.max(x, axis=(1, 2))
        if self.method == "gem":
            p = ops.cast(self.p, x.dtype)
            return ops.power(ops.mean(ops.power(ops.maximum(x, self.eps), p), axis=(1, 2)), 1.0 / p)
        total = None
        for y, x0, h, w in self._regions:
            region = ops.max(x[:, y : y + h, x0 : x0 + w, :], axis=(1, 2))
            region = region / (ops.norm(region, axis=-1, keepdims=True) + self.eps)
            total = region if total is None else total + region
        return total

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
        return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)


def pool_numpy(maps: np.ndarray, method: str) -> np.ndarray:
    """Host-side pooling for stored maps (evaluation of raw features)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        return maps
    return np.asarray(GlobalPool(method)(maps))
