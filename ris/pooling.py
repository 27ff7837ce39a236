"""Global descriptors from conv maps: the pooling registry (GAP, MAC, GeM, R-MAC).

``POOLING`` maps a name to a :class:`Pooling`: a function written against an ``ops`` namespace,
so one definition serves both paths. On the model path ``ris.layers.GlobalPool`` calls it with
``keras.ops`` (pooling runs on the accelerator next to the trunk, on any Keras backend, and only
(B, C) vectors cross to the host); on the host ``pool_numpy`` calls it with :data:`NUMPY_OPS` for
stored maps. This module never imports Keras, so the CLIs' ``--help`` can list the choices.

Adding a pooling is one entry in ``POOLING`` plus its test in tests/test_pooling.py. Storing the
maps themselves (``ris-extract --pool none``) is not a pooling and is not in the dict.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ris.errors import RisError

NO_POOLING = "none"  # ris-extract --pool none: store the (h, w, C) maps, pool later


class _NumpyOps:
    """The few ``keras.ops`` functions the poolings use, on NumPy arrays (host-side pooling)."""

    def __getattr__(self, name: str) -> Any:  # mean, max, min, power, maximum, sum, sqrt, ...
        return getattr(np, name)

    @staticmethod
    def norm(x, axis=None, keepdims=False):
        return np.linalg.norm(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x, dtype=dtype)


NUMPY_OPS = _NumpyOps()


@dataclass(frozen=True)
class Pooling:
    """One pooling: ``pool(ops, maps, p, eps) -> (B, C)`` from (B, h, w, C) ``maps``.

    ``p`` is GeM's exponent (a weight of the Keras layer, learnable there when asked) and ``eps``
    a small positive constant; a pooling that needs neither ignores them. ``uses_p``: the layer
    creates the weight ``p``. ``fixed_size``: the map size must be known when the model is built
    (R-MAC lays its region grid over it). Use functions that ``keras.ops`` and NumPy both have
    (plus ``ops.norm`` and ``ops.cast``), so the host path runs the same code.
    """

    pool: Callable[..., Any]
    help: str
    uses_p: bool = False
    fixed_size: bool = False


def _gap(ops, x, p, eps):
    return ops.mean(x, axis=(1, 2))


def _mac(ops, x, p, eps):
    return ops.max(x, axis=(1, 2))


def _gem(ops, x, p, eps):
    p = ops.cast(p, x.dtype)
    return ops.power(ops.mean(ops.power(ops.maximum(x, eps), p), axis=(1, 2)), 1.0 / p)


def _rmac(ops, x, p, eps):
    total = None
    for y, x0, h, w in rmac_regions(int(x.shape[1]), int(x.shape[2])):
        region = ops.max(x[:, y : y + h, x0 : x0 + w, :], axis=(1, 2))
        region = region / (ops.norm(region, axis=-1, keepdims=True) + eps)
        total = region if total is None else total + region
    return total


POOLING: dict[str, Pooling] = {
    "gap": Pooling(_gap, "average"),
    "mac": Pooling(_mac, "max"),
    "gem": Pooling(_gem, "generalised mean (p=3)", uses_p=True),
    "rmac": Pooling(_rmac, "regional max (Tolias et al.)", fixed_size=True),
}


def check_pooling(method: str, allow_none: bool = False) -> None:
    """A RisError naming the choices when ``method`` is not a pooling (or 'none' where allowed): the
    name comes from a user (a flag, a database's or a model's recorded recipe)."""
    if method in POOLING or (allow_none and method == NO_POOLING):
        return
    choices = [*POOLING, NO_POOLING] if allow_none else list(POOLING)
    raise RisError(f"unknown pooling {method!r}; choose one of {', '.join(choices)}")


@functools.lru_cache(maxsize=64)
def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> tuple[tuple[int, int, int, int], ...]:
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
    return tuple(regions)


def pool_numpy(maps: np.ndarray, method: str, p: float = 3.0, eps: float = 1e-6, block: int = 256) -> np.ndarray:
    """Host-side pooling of stored maps (evaluation of raw features), ``block`` rows at a time so
    the temporaries stay small; (N, D) input is returned as it is."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        return maps
    check_pooling(method)
    fn = POOLING[method].pool
    if len(maps) == 0:
        return np.zeros((0, maps.shape[-1]), np.float32)
    return np.concatenate([np.asarray(fn(NUMPY_OPS, maps[s : s + block], np.float32(p), np.float32(eps)), np.float32)
                           for s in range(0, len(maps), block)])
