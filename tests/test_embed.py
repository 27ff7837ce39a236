"""Descriptors of stored features: off the shelf, and through a head of either kind, in blocks."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from ris.embed import embed_features, head_inputs, raw_descriptors
from ris.whiten import WhiteningHead


def test_raw_descriptors_pool_maps_and_normalise_rows():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 2, 2, 5)).astype(np.float32)
    gap = raw_descriptors(maps)
    np.testing.assert_allclose(gap, maps.mean((1, 2)) / np.linalg.norm(maps.mean((1, 2)), axis=1, keepdims=True),
                               rtol=1e-5)
    mac = raw_descriptors(maps, "mac")
    np.testing.assert_allclose(mac * np.linalg.norm(maps.max((1, 2)), axis=1, keepdims=True), maps.max((1, 2)),
                               rtol=1e-5)
    vectors = rng.normal(size=(4, 5)).astype(np.float32) * 7
    np.testing.assert_allclose(np.linalg.norm(raw_descriptors(vectors), axis=1), 1.0, rtol=1e-6)


def test_a_numpy_head_embeds_an_h5_dataset_block_by_block(tmp_path):
    rng = np.random.default_rng(1)
    head = WhiteningHead(rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    x = rng.normal(size=(11, 6)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = x
        out = embed_features(head, f["features"], batch=4)  # 4 + 4 + 3 rows
    np.testing.assert_allclose(out, head(x), rtol=1e-6)
    assert out.dtype == np.float32
    assert embed_features(head, x[:0]).shape == (0, 3)


def test_a_keras_head_is_run_in_inference_mode():
    keras = pytest.importorskip("keras")
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dropout(0.9)(keras.layers.Dense(2)(inp)))  # dropout only when training
    x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    expected = x @ model.layers[1].get_weights()[0] + model.layers[1].get_weights()[1]
    np.testing.assert_allclose(embed_features(model, x, batch=2), expected, rtol=1e-5, atol=1e-6)
    assert embed_features(model, x[:0]).shape == (0, 2)


def test_head_inputs_are_the_features_unless_the_head_has_a_shallow_branch():
    feats = np.ones((2, 3), np.float32)
    assert head_inputs({"config": {"shallow": 0}}, None, np.arange(2), feats) is feats
    assert head_inputs({}, None, np.arange(2), feats) is feats
