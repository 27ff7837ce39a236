"""The extraction recipe: one owner writes it into a database and reads it back, so queries are made
exactly as the database was; and rows whose features are not finite are reported, never written."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from ris.extract import ExtractConfig, extract_features
from ris.featuredb import FeatureDB, FeatureWriter
from ris.testing import make_tiny_dataset

BASE = ExtractConfig(model="vgg16", weights="none", layer="block5_pool", input_size=64)


def _through_hdf5(tmp_path: Path, attrs: dict) -> dict:
    """Attributes as a reader sees them after the writer stored them (types change on the way)."""
    w = FeatureWriter(tmp_path / "r.h5", attrs, (4,), ["a"])
    w.add(["x.jpg"], np.ones((1, 4), np.float32), ["a"])
    w.finish({})
    with FeatureDB(tmp_path / "r.h5") as db:
        return dict(db.attrs)


@pytest.mark.parametrize("cfg", [
    BASE,
    replace(BASE, model="mobilenet_v2", layer="block16_add", input_size=96),
    replace(BASE, weights="imagenet"),
    replace(BASE, weights="/some/where/my weights.pth"),
    replace(BASE, layer=None),
    replace(BASE, input_size=None),
    replace(BASE, scales=(0.707, 1.0)),
    replace(BASE, scales=(1.0, 0.707, 0.5)),
    replace(BASE, scales=(0.5, 1.0, 0.707)),
    replace(BASE, scales=(0.5, 0.75)),
    replace(BASE, pooling="gem"),
    replace(BASE, pooling="none"),
    replace(BASE, dtype="bfloat16"),
    replace(BASE, fold_batchnorm=False),
], ids=lambda c: f"{c.model}-{c.weights}-{c.layer}-{c.input_size}-{c.scales}-{c.pooling}-{c.dtype}-{c.fold_batchnorm}")
def test_recipe_round_trips_through_the_database(tmp_path, cfg):
    rebuilt = ExtractConfig.from_attrs(_through_hdf5(tmp_path, cfg.to_attrs()))
    assert rebuilt == cfg.resolved()
    assert rebuilt.scale_sizes() == cfg.scale_sizes()
    if cfg.input_size is not None:
        assert rebuilt == cfg  # nothing left to resolve: exactly the config that made it


def test_stored_input_size_is_the_base_size_not_the_first_scales():
    attrs = ExtractConfig(model="vgg16", input_size=512, scales=(0.707, 1.0)).to_attrs()
    assert attrs["input_size"] == 512 and list(attrs["scale_sizes"]) == [362, 512]


@pytest.mark.parametrize("scales,sizes", [((0.707, 1.0), [362, 512]), ((0.5, 0.707), [256, 362]),
                                          ((0.5, 1.0, 0.707), [256, 512, 362])])
def test_databases_written_before_the_fix_are_read_right(scales, sizes):
    """Older databases stored the first scale's size as input_size; scale_sizes tells the base."""
    old = {"model": "vgg16", "weights_arg": "none", "layer": "block5_pool", "input_size": sizes[0],
           "scales": list(scales), "scale_sizes": sizes, "pooling": "gap", "dtype": "float32"}
    cfg = ExtractConfig.from_attrs(old)
    assert cfg.input_size == 512 and cfg.scale_sizes() == sizes


def test_a_database_image_queried_is_found_at_distance_zero_with_scales_not_starting_at_1(tmp_path):
    from ris.search import SearchEngine

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=96)
    db = tmp_path / "f.h5"
    cfg = ExtractConfig(model="vgg16", weights="none", input_size=64, scales=(0.707, 1.0))
    extract_features(data, db, cfg, progress=False, log=lambda s: None)
    engine = SearchEngine(db)
    assert engine.extractor.sizes == [45, 64]
    image = sorted(data.glob("*.jpg"))[3]
    hit = engine.query(image, 1)[0]
    assert hit.image_id == image.name and hit.distance < 1e-3


class _NanOnSecondImage:
    """A stand-in extractor: 3-d mean-colour features, NaN for the second image it sees."""

    max_size = 32
    output_shape = (3,)

    def __init__(self):
        self.seen = 0

    def attrs(self):
        return ExtractConfig(model="vgg16", weights="none", input_size=32).to_attrs()

    def embed_async(self, images, pad_to=None):
        feats = images.reshape(len(images), -1, 3).mean(1).astype(np.float32) + 1.0
        rows = np.arange(self.seen, self.seen + len(images))
        feats[rows == 1] = np.nan
        self.seen += len(images)
        return lambda: feats


def test_rows_with_non_finite_features_are_listed_as_failed_not_written(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=48)
    db = tmp_path / "f.h5"
    s = extract_features(data, db, ExtractConfig(), batch_size=2, progress=False, log=lambda s: None,
                         extractor=_NanOnSecondImage())
    bad = sorted(p.name for p in data.glob("*.jpg"))[1]
    assert s.extracted == 3 and [i for i, _ in s.skipped] == [bad]
    assert "features are not finite (NaN/inf)" in s.skipped[0][1] and bad in s.skipped[0][1]
    with FeatureDB(db) as f:
        assert bad not in f.image_ids and len(f) == 3
        assert np.isfinite(f.features[:]).all()
        assert [i for i, _ in f.failures] == [bad]
    with h5py.File(db) as f:
        assert f.attrs["num_failed"] == 1
