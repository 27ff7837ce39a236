"""The extraction recipe and the model built from it: one owner writes the recipe into a database and
reads it back, so queries are made exactly as the database was."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ris.errors import DatabaseError, RisError
from ris.extract import ExtractOptions, extract_features
from ris.extractor import ExtractConfig
from ris.testing import attrs_through_hdf5, make_tiny_dataset

BASE = ExtractConfig(model="vgg16", weights="none", layer="block5_pool", input_size=64)


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
    replace(BASE, flip=True),
], ids=lambda c: f"{c.model}-{c.weights}-{c.layer}-{c.input_size}-{c.scales}-{c.pooling}-{c.dtype}-{c.fold_batchnorm}"
                 f"{'-flip' if c.flip else ''}")
def test_recipe_round_trips_through_the_database(tmp_path, cfg):
    rebuilt = ExtractConfig.from_attrs(attrs_through_hdf5(tmp_path, cfg.to_attrs()))
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
    extract_features(data, db, cfg, ExtractOptions(progress=False, log=lambda s: None))
    engine = SearchEngine(db)
    assert engine.extractor.sizes == [45, 64]
    image = sorted(data.glob("*.jpg"))[3]
    hit = engine.query(image, 1)[0]
    assert hit.image_id == image.name and hit.distance < 1e-3


@pytest.mark.parametrize("damage", [
    {"input_size": "none"}, {"input_size": "big"}, {"scales": ["x"]}, {"model": None}, {"pooling": None},
    {"scales": [0.5, 0.7], "scale_sizes": [11, 13], "recipe_version": 1}, {"aspect": "stretch"},
])
def test_attributes_that_are_no_recipe_are_a_database_error_naming_the_source(damage):
    """A damaged or hand-made database is bad input: one DatabaseError naming it, not a ValueError
    from a conversion deep inside (which the CLIs now report as a bug)."""
    attrs = {k: v for k, v in BASE.to_attrs().items()}
    attrs.update(damage)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    with pytest.raises(DatabaseError, match="^x.h5: "):
        ExtractConfig.from_attrs(attrs, "x.h5")


@pytest.mark.parametrize("bad", [dict(scales=()), dict(scales=(1.0, 0.0)), dict(scales=(float("nan"),)),
                                 dict(input_size=0), dict(pooling="median"), dict(dtype="float16"),
                                 dict(pooling="none", scales=(1.0, 0.5)), dict(pooling="none", flip=True)])
def test_extractor_refuses_a_recipe_it_cannot_build_before_building(bad):
    from ris.extractor import FeatureExtractor

    with pytest.raises(RisError):
        FeatureExtractor(replace(BASE, **bad))


def test_flip_adds_the_mirrored_image_so_a_mirror_gets_the_same_descriptor():
    """--flip: each image's descriptor is its own (normalised) plus its mirror's, normalised: the
    descriptor of an image and of its mirror are then the same; without it they differ."""
    import numpy as np

    from ris.extractor import FeatureExtractor
    from ris.topk import l2_normalize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    plain, flipped = FeatureExtractor(BASE), FeatureExtractor(replace(BASE, flip=True))
    both = flipped.embed(images)
    np.testing.assert_allclose(both, flipped.embed(mirrored), atol=2e-5)
    np.testing.assert_allclose(both, l2_normalize(plain.embed(images) + plain.embed(mirrored)), atol=2e-5)
    assert np.abs(plain.embed(images) - plain.embed(mirrored)).max() > 1e-3


def test_flip_is_recorded_only_when_on_and_queries_follow_it(tmp_path):
    """Absent from a recipe without it (databases made before --flip keep matching theirs); a
    database made with it describes queries with it: a mirrored database image is found at 0."""
    import cv2

    from ris.fusion import make_config
    from ris.search import SearchEngine

    assert "flip" not in BASE.to_attrs() and ExtractConfig.from_attrs(BASE.to_attrs()).flip is False
    fused = make_config("vgg16+hsv_hist", weights="none", input_size="64", flip=True)
    assert [p.flip for p in fused.parts] == [True, False] and fused.to_attrs()["flip"] is True
    with pytest.raises(RisError, match="--flip .*colour histogram"):
        make_config("hsv_hist", flip=True)
    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=96)
    db = tmp_path / "f.h5"
    extract_features(data, db, replace(BASE, flip=True), ExtractOptions(progress=False, log=lambda s: None))
    engine = SearchEngine(db)
    assert engine.extractor.config.flip is True
    image = sorted(data.glob("*.jpg"))[3]
    mirror = tmp_path / "mirror.png"
    cv2.imwrite(str(mirror), cv2.flip(cv2.imread(str(image)), 1))
    hit = engine.query(mirror, 1)[0]
    assert hit.image_id == image.name and hit.distance < 1e-3
    engine.close()
    with pytest.raises(RisError, match="--flip on here, off asked"):
        extract_features(data, db, BASE, ExtractOptions(append=True, progress=False, log=lambda s: None))
