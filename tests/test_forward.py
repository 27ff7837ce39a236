"""The compiled forward pass and the input scaling folded into it (ris/forward.py)."""
from __future__ import annotations

import numpy as np

from ris.backbones import get_backbone
from ris.forward import affine_preprocess, compile_forward


def test_a_backbones_input_scaling_is_found_as_a_per_channel_affine_map():
    """VGG16's caffe scaling swaps RGB to BGR and subtracts the mean: the map found reproduces it."""
    preprocess = get_backbone("vgg16").preprocess
    perm, scale, offset = affine_preprocess(preprocess)
    assert perm == [2, 1, 0]
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(x[..., perm] * scale + offset, preprocess(x.copy()), atol=1e-3)


def test_a_scaling_that_is_no_affine_map_stays_on_the_host():
    assert affine_preprocess(lambda x: np.sqrt(x.astype(np.float32))) is None
    assert affine_preprocess(lambda x: x.astype(np.float32).mean(axis=-1, keepdims=True).repeat(3, -1)) is None


def test_the_compiled_call_gives_the_models_output_for_any_batch_size():
    import keras

    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inp)))
    fwd = compile_forward(model)
    for n in (1, 3):
        x = np.random.default_rng(n).normal(size=(n, 4, 4, 3)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(fwd(x)), np.asarray(model(x)), atol=1e-5)
