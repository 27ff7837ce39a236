"""Poolings against independent NumPy references, on the model path (Keras) and the host path,
and the registry: a pooling added to ``POOLING`` is all it takes to extract with it."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from ris.errors import RisError
from ris.pooling import POOLING, Pooling, check_pooling, pool_numpy, rmac_regions

# Tolias et al.'s grid on a 7 x 7 map, worked out by hand from the paper's rule (square regions of
# side floor(2 * 7 / (l + 1)) at level l, l x l of them spread evenly, plus the whole map)
RMAC_7x7 = [(0, 0, 7, 7), (0, 0, 7, 7)] + [(y, x, 4, 4) for y in (0, 3) for x in (0, 3)] \
    + [(y, x, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4)]


def reference(maps: np.ndarray, method: str) -> np.ndarray:
    """Each pooling written out directly, one image and one channel at a time."""
    b, h, w, c = maps.shape
    out = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            v = maps[i, :, :, k].astype(np.float64)
            if method == "gap":
                out[i, k] = v.sum() / (h * w)
            elif method == "mac":
                out[i, k] = v.max()
            elif method == "gem":
                out[i, k] = (np.maximum(v, 1e-6) ** 3).mean() ** (1 / 3)
    if method == "rmac":
        regions = RMAC_7x7 if (h, w) == (7, 7) else rmac_regions(h, w)
        for y, x, rh, rw in regions:
            r = maps[:, y : y + rh, x : x + rw, :].astype(np.float64).max(axis=(1, 2))
            out += r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-6)
    return out


@pytest.fixture(scope="module")
def maps():
    return np.random.default_rng(0).uniform(0.0, 2.0, (3, 7, 7, 5)).astype(np.float32)


def test_every_pooling_has_a_reference():
    assert set(POOLING) == {"gap", "mac", "gem", "rmac"}  # a new pooling gets its reference above


@pytest.mark.parametrize("method", sorted(POOLING))
def test_host_pooling_matches_the_reference(maps, method):
    np.testing.assert_allclose(pool_numpy(maps, method), reference(maps, method), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pool_numpy(maps, method, block=2), pool_numpy(maps, method))


@pytest.mark.parametrize("method", sorted(POOLING))
def test_keras_layer_matches_the_reference(maps, method):
    keras = pytest.importorskip("keras")
    from ris.layers import GlobalPool

    inp = keras.Input(maps.shape[1:])
    model = keras.Model(inp, GlobalPool(method)(inp))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(maps)), reference(maps, method), rtol=1e-5, atol=1e-5)


def test_rmac_grid_on_a_square_and_an_oblong_map():
    assert list(rmac_regions(7, 7)) == RMAC_7x7
    for h, w in ((5, 9), (12, 7)):
        regions = rmac_regions(h, w)
        assert regions[0] == (0, 0, h, w)
        assert all(y >= 0 and x >= 0 and y + rh <= h and x + rw <= w and rh == rw for y, x, rh, rw in regions[1:])
        long_side = max(h, w)  # the regions of each level cover the long side
        ys_xs = [(y + rh if h > w else x + rw) for y, x, rh, rw in regions[1:]]
        assert max(ys_xs) == long_side


def test_rmac_needs_a_fixed_size_and_unknown_names_are_refused():
    keras = pytest.importorskip("keras")
    from ris.layers import GlobalPool

    with pytest.raises(ValueError, match="fixed input size"):
        GlobalPool("rmac")(keras.Input((None, None, 4)))
    GlobalPool("gem")(keras.Input((None, None, 4)))  # the others take any size
    for bad in ("none", "avg"):  # storing maps is not a pooling; a name a user chose: a RisError, one line
        with pytest.raises(RisError, match="gap, mac, gem, rmac"):
            GlobalPool(bad)
        with pytest.raises(RisError, match="choose one of"):
            pool_numpy(np.zeros((1, 2, 2, 3)), bad)
    check_pooling("none", allow_none=True)


def test_gem_exponent_is_a_weight_that_can_learn():
    keras = pytest.importorskip("keras")
    from ris.layers import GlobalPool

    layer = GlobalPool("gem", p=2.0, trainable_p=True)
    layer.build((None, 3, 3, 4))
    assert [w.name for w in layer.trainable_weights] == ["p"] and float(keras.ops.convert_to_numpy(layer.p)) == 2.0
    assert not GlobalPool("gap").weights and set(layer.get_config()) >= {"method", "p", "trainable_p", "eps"}


def test_models_saved_when_the_layers_lived_in_pooling_and_head_still_load(tmp_path):
    """Saved models name their custom layers' module; the layers moved to ris.layers."""
    keras = pytest.importorskip("keras")
    from ris.layers import Columns, GlobalPool, L2Normalize

    inp = keras.Input((4, 4, 6))
    out = L2Normalize()(Columns(0, 3)(GlobalPool("gem", p=4.0)(inp)))
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).uniform(size=(2, 4, 4, 6)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                text = data.decode()
                assert text.count('"ris.layers"') == 3
                text = text.replace('"ris.layers", "class_name": "Columns"', '"ris.head", "class_name": "Columns"')
                data = text.replace('"ris.layers"', '"ris.pooling"').encode()
                assert json.loads(data) and b'"ris.head"' in data
            dst.writestr(item, data)
    loaded = keras.saving.load_model(old, compile=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6)
    assert float(keras.ops.convert_to_numpy(next(w for w in loaded.weights if w.name == "p"))) == 4.0


def _min_pool(ops, x, p, eps):
    return ops.min(x, axis=(1, 2))


def test_a_new_pooling_is_one_entry_in_the_registry(monkeypatch, tmp_path):
    """What a newcomer adds: one ``POOLING`` entry. Host pooling, the Keras layer, extraction and
    ``ris-extract --pool`` then all offer it."""
    monkeypatch.setitem(POOLING, "min", Pooling(_min_pool, "minimum"))
    maps = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(pool_numpy(maps, "min"), maps.min(axis=(1, 2)))

    from ris.cli import extract as extract_cli

    assert extract_cli.build_parser().parse_args(["--pool", "min"]).pool == "min"
    pytest.importorskip("keras")
    from ris.extractor import ExtractConfig, FeatureExtractor

    cfg = dict(model="vgg16", weights="none", input_size=64)
    images = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    stored = FeatureExtractor(ExtractConfig(pooling="none", **cfg)).embed(images)  # the trunk's maps
    pooled = FeatureExtractor(ExtractConfig(pooling="min", **cfg)).embed(images)
    want = stored.min(axis=(1, 2))
    assert (want > 0).sum() > 100  # ReLU maps: min pooling is not all zeros here
    want /= np.linalg.norm(want, axis=1, keepdims=True)  # one scale: its descriptor is L2-normalised
    np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-5)
