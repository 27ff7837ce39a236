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


def _fake_build(log: list):
    from ris.forward import BuiltForward

    def build():
        built = BuiltForward(object(), "x", 0, None, (), (3,))
        log.append(built)
        return built

    return build


def test_a_recipe_is_built_once_while_it_is_held_and_not_kept_forever():
    """Engines of one recipe share one network (an engine opened again retraced and held one more
    model each time); those no extractor holds are kept only for the last KEEP_RECENT recipes."""
    import gc
    import weakref

    from ris.extractor import ExtractConfig
    from ris.forward import KEEP_RECENT, forget_shared, shared_forward

    forget_shared()
    built: list = []
    first = shared_forward(ExtractConfig("vgg16", "none", input_size=32), _fake_build(built))
    assert shared_forward(ExtractConfig("vgg16", "none", input_size=32, flip=True, scales=[1.0]),
                          _fake_build(built)) is first  # flip runs outside the model; a list of scales
    assert shared_forward(ExtractConfig("vgg16", "none", input_size=32, pooling="gem"), _fake_build(built)) is not first
    gone = weakref.ref(first)
    del first
    for size in range(33, 33 + KEEP_RECENT):  # other recipes push it out of the recent ones
        shared_forward(ExtractConfig("vgg16", "none", input_size=size), _fake_build(built))
    built.clear()
    gc.collect()
    assert gone() is None  # nothing holds it: freed, not kept for the life of the process
    again = shared_forward(ExtractConfig("vgg16", "none", input_size=32), _fake_build(built))
    assert built == [again]
    forget_shared()


def test_a_weights_file_rewritten_in_place_is_built_again(tmp_path):
    import os

    from ris.extractor import ExtractConfig
    from ris.forward import forget_shared, shared_forward

    forget_shared()
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"one")
    built: list = []
    first = shared_forward(ExtractConfig("vgg16", str(path), input_size=32), _fake_build(built))
    assert shared_forward(ExtractConfig("vgg16", str(path), input_size=32), _fake_build(built)) is first
    path.write_bytes(b"other")
    os.utime(path, ns=(1, 1))
    assert shared_forward(ExtractConfig("vgg16", str(path), input_size=32), _fake_build(built)) is not first
    assert len(built) == 2
    forget_shared()
