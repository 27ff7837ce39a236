"""ris.verify: RootSIFT + RANSAC geometric verification of shortlists, and its local-feature sidecar."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from ris.verify import (LocalFeatures, Verifier, inliers, root_sift, sidecar_path,  # noqa: E402
                        sift_of_image)


def _textured(seed=0, size=320):
    from skimage import data

    img = (data.astronaut(), data.chelsea(), data.coffee())[seed]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def _warp(img, angle=25.0, scale=0.8):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def _lf(img):
    xy, d = sift_of_image(img, 500, 512)
    return xy.astype(np.float32), root_sift(d)


def test_same_object_under_rotation_and_scale_has_many_inliers_another_has_few():
    a, b = _textured(0), _textured(1)
    same = inliers(_lf(a), _lf(_warp(a)))
    other = inliers(_lf(a), _lf(b))
    assert same >= 40 and other < 12, (same, other)


def test_verified_candidate_moves_up_unverified_order_is_kept():
    a, b, c = _textured(0), _textured(1), _textured(2)
    feats = [_lf(x) for x in (b, c, _warp(a))]
    xy = np.concatenate([f[0] for f in feats]).astype(np.float16)
    # store raw-like SIFT: the sidecar keeps uint8 SIFT, RootSIFT is made on reading
    raw = [sift_of_image(x, 500, 512)[1] for x in (b, c, _warp(a))]
    offsets = np.cumsum([0] + [len(r) for r in raw])
    lf = LocalFeatures(offsets.astype(np.int64), xy, np.concatenate(raw))
    v = Verifier(lf, np.arange(3), {"k": 3, "features": 500, "side": 512, "ratio": 0.8, "min_inliers": 12,
                                    "cap": 50, "weight": 2.0, "threshold": 8.0})
    order = v.rerank(_lf(a), np.array([0, 1, 2]))
    assert order[0] == 2 and order.tolist()[1:] == [0, 1]
    assert v.describe()["pairs"] == 3 and v.local.bytes_per_image() > 0


def test_local_features_honour_exif_orientation(tmp_path):
    from PIL import Image

    from ris.verify import sift_of_file

    upright = _textured(0, 256)[:, :200]  # not square: a rotation shows in the coordinates
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=95)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # stored turned; EXIF 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    a, b = sift_of_file(tmp_path / "up.jpg"), sift_of_file(tmp_path / "rot.jpg")
    assert a[0][:, 0].max() < 200 and b[0][:, 0].max() < 200  # both 200 wide: upright
    assert abs(len(a[1]) - len(b[1])) < 0.2 * len(a[1])


@pytest.mark.slow
def test_eval_verify_builds_the_sidecar_once_and_scores(tmp_path, capsys):
    import json

    from PIL import Image

    from ris.cli import eval as eval_cli
    from ris.cli import extract as extract_cli
    from ris.cli.common import run

    d = tmp_path / "imgs"
    d.mkdir()
    base = [_textured(0, 200), _textured(1, 200)]
    lines = ["file\tobject_id"]
    for o, img in enumerate(base):
        for v in range(3):
            name = f"o{o}_{v}.jpg"
            Image.fromarray(_warp(img, 15 * v, 1 - 0.1 * v)).save(d / name, quality=90)
            lines.append(f"{name}\t{o}")
    (d / "groundtruth.tsv").write_text("\n".join(lines) + "\n")
    db = tmp_path / "f.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(d), "--features-db", str(db), "--model", "vgg16",
                                                 "--weights", "none", "--resize", "64", "--no-progress",
                                                 "--local-features"]) == 0
    side = sidecar_path(db, 500, 512)
    assert side.is_file()
    stamp = side.stat().st_mtime_ns
    capsys.readouterr()
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--split", "all", "--verify", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert side.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert r["verify"]["bytes_per_image"] > 0 and r["verify"]["pairs"] == 6 * 5
    assert r["raw"]["map"] == 1.0  # random-weight CNN features, rescued by geometry
    # the other parameters from the command line; a typo is one line naming the known keys (exit 2)
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--split", "all", "--verify", "5",
                                           "--verify-settings", "min_inliers=4,ratio=0.7", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verify"]["params"]["min_inliers"] == 4 and r["verify"]["params"]["ratio"] == 0.7
    assert side.stat().st_mtime_ns == stamp  # same features and side: the same local features
    with pytest.raises(SystemExit) as exc:
        eval_cli.build_parser().parse_args(["--features-db", str(db), "--verify", "5", "--verify-settings", "min_inlier=4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("ris-eval: error: argument --verify-settings: 'min_inlier=4' is "
                                                  "not KEY=VALUE with KEY one of features, side, ratio, min_inliers")


def test_verify_settings_parse_and_refuse_in_one_line():
    import argparse

    from ris.verify import parse_settings

    assert parse_settings("min_inliers=12, ratio=0.75,features=800") == {"min_inliers": 12, "ratio": 0.75,
                                                                          "features": 800}
    assert parse_settings("") == {}
    for bad, why in (("k=5", "K is --verify"), ("ratio", "not KEY=VALUE"), ("ratio=abc", "not a number"),
                     ("side=0", ">= 1"), ("ratio=nan", "finite")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse_settings(bad)


def test_local_features_follow_the_dataset_root_and_images_missing_when_they_were_made(tmp_path, capsys):
    """``ris-search --verify --dataset-root moved/`` read the images from the folder the database was
    made from (refused: "not there"); an image missing when the local features were made was
    cached as having none, for good and without a word."""
    import shutil

    from PIL import Image

    from ris.cli import extract as extract_cli
    from ris.cli import search as search_cli
    from ris.cli.common import run

    d = tmp_path / "imgs"
    d.mkdir()
    for o in range(2):
        for v in range(2):
            Image.fromarray(_warp(_textured(o, 200), 15 * v, 1 - 0.1 * v)).save(d / f"o{o}_{v}.jpg", quality=90)
    db = tmp_path / "f.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(d), "--features-db", str(db), "--model", "vgg16",
                                                 "--weights", "none", "--resize", "64", "--no-progress"]) == 0
    moved = tmp_path / "moved"
    shutil.move(d, moved)
    gone = tmp_path / "o1_1.jpg"
    shutil.move(moved / "o1_1.jpg", gone)
    search = ["--image", str(moved / "o0_0.jpg"), "--features-db", str(db), "--verify", "3", "--dataset-root",
              str(moved), "--json"]
    capsys.readouterr()
    assert run("ris-search", search_cli.main, search) == 0
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err and "o1_1.jpg" in err
    sidecar = sidecar_path(db, 500, 512)
    made = sidecar.stat().st_mtime_ns
    assert run("ris-search", search_cli.main, search) == 0  # still missing: the cache serves
    assert sidecar.stat().st_mtime_ns == made
    shutil.move(gone, moved / "o1_1.jpg")
    capsys.readouterr()
    assert run("ris-search", search_cli.main, search) == 0  # back: made again, no warning
    assert sidecar.stat().st_mtime_ns != made and "could not be read" not in capsys.readouterr().err


def test_a_damaged_database_jpeg_is_named_when_its_local_features_are_made(tmp_path, capfd):
    """--verify makes the database's local features from its files on first use: a JPEG with junk
    before its end marker printed libjpeg's unnamed line ('Corrupt JPEG data: 87 extraneous bytes
    before marker 0xd9'). Named now, as ris-extract named it; its local features are made."""
    import re

    from PIL import Image

    from ris.featuredb import FeatureDB
    from ris.verify import database_local_features

    import ris

    d = tmp_path / "imgs"
    d.mkdir()
    for o in range(2):
        Image.fromarray(_textured(o, 200)).save(d / f"o{o}.jpg", quality=90)
    jpeg = (d / "o1.jpg").read_bytes()
    (d / "o1.jpg").write_bytes(jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:])
    db = tmp_path / "f.h5"
    ris.build_database(d, db, model="vgg16", weights="none", input_size=64, progress=False, labels="none")
    capfd.readouterr()
    with FeatureDB(db) as f:
        lf = database_local_features(f, db)
        row = f.image_ids.index("o1.jpg")
    err = capfd.readouterr().err
    assert re.fullmatch(rf"warning: {re.escape(str(d / 'o1.jpg'))}: corrupt JPEG data \(\d+ extraneous bytes "
                        r"before marker 0xd9\)\n", err), err
    assert len(lf.of(row)[1]) > 50
