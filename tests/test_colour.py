"""ris.colour: the HSV colour histogram, alone and as a fusion part, from recipe to search."""
from __future__ import annotations

import numpy as np
import pytest

from ris.colour import COLOUR_DESCRIPTORS, ColourExtractor, colour_config
from ris.errors import RisError
from ris.extractor import ExtractConfig, build_extractor
from ris.featuredb import FeatureDB
from ris.fusion import FusedExtractor, FusionConfig, PerPart, make_config
from ris.testing import attrs_through_hdf5, make_tiny_dataset

HIST = ExtractConfig(model="hsv_hist")


def _images(seed: int = 0, n: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_histogram_is_hellinger_normalised_and_ignores_turns_and_pixel_order():
    ext = ColourExtractor(HIST)
    imgs = _images(size=224)
    got = ext.embed(imgs)
    assert got.shape == (3, 1000) and got.dtype == np.float32 and np.all(got >= 0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose((got**2).sum(1), 1.0, rtol=1e-5)  # squares are the L1-normalised counts
    turned = np.ascontiguousarray(np.rot90(imgs, 1, axes=(1, 2)))
    np.testing.assert_allclose(ext.embed(turned), got, atol=1e-6)
    shuffled = imgs.reshape(3, -1, 3)[:, np.random.default_rng(1).permutation(224 * 224)].reshape(imgs.shape)
    np.testing.assert_allclose(ext.embed(shuffled), got, atol=1e-6)


@pytest.mark.parametrize("name", sorted(COLOUR_DESCRIPTORS))
def test_colours_that_differ_are_far_apart_and_a_colour_is_its_own_nearest(name):
    red, blue = np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 200
    vec = ColourExtractor(ExtractConfig(model=name)).embed(np.concatenate([red, blue, red]))
    assert vec.shape == (3, COLOUR_DESCRIPTORS[name].dims)
    assert vec[0] @ vec[1] < 1e-6 and vec[0] @ vec[2] == pytest.approx(1.0)


def test_images_of_another_size_are_resized_to_the_parts_size():
    ext = ColourExtractor(HIST)
    big = np.repeat(np.repeat(_images(size=56), 4, axis=1), 4, axis=2)  # 224 px, each pixel 4 x 4
    assert ext.max_size == 224
    np.testing.assert_allclose(ext.embed(big), ColourExtractor(ExtractConfig(model="hsv_hist", input_size=56))
                               .embed(_images(size=56)), atol=1e-6)


def test_the_colour_recipe_round_trips_and_rebuilds_its_extractor(tmp_path):
    ext = build_extractor(HIST)
    assert isinstance(ext, ColourExtractor)
    attrs = attrs_through_hdf5(tmp_path, ext.attrs())
    assert attrs["pooling"] == "hist" and attrs["model"] == "hsv_hist" and "Hellinger" in attrs["preprocessing"]
    rebuilt = ExtractConfig.from_attrs(attrs)
    assert rebuilt == ext.recipe
    assert isinstance(build_extractor(rebuilt), ColourExtractor)


def test_a_setting_that_means_nothing_for_a_histogram_is_refused_in_one_line():
    for kwargs, flag in (({"scales": (1.0, 0.5)}, "--scales"), ({"pooling": "gem"}, "--pool"),
                         ({"layer": "block_5"}, "--layer"), ({"weights": "w.pth"}, "--weights")):
        with pytest.raises(RisError, match=f"hsv_hist is a colour histogram: .*{flag}"):
            colour_config(ExtractConfig(model="hsv_hist", **kwargs))


def test_fusion_options_given_once_pass_a_colour_part_by_and_per_part_ones_are_checked():
    cfg = make_config("mobilenet_v2+hsv_hist", weights="none", input_size=PerPart((32, 48)), pooling="gem",
                      scales="1,0.707", fusion_weights="1+0.5")
    assert isinstance(cfg, FusionConfig) and cfg.weights == (1.0, 0.5)
    cnn, hist = cfg.parts
    assert cnn.pooling == "gem" and cnn.scales == (1.0, 0.707) and cnn.weights == "none"
    assert hist.pooling == "hist" and hist.scales == (1.0,) and hist.input_size == 48
    with pytest.raises(RisError, match="takes no --pool"):
        make_config("mobilenet_v2+hsv_hist", pooling="gap+gem")
    alone = make_config("hsv_hist", pooling="gap", dtype="bfloat16")
    assert alone.pooling == "hist" and alone.dtype == "float32"


def test_the_command_refuses_layers_of_a_histogram():
    from ris.cli import extract as extract_cli

    with pytest.raises(RisError, match="hsv_hist is a colour histogram, not a CNN"):
        extract_cli.main(["--model", "hsv_hist", "--list-layers"])


@pytest.mark.slow
def test_a_colour_fused_database_image_queried_as_a_file_or_turned_finds_itself(tmp_path):
    """ris-extract writes the CNN + colour recipe; ris-search rebuilds both parts and embeds a query
    file exactly as the database was made, upright and with --rotations."""
    from ris.cli import extract as extract_cli
    from ris.search import SearchEngine

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=96)
    db = tmp_path / "f.h5"
    assert extract_cli.main(["--dataset", str(data), "--features-db", str(db), "--model", "mobilenet_v2+hsv_hist",
                             "--weights", "none", "--resize", "32+64", "--fusion-weights", "1+0.5",
                             "--no-progress"]) == 0
    with FeatureDB(db) as f:
        assert f.attrs["model"] == "mobilenet_v2+hsv_hist" and f.attrs["pooling"] == "gap+hist"
        assert f.features.shape == (6, 1280 + COLOUR_DESCRIPTORS["hsv_hist"].dims)
    for rotations in (False, True):
        with SearchEngine(db, rotations=rotations) as engine:
            assert isinstance(engine.extractor, FusedExtractor)
            assert isinstance(engine.extractor.parts[1], ColourExtractor)
            for image in sorted(data.glob("*.jpg"))[::2]:
                hit = engine.query(image, 1)[0]
                assert hit.image_id == image.name and hit.distance < 1e-3

