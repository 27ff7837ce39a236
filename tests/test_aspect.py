"""--aspect keep: images go into the network at their own aspect ratio (ris/aspect.py), in batches of
one shape, recorded in the recipe so that queries are described the same way."""
from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from ris.aspect import group_rows, input_shape, resize_input, stack_images
from ris.errors import RisError
from ris.extract import ExtractOptions, extract_features
from ris.extractor import ExtractConfig, FeatureExtractor, padded_rows
from ris.testing import attrs_through_hdf5, make_mixed_orientation_dataset

KEEP = ExtractConfig(model="vgg16", weights="none", layer="block5_pool", input_size=128, aspect="keep")
QUIET = dict(progress=False, log=lambda s: None)


def test_input_shapes_keep_the_aspect_ratio_at_about_the_squares_pixels():
    assert input_shape(480, 640, 224, "keep") == (192, 256)  # 4:3
    assert input_shape(640, 480, 224, "keep") == (256, 192)  # portrait: the same, turned
    assert input_shape(256, 384, 224, "keep") == (192, 288)  # 3:2
    assert input_shape(300, 300, 224, "keep") == (224, 224)
    assert input_shape(100, 1000, 224, "keep") == (128, 448)  # 10:1 goes in at 4:1 (3.5 after rounding)
    assert input_shape(480, 640, 224) == input_shape(480, 640, 224, "squash") == (224, 224)
    with pytest.raises(ValueError, match="unknown aspect"):
        input_shape(480, 640, 224, "stretch")
    img = np.zeros((192, 256, 3), np.uint8)
    assert resize_input(img, 224, "keep") is img  # already its input shape: no copy, no resampling
    assert resize_input(np.zeros((480, 640, 3), np.uint8), 224, "keep").shape == (192, 256, 3)


def test_images_of_several_shapes_are_grouped_by_shape_in_order():
    a, b = np.zeros((2, 3, 3)), np.ones((3, 2, 3))
    assert isinstance(stack_images([a, a]), np.ndarray) and isinstance(stack_images([a, b]), list)
    groups = group_rows([a, b, a, b, b])
    assert [rows.tolist() for rows, _ in groups] == [[0, 2], [1, 3, 4]]
    assert [batch.shape for _, batch in groups] == [(2, 2, 3, 3), (3, 3, 2, 3)]


