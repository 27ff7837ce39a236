"""Discovery, labels and robust decoding of awkward files."""
import re

import cv2
import numpy as np
import pytest

from ris.errors import BadImage, RisError
from ris.images import decode_image, find_images, load_image, make_labels, read_label_tsv
from ris.testing import VALID_BAD_IMAGES, make_bad_images, make_tiny_folders_dataset


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("bad"))


def test_find_images_recursive_sorted_any_case(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "c.JPEG", "d.txt", ".hidden.jpg", "e/f/g.webp", "x.tif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    assert find_images(tmp_path) == ["a/1.jpg", "b/2.PNG", "c.JPEG", "e/f/g.webp", "x.tif"]


def test_find_images_errors(tmp_path):
    with pytest.raises(RisError, match="does not exist"):
        find_images(tmp_path / "missing")
    assert find_images(tmp_path) == []


@pytest.mark.parametrize("name", sorted(VALID_BAD_IMAGES - {"huge"}))
def test_valid_odd_images_decode_to_rgb_uint8(bad, name):
    img = load_image(bad[name], 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("name,reason", [("truncated", "truncated"), ("corrupt", "truncated|cannot decode"),
                                         ("zero_byte", "empty file"), ("text_as_jpg", "not a readable image"),
                                         ("huge", "too large")])
def test_bad_images_raise_one_clear_line(bad, name, reason):
    with pytest.raises(BadImage) as exc:
        decode_image(bad[name], target=224)
    msg = str(exc.value)
    assert str(bad[name]) in msg and re.search(reason, msg) and "\n" not in msg


def test_sixteen_bit_png_keeps_its_range(bad):
    img = decode_image(bad["png16"])
    assert img.max() > 200  # not crushed to 0..1 by a bad 16->8 bit conversion


def test_labels_ukbench_folders_tsv(tmp_path):
    ids = [f"ukbench{i:05d}.jpg" for i in range(8)]
    labels, names, mode = make_labels(ids, "auto")
    assert mode == "ukbench" and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and names == ["0", "1"]
    make_tiny_folders_dataset(tmp_path / "f", classes=("cats", "dogs"), per_class=2)
    ids = find_images(tmp_path / "f")
    labels, names, mode = make_labels(ids, "auto", tmp_path / "f")
    assert mode == "folders" and names == ["cats", "dogs"] and labels.tolist() == [0, 0, 1, 1]
    tsv = tmp_path / "gt.tsv"
    tsv.write_text("file\tclass_id\tclass_name\n0.jpg\t0\tafrica\n1.jpg\t1\tbeach\n")
    assert read_label_tsv(tsv) == {"0.jpg": "africa", "1.jpg": "beach"}
    labels, names, _ = make_labels(["sub/1.jpg", "0.jpg", "2.jpg"], str(tsv))
    assert labels.tolist() == [1, 0, -1] and names == ["africa", "beach"]


def test_label_file_errors(tmp_path):
    with pytest.raises(RisError, match="not found"):
        read_label_tsv(tmp_path / "none.tsv")
    (tmp_path / "one.tsv").write_text("onlyonecolumn\n")
    with pytest.raises(RisError, match="column"):
        read_label_tsv(tmp_path / "one.tsv")


@pytest.mark.parametrize("processes", [False, True])
def test_iter_decoded_keeps_order_reports_bad_files_and_stops_early(tmp_path, processes):
    from ris.extract import iter_decoded

    for i in range(11):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((30, 40, 3), 20 * i, np.uint8))
    (tmp_path / "05b.jpg").write_text("not an image")
    rels = sorted(p.name for p in tmp_path.iterdir())
    out = list(iter_decoded(tmp_path, rels, 16, workers=2, prefetch=3, processes=processes, chunk=2))
    assert [rel for rel, _, _ in out] == rels
    assert [rel for rel, _, err in out if err] == ["05b.jpg"]
    assert [int(img[0, 0, 0]) for _, img, _ in out if img is not None] == [20 * i for i in range(11)]
    early = iter_decoded(tmp_path, rels, 16, workers=2, prefetch=3, processes=processes, chunk=2)
    assert next(early)[0] == "00.png"
    early.close()  # the consumer stopping early must not hang or raise
