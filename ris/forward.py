"""The compiled forward pass of a feature extractor, per Keras backend, with the backbone's input
scaling folded into it where that scaling is a per-channel affine map (uint8 pixels travel to the
accelerator, a quarter of float32's bytes). Used by ``ris.extractor.FeatureExtractor``.

Built forward passes are shared per recipe within a process (``shared_forward``): every engine
opened on a database used to build its backbone again and wrap it in a new ``tf.function``, so a
notebook or service opening the same database over and over retraced (TensorFlow's "triggered
tf.function retracing" warning from the 5th or 6th open), recompiled on JAX, and held one more
model per open.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import astuple, dataclass, replace
from typing import Any, Callable

import numpy as np

KEEP_RECENT = 2  # built recipes kept after their last extractor is gone (the rest are held weakly)


@dataclass(eq=False)
class BuiltForward:
    """What a recipe builds once: the trunk, its forward pass per scale and their output shape.

    Shared by every extractor of the recipe: read it, never change its weights."""

    trunk: Any
    layer: str
    batchnorm_folded: int
    affine: tuple[list[int], np.ndarray, np.ndarray] | None
    calls: tuple[Callable[[np.ndarray], Any], ...]
    output_shape: tuple[int, ...]


_lock = threading.RLock()
_live: "weakref.WeakValueDictionary[tuple, BuiltForward]" = weakref.WeakValueDictionary()
_recent: "OrderedDict[tuple, BuiltForward]" = OrderedDict()


def recipe_key(config) -> tuple:
    """What makes two ``ExtractConfig`` build the same network: the Keras backend, the resolved
    recipe (``flip`` aside: it runs outside the model) and a weights file's path and stamp (a file
    rewritten in place builds anew)."""
    import keras

    from ris.filestamp import file_stamp

    resolved = replace(config.resolved(), flip=False)
    weights_file = None
    if config.weights not in (None, "none", "imagenet"):
        path = os.path.abspath(config.weights)
        weights_file = (path, file_stamp(path))
    fields = tuple(tuple(v) if isinstance(v, list) else v for v in astuple(resolved))  # scales as a list
    return keras.backend.backend(), fields, weights_file


def shared_forward(config, build: Callable[[], BuiltForward]) -> BuiltForward:
    """The recipe's ``BuiltForward``: the one an extractor alive in this process holds, or one
    of the ``KEEP_RECENT`` last built, else ``build()`` (bounded: older ones are freed with their
    last extractor)."""
    key = recipe_key(config)
    with _lock:  # one build per recipe, even when engines open in several threads
        built = _live.get(key) or _recent.get(key)
        if built is None:
            built = build()
            _live[key] = built
        _recent[key] = built
        _recent.move_to_end(key)
        while len(_recent) > KEEP_RECENT:
            _recent.popitem(last=False)
        return built


def forget_shared() -> None:
    """Drop the kept forward passes (extractors alive keep theirs): for a caller that changed a
    shared trunk's weights, and for tests."""
    with _lock:
        _recent.clear()
        _live.clear()


def affine_preprocess(preprocess: Callable[[np.ndarray], np.ndarray]
                       ) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """(perm, scale, offset) such that ``preprocess(x)[..., c] == x[..., perm[c]] * scale[c] + offset[c]``.

    Found by probing ``preprocess`` with black, one-channel-white and random images and checked on
    them; None when it is not such a map (then preprocessing stays on the host, as before).
    """
    rng = np.random.default_rng(0)
    probe = np.zeros((7, 4, 4, 3), np.uint8)
    for c in range(3):
        probe[1 + c, ..., c] = 255
    probe[4:] = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    try:
        out = np.asarray(preprocess(probe.copy()), dtype=np.float64)
    except Exception:
        return None
    if out.shape != probe.shape or not np.all(np.isfinite(out)):
        return None
    offset = out[0, 0, 0]
    delta = out[1:4, 0, 0] - offset  # [input channel, output channel]
    perm: list[int] = []
    scale = np.zeros(3)
    for c in range(3):
        col = np.abs(delta[:, c])
        src = int(np.argmax(col))
        if col[src] == 0 or np.sort(col)[-2] > 1e-6 * col[src]:
            return None
        perm.append(src)
        scale[c] = delta[src, c] / 255.0
    predicted = probe[..., perm].astype(np.float64) * scale + offset
    tol = 1e-5 * max(1.0, float(np.abs(out).max()))
    if np.abs(predicted - out).max() > tol:
        return None
    return perm, scale.astype(np.float32), offset.astype(np.float32)


def compile_forward(model) -> Callable[[np.ndarray], Any]:
    """A fast inference call per backend: ``predict()`` costs per-batch host overhead.

    Returns an array-like (``np.asarray`` gives the values); on JAX it is computed asynchronously.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

        @jax.jit
        def jitted(tv, ntv, x):
            out, _ = model.stateless_call(tv, ntv, x, training=False)
            return out

        return lambda x: jitted(state[0], state[1], x)
    if backend == "tensorflow":
        import tensorflow as tf

        dtype = tf.as_dtype(keras.backend.standardize_dtype(model.inputs[0].dtype))
        spec = tf.TensorSpec([None, *model.input_shape[1:]], dtype)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        return lambda x: fn(tf.convert_to_tensor(x, dtype)).numpy()
    if backend == "torch":
        import torch

        def run(x):
            with torch.no_grad():
                return keras.ops.convert_to_numpy(model(x, training=False))

        return run
    return lambda x: model.predict_on_batch(x)
