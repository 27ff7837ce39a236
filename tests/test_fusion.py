"""Descriptor fusion (ris.fusion): the recipe round-trips through a database, a query is embedded
exactly as the fused database was, and single-backbone databases read as before."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ris.errors import DatabaseError, RisError
from ris.extract import ExtractOptions, extract_features
from ris.extractor import ExtractConfig
from ris.featuredb import FINGERPRINT_KEYS, FeatureDB, fingerprint
from ris.fusion import FusedExtractor, FusionConfig, PerPart, fuse, make_config
from ris.testing import attrs_through_hdf5, make_tiny_dataset

MOBILE = ExtractConfig(model="mobilenet_v2", weights="none", input_size=32, pooling="gap")
LITE = ExtractConfig(model="efficientnet_lite0", weights="none", input_size=48, pooling="gem")
FUSED = FusionConfig((MOBILE, LITE), (1.0, 0.5))
QUIET = ExtractOptions(progress=False, log=lambda s: None)


@pytest.mark.parametrize("cfg", [
    FUSED,
    FusionConfig((MOBILE, replace(LITE, scales=(1.0, 0.707, 0.5), layer="top_conv")), ()),
    FusionConfig((MOBILE, replace(MOBILE, input_size=64), LITE), (2.0, 1.0, 0.25)),
], ids=["two-weighted", "multiscale-part", "three-parts"])
def test_fused_recipe_round_trips_through_the_database(tmp_path, cfg):
    attrs = attrs_through_hdf5(tmp_path, cfg.to_attrs())
    rebuilt = ExtractConfig.from_attrs(attrs)  # the one reader of a database's recipe
    assert isinstance(rebuilt, FusionConfig) and rebuilt == cfg.resolved()
    assert attrs["model"] == cfg.model and "+" in attrs["pooling"]
    assert "fusion" in fingerprint(attrs)  # a head trained on fused features is bound to their recipe


def test_a_single_backbone_database_reads_as_before(tmp_path):
    """No 'fusion' attribute: an ExtractConfig, and the fingerprint has exactly the keys it always
    had, so heads saved before fusion existed still match their databases."""
    attrs = attrs_through_hdf5(tmp_path, MOBILE.to_attrs())
    assert "fusion" not in attrs
    cfg = ExtractConfig.from_attrs(attrs)
    assert type(cfg) is ExtractConfig and cfg == MOBILE
    assert set(fingerprint(attrs)) == set(FINGERPRINT_KEYS)


@pytest.mark.parametrize("fusion", ["{not json", json.dumps({"parts": [], "weights": []}),
                                    json.dumps({"parts": [MOBILE.to_attrs()], "weights": [1.0]}),
                                    json.dumps({"parts": [MOBILE.to_attrs(), {"model": "x"}], "weights": [1, 1]}),
                                    json.dumps({"parts": [MOBILE.to_attrs(), LITE.to_attrs()], "weights": [1, -1]})])
def test_a_damaged_fusion_recipe_is_a_database_error_naming_the_file(fusion):
    attrs = {**FUSED.to_attrs(), "fusion": fusion}
    with pytest.raises(DatabaseError, match="^x.h5"):
        ExtractConfig.from_attrs(attrs, "x.h5")


def test_options_split_per_part_or_apply_to_every_part():
    cfg = make_config("mobilenet_v2+efficientnet_lite0", weights="none", input_size=PerPart((32, 48)),
                      pooling="gap+gem", scales="1", fusion_weights="1+0.5")
    assert cfg == FUSED
    same = make_config("mobilenet_v2+mobilenet_v2", weights="none", input_size=32, pooling="gem")
    assert [p.input_size for p in same.parts] == [32, 32] and [p.pooling for p in same.parts] == ["gem", "gem"]
    assert same.weights == (1.0, 1.0)
    multi = make_config("mobilenet_v2+efficientnet_lite0", input_size="224+384", scales="1+1,0.707,0.5")
    assert [p.scales for p in multi.parts] == [(1.0,), (1.0, 0.707, 0.5)]
    assert make_config("mobilenet_v2", input_size=224) == ExtractConfig(model="mobilenet_v2", input_size=224)


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="mobilenet_v2+efficientnet_lite0", input_size="224+384+512"), "--resize"),
    (dict(model="mobilenet_v2+efficientnet_lite0", pooling="gap+gem+mac"), "--pool"),
    (dict(model="mobilenet_v2+efficientnet_lite0", pooling="none"), "--pool none"),
    (dict(model="mobilenet_v2+efficientnet_lite0", pooling="gap+median"), "median"),
    (dict(model="mobilenet_v2+efficientnet_lite0", fusion_weights="1"), "--fusion-weights"),
    (dict(model="mobilenet_v2+efficientnet_lite0", fusion_weights="1+0"), "> 0"),
    (dict(model="mobilenet_v2+efficientnet_lite0", fusion_weights="1+x"), "--fusion-weights"),
    (dict(model="mobilenet_v2+nope"), "nope"),
    (dict(model="mobilenet_v2", fusion_weights="1+1"), "fused --model"),
    (dict(model="mobilenet_v2", input_size="224+384"), "one backbone"),
])
def test_a_recipe_that_cannot_be_fused_is_one_clear_error(kwargs, match):
    with pytest.raises(RisError, match=match):
        make_config(**kwargs)


def test_fused_descriptor_is_the_weighted_parts_concatenated_and_normalised():
    pytest.importorskip("keras")
    from ris.extractor import FeatureExtractor, build_extractor

    fused = build_extractor(FUSED)
    assert isinstance(fused, FusedExtractor) and fused.max_size == 48
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    got = fused.embed(images)
    a = FeatureExtractor(MOBILE).embed(np.stack([_resized(im, 32) for im in images]))
    b = FeatureExtractor(LITE).embed(images)
    assert got.shape == (3, a.shape[1] + b.shape[1]) == (3, fused.output_shape[0])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, fuse([a, b], [1.0, 0.5]), atol=1e-5)
    # the weight is the share of each part: 1 : 0.5 in norm
    ratio = np.linalg.norm(got[:, : a.shape[1]], axis=1) / np.linalg.norm(got[:, a.shape[1]:], axis=1)
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-4)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    from ris.images import resize_square

    return resize_square(image, size)


@pytest.mark.slow
def test_a_fused_database_image_queried_as_a_file_finds_itself(tmp_path):
    """ris-extract writes the fused recipe; ris-search rebuilds it from the database and embeds a
    query file exactly as the database was made."""
    from ris.cli import extract as extract_cli
    from ris.search import SearchEngine

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=96)
    db = tmp_path / "f.h5"
    assert extract_cli.main(["--dataset", str(data), "--features-db", str(db),
                             "--model", "mobilenet_v2+efficientnet_lite0", "--weights", "none",
                             "--resize", "32+48", "--pool", "gap+gem", "--fusion-weights", "1+0.5",
                             "--no-progress"]) == 0
    with FeatureDB(db) as f:
        assert f.attrs["model"] == "mobilenet_v2+efficientnet_lite0" and f.attrs["pooling"] == "gap+gem"
        assert f.features.shape == (6, 1280 + 1280)
    with SearchEngine(db) as engine:
        assert isinstance(engine.extractor, FusedExtractor) and engine.extractor.config.weights == (1.0, 0.5)
        for image in sorted(data.glob("*.jpg"))[::3]:
            hit = engine.query(image, 1)[0]
            assert hit.image_id == image.name and hit.distance < 1e-3
    # --append with another recipe is refused; with the same one it continues the database
    extra = make_tiny_dataset(tmp_path / "d2", n_objects=1, views=2, size=96, seed=5)
    with pytest.raises(DatabaseError, match="made differently"):
        extract_features(extra, db, replace(FUSED, weights=(1.0, 1.0)), replace(QUIET, append=True))
    for image in extra.glob("*.jpg"):
        image.rename(data / f"new_{image.name}")
    extract_features(data, db, FUSED, replace(QUIET, append=True, labels="none"))
    with SearchEngine(db) as engine:
        assert len(engine.image_ids) == 8
        hit = engine.query(data / "new_ukbench00001.jpg", 1)[0]
        assert hit.image_id == "new_ukbench00001.jpg" and hit.distance < 1e-3


def test_a_per_part_value_in_an_error_reads_as_typed():
    with pytest.raises(RisError, match=r"--scales '1\+1,0.5\+2' has 3 parts for 2 models"):
        make_config("mobilenet_v2+efficientnet_lite0", scales=PerPart(((1.0,), (1.0, 0.5), (2.0,))))
    with pytest.raises(RisError, match=r"--pool 'gap\+gem' gives one value per part"):
        make_config("mobilenet_v2", pooling=PerPart(("gap", "gem")))


@pytest.mark.parametrize("args,flag", [
    (["--resize", "224+0"], "--resize"),
    (["--pool", "gap+median"], "--pool"),
    (["--scales", "1+1,-1"], "--scales"),
    (["--model", "mobilenet_v2+nope"], "--model"),
])
def test_per_part_options_are_checked_by_argparse(args, flag, capsys):
    from ris.cli import extract as extract_cli

    with pytest.raises(SystemExit) as exc:
        extract_cli.build_parser().parse_args(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"ris-extract: error: argument {flag}")


def test_per_part_options_parse():
    from ris.cli import extract as extract_cli

    a = extract_cli.build_parser().parse_args(["--model", "mobilenet_v2+efficientnet_lite2", "--resize", "224+384",
                                               "--pool", "gap+gem", "--scales", "1+1,0.707"])
    assert a.resize == PerPart((224, 384)) and a.pool == PerPart(("gap", "gem"))
    assert a.scales == PerPart(((1.0,), (1.0, 0.707)))
    b = extract_cli.build_parser().parse_args(["--resize", "224", "--pool", "gem", "--scales", "1,0.5"])
    assert b.resize == 224 and b.pool == "gem" and b.scales == (1.0, 0.5)
