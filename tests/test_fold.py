"""BatchNorm folding keeps a network's output and folds only what it may."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ris.backbones.fold import fold_batchnorm  # noqa: E402


def _randomise_bn(model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
                               rng.uniform(0.2, 3, c)])


def _toy() -> keras.Model:
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="b1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, 2, padding="same", depth_multiplier=2, name="d1")(x)  # with bias
    x = keras.layers.BatchNormalization(epsilon=1e-5, name="b2")(x)
    y = keras.layers.Conv2D(16, 1, name="c2")(x)
    skip = keras.layers.BatchNormalization(name="b3")(y)  # c2 also feeds the Add: must stay unfolded
    x = keras.layers.Add()([y, skip])
    x = keras.layers.Conv2D(4, 1, activation="relu", name="c3")(x)  # activation before BN: not foldable
    x = keras.layers.BatchNormalization(name="b4")(x)
    return keras.Model(inp, x)


def test_fold_keeps_output_and_skips_unsafe_pairs() -> None:
    model = _toy()
    _randomise_bn(model)
    folded, n = fold_batchnorm(model)
    assert n == 2  # c1+b1 and d1+b2 only
    names = {type(l).__name__ for l in folded.layers}
    assert "FoldedBatchNorm" in names
    assert isinstance(folded.get_layer("b3"), keras.layers.BatchNormalization)
    assert isinstance(folded.get_layer("b4"), keras.layers.BatchNormalization)
    x = np.random.default_rng(1).normal(0, 1, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)


def test_nothing_to_fold_returns_the_model() -> None:
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp))
    same, n = fold_batchnorm(model)
    assert n == 0 and same is model


def test_extractor_features_unchanged_by_folding() -> None:
    from ris.extractor import ExtractConfig, FeatureExtractor
    from ris.forward import forget_shared

    keras.utils.set_random_seed(0)
    plain = FeatureExtractor(ExtractConfig(model="mobilenet_v2", weights="none", input_size=64, fold_batchnorm=False))
    forget_shared()  # its trunk is changed below: no later extractor of the recipe may get it
    _randomise_bn(plain.trunk)
    folded_trunk, n = fold_batchnorm(plain.trunk)
    assert n == 52  # every conv of torchvision's MobileNetV2 is followed by its own BN
    imgs = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3)).astype(np.uint8)
    x = plain.backbone.preprocess(imgs)
    a, b = np.asarray(plain.trunk(x)), np.asarray(folded_trunk(x))
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    ext = FeatureExtractor(ExtractConfig(model="mobilenet_v2", weights="none", input_size=64))
    assert ext.batchnorm_folded == 52 and ext.attrs()["batchnorm_folded"] == 52


def test_a_fold_that_changes_the_output_is_refused(monkeypatch) -> None:
    import ris.backbones.fold as fold

    model = _toy()
    _randomise_bn(model)
    real = fold._folded_weights
    monkeypatch.setattr(fold, "_folded_weights", lambda conv, bn: (real(conv, bn)[0] * 2, real(conv, bn)[1]))
    with pytest.warns(UserWarning, match="unfolded"):
        same, n = fold.fold_batchnorm(model)
    assert same is model and n == 0
