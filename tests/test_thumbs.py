"""The thumbnails a head with a shallow branch eats (ris.thumbs): made from the database's image
files once, and a damaged JPEG among them named as ris-extract names it."""
from __future__ import annotations

import re

import numpy as np

from ris.featuredb import FeatureDB
from ris.testing import damage_jpeg, make_tiny_dataset
from ris.thumbs import cache_path, database_thumbnails


def database_with_a_damaged_jpeg(tmp_path):
    """(database, the damaged image's path): 2 objects x 3 views, its second image damaged, its
    dataset folder recorded as ris-extract records it."""
    from ris.featurewriter import FeatureWriter

    images = make_tiny_dataset(tmp_path / "images", n_objects=2, views=3, size=64)
    names = sorted(p.name for p in images.glob("*.jpg"))
    bad = damage_jpeg(images / names[1])
    x = np.random.default_rng(0).normal(size=(len(names), 16)).astype(np.float32)
    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap", "dataset_root": str(images)},
                      (16,), ["o0", "o1"])
    w.add(names, x / np.linalg.norm(x, axis=1, keepdims=True), [f"o{i // 3}" for i in range(len(names))])
    w.finish({})
    return tmp_path / "f.h5", bad


WARNING = r"warning: {}: corrupt JPEG data \(\d+ extraneous bytes before marker 0xd9\)"


def test_a_damaged_database_image_is_named_once_on_stderr_not_in_libjpegs_raw_line(tmp_path, capfd):
    """libjpeg printed 'Corrupt JPEG data: 84 extraneous bytes before marker 0xd9', unnamed, while
    the thumbnails were made (ris-train --shallow, a shallow head loaded by ris-search or ris-eval)."""
    db_path, bad = database_with_a_damaged_jpeg(tmp_path)
    capfd.readouterr()
    with FeatureDB(db_path) as db:
        thumbs = database_thumbnails(db, 8)
        err = capfd.readouterr().err
        assert thumbs.shape == (6, 8, 8, 3) and cache_path(db_path, 8).is_file()
        assert np.array_equal(database_thumbnails(db, 8), thumbs)  # from the cache: nothing decoded, nothing said
    assert re.fullmatch(WARNING.format(re.escape(str(bad))) + "\n", err), err
    assert capfd.readouterr().err == ""


def test_the_warning_goes_through_the_callers_log(tmp_path, capfd):
    """A command with its own prefix (ris-serve) or its own log (ris-train) says it there."""
    db_path, bad = database_with_a_damaged_jpeg(tmp_path)
    said: list[str] = []
    capfd.readouterr()
    with FeatureDB(db_path) as db:
        database_thumbnails(db, 8, log=said.append)
    assert len(said) == 1 and re.fullmatch(WARNING.format(re.escape(str(bad))), said[0]), said
    assert "JPEG" not in capfd.readouterr().err


def test_a_moved_image_folder_is_refused_with_advice_every_command_can_follow(tmp_path):
    """'cannot make thumbnails: ...: cannot read (...) (pass the images' current folder)': ris-eval
    and ris-train have no option to pass it. The line names the file first and the ways to say where
    the images are now."""
    import shutil

    import pytest

    from ris.errors import DatabaseError

    db_path, bad = database_with_a_damaged_jpeg(tmp_path)
    shutil.move(str(bad.parent), str(tmp_path / "moved"))
    with FeatureDB(db_path) as db, pytest.raises(DatabaseError) as refused:
        database_thumbnails(db, 8)
    said = str(refused.value)
    assert said.startswith(str(bad.parent)) and "cannot read" in said, said
    assert "ris-extract --sync --dataset DIR" in said and "--dataset-root DIR" in said and "pass the" not in said, said
