"""Tests for the offline demo dataset (ris.demo_data) and file fixtures (ris.testing)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ris import demo_data
from ris.testing import (
    VALID_BAD_IMAGES,
    make_bad_images,
    make_tiny_dataset,
    make_tiny_folders_dataset,
)


def _no_network(*args: object, **kwargs: object) -> None:
    raise OSError("network disabled in this test")


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block sockets, and stop skimage from turning a failed download into a pytest skip."""
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.make_demo_dataset(tmp_path_factory.mktemp("demo"), n_objects=3)


def test_bundled_photos_load_offline(offline: None) -> None:
    photos = demo_data.list_source_photos()
    assert len(photos) == len(demo_data.SOURCES) >= 40
    names = [n for n, _ in photos]
    assert len(set(names)) == len(names)
    for name, img in photos:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 120, name
        assert img.std() > 5, name  # not blank


def test_crops_do_not_overlap() -> None:
    by_loader: dict[str, list[tuple[int, int, int, int] | None]] = {}
    for _, loader, box in demo_data.SOURCES:
        by_loader.setdefault(loader, []).append(box)
    for loader, boxes in by_loader.items():
        if None in boxes:
            assert boxes == [None], f"{loader} used whole and cropped"
            continue
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (loader, a, b)


def test_make_views_shapes_and_determinism() -> None:
    img = demo_data.list_source_photos()[0][1]
    a = demo_data.make_views(img, 4, np.random.default_rng(1), size=(320, 240))
    b = demo_data.make_views(img, 4, np.random.default_rng(1), size=(320, 240))
    assert [v.shape for v in a] == [(240, 320, 3)] * 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # views differ from each other, but stay close to view 0 (same object)
    for v in a[1:]:
        diff = np.abs(v.astype(int) - a[0].astype(int)).mean()
        assert 2 < diff < 80


def test_demo_dataset_layout(small_demo: Path) -> None:
    files = sorted(p.name for p in small_demo.glob("*.jpg"))
    assert files == [f"ukbench{i:05d}.jpg" for i in range(12)]
    lines = (small_demo / "groundtruth.tsv").read_text().splitlines()
    assert lines[0] == "file\tobject_id"
    assert lines[1:] == [f"ukbench{i:05d}.jpg\t{i // 4}" for i in range(12)]
    assert (small_demo / "SOURCE.md").read_text().startswith("# Demo dataset")
    manifest = json.loads((small_demo / "manifest.json").read_text())
    assert manifest["params"]["n_objects"] == 3 and manifest["files"] == files
    img = cv2.imread(str(small_demo / files[5]))
    assert img is not None and img.shape == (480, 640, 3)


def test_demo_dataset_deterministic_and_idempotent(small_demo: Path, tmp_path: Path) -> None:
    other = demo_data.make_demo_dataset(tmp_path / "again", n_objects=3)
    for p in small_demo.glob("ukbench*.jpg"):
        assert p.read_bytes() == (other / p.name).read_bytes(), p.name
    mtimes = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    assert demo_data.make_demo_dataset(other, n_objects=3) == other
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == mtimes


def test_demo_dataset_rebuilds_on_change(tmp_path: Path) -> None:
    out = demo_data.make_demo_dataset(tmp_path, n_objects=2)
    (out / "manifest.json").unlink()  # as after an interrupted run
    demo_data.make_demo_dataset(out, n_objects=1, views=2)
    assert sorted(p.name for p in out.glob("*.jpg")) == ["ukbench00000.jpg", "ukbench00001.jpg"]
    assert json.loads((out / "manifest.json").read_text())["params"]["views"] == 2


def _cv2_ok(path: Path) -> bool:
    try:  # imdecode raises on an empty buffer; returns None on other broken data
        return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is not None
    except cv2.error:
        return False


def _pil_ok(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def test_bad_images_match_their_names(tmp_path: Path) -> None:
    files = make_bad_images(tmp_path)
    assert set(VALID_BAD_IMAGES) <= set(files)
    assert files["non_ascii"].name == "café_日本.jpg" and files["upper_ext"].name == "IMG.JPEG"
    assert files["zero_byte"].stat().st_size == 0
    for key, path in files.items():
        if key == "huge":  # do not decode 1.2 GB here; check the header instead
            assert path.stat().st_size < 200_000
            with pytest.raises(Image.DecompressionBombError):
                Image.open(path)
            continue
        want = key in VALID_BAD_IMAGES
        assert _cv2_ok(path) == want, key
        assert _pil_ok(path) == want, key
    assert cv2.imread(str(files["non_ascii"])) is not None  # imread copes with UTF-8 paths on Linux
    assert cv2.imread(str(files["png16"]), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(str(files["rgba_png"]), cv2.IMREAD_UNCHANGED).shape[2] == 4
    assert cv2.imread(str(files["gray_png"]), cv2.IMREAD_UNCHANGED).ndim == 2


def test_tiny_datasets(tmp_path: Path) -> None:
    d = make_tiny_dataset(tmp_path / "tiny", n_objects=3, views=4, size=64)
    names = sorted(p.name for p in d.glob("*.jpg"))
    assert names == [f"ukbench{i:05d}.jpg" for i in range(12)]
    lines = (d / "groundtruth.tsv").read_text().splitlines()
    assert lines[0] == "file\tobject_id" and lines[5] == "ukbench00004.jpg\t1"
    imgs = [cv2.imread(str(d / n)).astype(float) for n in names]
    assert imgs[0].shape == (64, 64, 3)
    # nearest neighbour (mean colour) of each image is a view of the same object
    feats = np.array([im.mean(axis=(0, 1)) for im in imgs])
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=2) + np.eye(12) * 1e9
    assert (dist.argmin(axis=1) // 4 == np.arange(12) // 4).all()

    f = make_tiny_folders_dataset(tmp_path / "folders", classes=("a", "b"), per_class=4)
    assert sorted(p.relative_to(f).as_posix() for p in f.rglob("*.jpg")) == [
        f"{c}/{c}_{k:02d}.jpg" for c in "ab" for k in range(4)
    ]


def test_query_view_is_new(small_demo: Path, tmp_path: Path) -> None:
    q = demo_data.make_query_view(small_demo, tmp_path / "queries", object_id=1)
    assert q.name == "query_001_astronaut_face.jpg"
    img = cv2.imread(str(q))
    assert img is not None and img.shape == (480, 640, 3)
    for i in range(4, 8):  # differs from every database view of that object
        assert not np.array_equal(img, cv2.imread(str(small_demo / f"ukbench{i:05d}.jpg")))


def test_the_demo_database_follows_the_sample_it_describes(tmp_path: Path) -> None:
    """``ris-demo --objects 10`` after a full run rebuilt the 40-image sample but kept the 164-row
    database (rows of files that were gone, scored and served); the database now holds exactly
    the sample's images."""
    from ris.demo import demo_database
    from ris.extractor import ExtractConfig
    from ris.featuredb import FeatureDB

    cfg = ExtractConfig(model="vgg16", weights="none", input_size=32)
    db = tmp_path / "feats.h5"
    for n in (3, 2, 3):
        images = demo_data.make_demo_dataset(tmp_path / "images", n_objects=n)
        demo_database(images, db, cfg, progress=False)
        with FeatureDB(db) as f:
            assert sorted(f.image_ids) == sorted(p.name for p in images.glob("*.jpg")) and len(f.image_ids) == 4 * n
    made = db.stat().st_mtime_ns
    demo_database(images, db, cfg, progress=False)  # in step: not extracted again
    assert db.stat().st_mtime_ns == made