@pytest.mark.parametrize("extra", [{}, {"scales": (1.0, 0.5), "flip": True}], ids=["plain", "scales-flip"])
def test_a_batch_of_several_shapes_is_described_as_each_image_alone(extra):
    """The rows come back in input order whatever the grouping, each as if embedded on its own."""
    rng = np.random.default_rng(0)
    shapes = [(96, 160), (160, 96), (128, 128), (96, 160)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    ext = FeatureExtractor(replace(KEEP, **extra))
    together = ext.embed(images)
    assert together.shape[0] == 4
    for img, row in zip(images, together):
        np.testing.assert_allclose(row, ext.embed(img[None])[0], atol=2e-5)
    assert np.abs(together[0] - together[3]).max() > 1e-3  # different images, different rows


def test_each_shape_of_a_mixed_batch_is_padded_only_to_its_bucket():
    assert [padded_rows(n, 64) for n in (1, 8, 9, 16, 17, 33, 64)] == [8, 8, 16, 16, 32, 64, 64]
    assert [padded_rows(n, 48) for n in (1, 6, 7, 13, 25)] == [6, 6, 12, 24, 48]
    assert padded_rows(3, 1) == 3  # a group larger than the batch (never asked) is left as it is


def test_a_mixed_batch_padded_for_jax_runs_bucketed_passes_and_gives_each_image_alone():
    """JAX compiles one program per batch shape, so short groups are padded with zero images; a
    mixed batch pads each shape's rows to its bucket (here 5 -> 8 and 2 -> 4 of a 32-row batch), not
    to 32 each."""
    rng = np.random.default_rng(1)
    shapes = [(96, 160)] * 5 + [(160, 96)] * 2
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    ext = FeatureExtractor(KEEP)
    alone = np.stack([ext.embed(img[None])[0] for img in images])
    ext._pad_batches = True  # as on JAX (the padding rows are computed, then dropped)
    seen = []
    ext._forward = [lambda x, fwd=fwd: (seen.append(x.shape[:3]), fwd(x))[1] for fwd in ext._forward]
    together = ext.embed_async(images, pad_to=32)()
    assert sorted(seen) == [(4, 160, 96), (8, 96, 160)]
    np.testing.assert_allclose(together, alone, atol=2e-5)
    seen.clear()
    ext.embed_async(images[:5], pad_to=32)()  # one shape (the last, short batch): the full batch, as before
    assert seen == [(32, 96, 160)]


def test_keep_is_recorded_only_when_on_and_refused_where_it_cannot_apply(tmp_path):
    from ris.fusion import make_config

    base = replace(KEEP, aspect="squash")
    assert "aspect" not in base.to_attrs() and ExtractConfig.from_attrs(base.to_attrs()).aspect == "squash"
    assert ExtractConfig.from_attrs(attrs_through_hdf5(tmp_path, KEEP.to_attrs())) == KEEP
    fused = make_config("vgg16+hsv_hist", weights="none", input_size="64", aspect="keep")
    assert [p.aspect for p in fused.parts] == ["keep", "squash"] and fused.to_attrs()["aspect"] == "keep"
    with pytest.raises(RisError, match="--aspect keep .*colour histogram"):
        make_config("hsv_hist", aspect="keep")
    with pytest.raises(RisError, match="--pool none .*aspect"):
        FeatureExtractor(replace(KEEP, pooling="none"))
    with pytest.raises(RisError, match="--aspect 'stretch'"):
        make_config("vgg16", aspect="stretch")


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_a_database_made_with_keep_describes_its_queries_the_same_way(tmp_path, decode):
    """Landscape, portrait and square images in one run: each database image queried from its file
    is found first at ~0; the processes' decoding gives the threads' rows; --append without
    --aspect keep is refused in one line naming it."""
    from ris.featuredb import FeatureDB
    from ris.search import SearchEngine

    data = make_mixed_orientation_dataset(tmp_path / "d")
    db = tmp_path / "f.h5"
    extract_features(data, db, KEEP, ExtractOptions(batch_size=4, decode=decode, workers=2, **QUIET))
    with FeatureDB(db) as f:
        assert f.attrs["aspect"] == "keep" and len(f) == 9
        stored = np.asarray(f.features[:])
    with SearchEngine(db) as engine:
        assert engine.extractor.aspect == "keep"
        for row in (0, 1, 2):  # landscape, portrait, square
            hit = engine.query(data / engine.image_ids[row], 1)[0]
            assert hit.row == row and hit.distance < 1e-3
        rgb = cv2.cvtColor(cv2.imread(str(data / engine.image_ids[1])), cv2.COLOR_BGR2RGB)
        np.testing.assert_allclose(engine.embed_array(rgb)[0], stored[1], atol=1e-4)  # the service's path
        turned = engine.embed_array(rgb, rotations=True)  # a portrait image's quarter turns are landscape
        assert turned.shape[0] == 4 and np.abs(turned[0] - stored[1]).max() < 1e-4
    squashed = tmp_path / "s.h5"
    extract_features(data, squashed, replace(KEEP, aspect="squash"), ExtractOptions(**QUIET))
    with FeatureDB(squashed) as f:
        assert np.abs(np.asarray(f.features[:]) - stored).max() > 1e-3  # it did change the input
    with pytest.raises(RisError, match="--aspect keep here, squash asked"):
        extract_features(data, db, replace(KEEP, aspect="squash"), ExtractOptions(append=True, **QUIET))


def test_ris_extract_aspect_keep_with_a_fused_colour_part(tmp_path, capsys):
    """From the command line, fused with a colour histogram (which squashes what it is given)."""
    from ris.cli.extract import main

    data = make_mixed_orientation_dataset(tmp_path / "d", n_objects=2)
    db = tmp_path / "f.h5"
    code = main(["--dataset", str(data), "--features-db", str(db), "--model", "vgg16+hsv_hist", "--weights", "none",
                 "--resize", "128+64", "--aspect", "keep", "--no-progress", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["extracted"] == 6
    from ris.search import SearchEngine

    with SearchEngine(db) as engine:
        assert engine.extractor.aspect == "keep"
        hit = engine.query(data / engine.image_ids[1], 1)[0]
        assert hit.row == 1 and hit.distance < 1e-3
