"""HDF5 feature database: layout, atomic rename, resume after interruption, append."""
import os

import h5py
import numpy as np
import pytest

from ris.errors import DatabaseError
from ris.featuredb import FeatureDB, FeatureWriter, partial_path

ATTRS = {"model": "m", "weights": "w", "layer": "l", "input_size": 32, "scales": [1.0], "pooling": "gap"}


def test_write_then_read(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (4,), ["x", "y"])
    w.add(["a.jpg", "b/ü.jpg"], np.ones((2, 4), np.float32), ["x", "y"])
    w.add_failures([("bad.jpg", "bad.jpg: empty file")])
    assert not path.exists() and partial_path(path).exists()  # never half-written under the final name
    w.finish()
    assert path.exists() and not partial_path(path).exists()
    with FeatureDB(path) as db:
        assert db.image_ids == ["a.jpg", "b/ü.jpg"]
        assert db.labels.tolist() == [0, 1]
        assert db.label_names == ["x", "y"]
        assert db.failures == [("bad.jpg", "bad.jpg: empty file")]
        assert db.features.dtype == np.float32 and db.features.chunks is not None
        assert db.features.maxshape[0] is None
        assert db.attrs["complete"] and db.attrs["model"] == "m"
        np.testing.assert_array_equal(db.read_rows(np.array([1, 0])), np.ones((2, 4)))


def test_resume_keeps_only_committed_rows(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3), ["", ""])
    # simulate a crash in the middle of the next batch: data resized but rows_done not bumped
    w.f["features"].resize(5, axis=0)
    w.f["image_ids"].resize(5, axis=0)
    w.close()
    w2 = FeatureWriter(path, ATTRS, (3,), [])
    assert w2.resumed_rows == 2 and w2.done_ids() == {"a", "b"}
    w2.add(["c"], np.full((1, 3), 9, np.float32), [""])
    w2.finish()
    with FeatureDB(path) as db:
        assert db.image_ids == ["a", "b", "c"]
        assert db.features[2].tolist() == [9, 9, 9]


def test_resume_refuses_different_features(tmp_path):
    path = tmp_path / "f.h5"
    FeatureWriter(path, ATTRS, (3,), []).close()
    with pytest.raises(DatabaseError, match="made differently"):
        FeatureWriter(path, dict(ATTRS, model="other"), (3,), [])


def test_a_changed_recipe_is_refused_in_one_short_line_that_says_what_differs(tmp_path):
    """--append after --preset accurate changed (a colour part added): the refusal names the
    options that differ as the command line spells them, not the stored JSON, and the way on."""
    from ris.extractor import ExtractConfig
    from ris.fusion import FusionConfig

    cnn = (ExtractConfig(model="mobilenet_v2", input_size=224), ExtractConfig(model="efficientnet_lite2",
                                                                               input_size=384, pooling="gem"))
    old = FusionConfig(cnn, (1.0, 0.5)).to_attrs()
    new = FusionConfig((*cnn, ExtractConfig(model="hsv_hist", input_size=224, pooling="hist", weights="none")),
                       (1.0, 0.5, 0.5)).to_attrs()
    path = tmp_path / "f.h5"
    FeatureWriter(path, old, (2560,), []).close()
    with pytest.raises(DatabaseError) as err:
        FeatureWriter(path, new, (3560,), [])
    line = str(err.value)
    assert "\n" not in line and len(line) < 600 and "{" not in line, line
    assert "--model mobilenet_v2+efficientnet_lite2 here, mobilenet_v2+efficientnet_lite2+hsv_hist asked" in line
    assert "--resize 224+384 here, 224+384+224 asked" in line and "--pool gap+gem here, gap+gem+hist asked" in line
    assert "--fusion-weights 1+0.5 here, 1+0.5+0.5 asked" in line and "--sync" in line


def test_a_recipe_changed_only_inside_its_parts_names_that_change_alone(tmp_path):
    """--preset accurate gained --flip: the parts' recipes differ, the fusion weights do not. The
    refusal said '--fusion-weights 1+0.5+0.5 here, 1+0.5+0.5 asked' beside '--flip off here, on
    asked'; it names only what differs."""
    from dataclasses import replace

    from ris.extractor import ExtractConfig
    from ris.fusion import FusionConfig

    parts = (ExtractConfig(model="mobilenet_v2", input_size=224), ExtractConfig(model="efficientnet_lite2",
                                                                                 input_size=384, pooling="gem"))
    old = FusionConfig(parts, (1.0, 0.5)).to_attrs()
    new = FusionConfig(tuple(replace(p, flip=True) for p in parts), (1.0, 0.5)).to_attrs()
    path = tmp_path / "f.h5"
    FeatureWriter(path, old, (2560,), []).close()
    with pytest.raises(DatabaseError) as err:
        FeatureWriter(path, new, (2560,), [])
    line = str(err.value)
    assert "--flip off here, on asked" in line and "--fusion-weights" not in line, line


def test_damaged_partial_is_restarted(tmp_path):
    path = tmp_path / "f.h5"
    partial_path(path).write_bytes(b"not hdf5 at all")
    w = FeatureWriter(path, ATTRS, (3,), [])
    assert w.resumed_rows == 0 and getattr(w, "damaged_partial", None)
    w.close()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(DatabaseError, match="not found"):
        FeatureDB(tmp_path / "nope.h5")
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(DatabaseError, match="not a readable HDF5"):
        FeatureDB(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["something"] = 1
    with pytest.raises(DatabaseError, match="not a ris feature database"):
        FeatureDB(tmp_path / "y.h5")


def _finished(path, rows=2):
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add([f"{i}.jpg" for i in range(rows)], np.ones((rows, 3), np.float32), [""] * rows)
    return w.finish()


def test_reader_refuses_an_incomplete_database(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a.jpg"], np.ones((1, 3), np.float32), [""])
    w.close()
    partial_path(path).rename(path)  # e.g. copied away while an extraction was running
    with pytest.raises(DatabaseError, match="incomplete: an extraction was interrupted or is still running") as e:
        FeatureDB(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_rows_that_disagree(tmp_path):
    path = _finished(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        f["image_ids"].resize(1, axis=0)
    with pytest.raises(DatabaseError, match="incomplete"):
        FeatureDB(path)
    path = _finished(tmp_path / "g.h5")
    with h5py.File(path, "a") as f:
        f.attrs["rows_done"] = 5
    with pytest.raises(DatabaseError, match="incomplete"):
        FeatureDB(path)


def test_reader_names_missing_attributes_and_datasets(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:  # the datasets, no attributes
        f["features"] = np.ones((2, 3), np.float32)
        f["image_ids"] = np.array(["a", "b"], dtype=object)
        f["labels"] = np.array([0, 1])
    with pytest.raises(DatabaseError, match=r"missing attribute\(s\) model, weights") as e:
        FeatureDB(path)
    assert str(path) in str(e.value)
    with h5py.File(path, "a") as f:
        del f["labels"]
    with pytest.raises(DatabaseError, match="missing dataset"):
        FeatureDB(path)


def test_only_regular_files_are_databases(tmp_path):
    (tmp_path / "d.h5").mkdir()
    with pytest.raises(DatabaseError, match="is a directory"):
        FeatureDB(tmp_path / "d.h5")
    with pytest.raises(DatabaseError, match="is a directory"):
        FeatureWriter(tmp_path / "d.h5", ATTRS, (3,), [], append=True)
    os.mkfifo(tmp_path / "p.h5")
    with pytest.raises(DatabaseError, match="not a regular file"):
        FeatureDB(tmp_path / "p.h5")


def test_existing_database_needs_append_or_overwrite(tmp_path):
    path = _finished(tmp_path / "f.h5")
    with pytest.raises(DatabaseError, match="already exists; use --append"):
        FeatureWriter(path, ATTRS, (3,), [])


def test_append_to_a_damaged_database_names_it(tmp_path):
    path = _finished(tmp_path / "f.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DatabaseError) as e:
        FeatureWriter(path, ATTRS, (3,), [], append=True)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "damaged" in msg and "\n" not in msg
    assert not partial_path(path).exists() and path.read_bytes() == data[: len(data) // 2]


def test_second_writer_is_refused_and_leaves_the_first_ones_files(tmp_path):
    from ris.sidecars import DatabaseLocked

    path = tmp_path / "f.h5"
    first = FeatureWriter(path, ATTRS, (3,), [])
    first.add(["a.jpg"], np.ones((1, 3), np.float32), [""])
    before = partial_path(path).read_bytes()
    partial_path(path).write_bytes(before)  # even a partial that looks damaged to others is not theirs
    for kwargs in ({}, {"append": True}, {"overwrite": True}):
        with pytest.raises(DatabaseLocked, match=f"pid {os.getpid()}"):
            FeatureWriter(path, ATTRS, (3,), [], **kwargs)
    assert partial_path(path).read_bytes() == before
    first.close()


def test_overwrite_keeps_the_old_database_until_the_new_one_is_complete(tmp_path):
    path = _finished(tmp_path / "f.h5", rows=2)
    w = FeatureWriter(path, ATTRS, (3,), [], overwrite=True)
    w.add(["new.jpg"], np.zeros((1, 3), np.float32), [""])
    w.close()  # interrupted
    with FeatureDB(path) as db:
        assert len(db) == 2
    w = FeatureWriter(path, ATTRS, (3,), [], overwrite=True)  # the same command again resumes
    assert w.resumed_rows == 1
    w.add(["new2.jpg"], np.zeros((1, 3), np.float32), [""])
    w.finish()
    with FeatureDB(path) as db:
        assert db.image_ids == ["new.jpg", "new2.jpg"]


NON_UTF8 = "caf\udce9.jpg"  # b'caf\xe9.jpg' as Python gives it on Linux


def test_non_utf8_names_are_stored_losslessly(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, dict(ATTRS, dataset_root=str(tmp_path / "dossier\udce9")), (3,), ["\udcff"])
    w.add([NON_UTF8, "ü.jpg"], np.ones((2, 3), np.float32), ["\udcff", ""])
    w.add_failures([("x\udc80.jpg", "x\udc80.jpg: empty file")])
    assert w.done_ids() == {NON_UTF8, "ü.jpg", "x\udc80.jpg"}
    w.finish()
    with FeatureDB(path) as db:
        assert db.image_ids == [NON_UTF8, "ü.jpg"]
        assert db.failures == [("x\udc80.jpg", "x\udc80.jpg: empty file")]
        assert db.label_names == ["\udcff"]
        assert db.dataset_root == str(tmp_path / "dossier\udce9")
    with h5py.File(path) as f:  # the raw bytes of the name, in the same UTF-8 dataset
        assert f["image_ids"][0] == b"caf\xe9.jpg"


def test_fingerprint_reads_nested_scales_the_same_from_the_file_and_from_the_writer(tmp_path):
    """A fused database stores its per-part scales as JSON text (HDF5 has no ragged attributes);
    the writer compares the file's raw attributes with its own, so --append must see them equal."""
    import h5py

    from ris.featuredb import FeatureWriter, fingerprint

    attrs = {"model": "a+b", "scales": [[1.0], [1.0, 0.5]], "pooling": "gap+gem", "input_size": [32, 48]}
    w = FeatureWriter(tmp_path / "n.h5", attrs, (4,), ["a"])
    w.add(["x.jpg"], np.ones((1, 4), np.float32), ["a"])
    w.finish({})
    with h5py.File(tmp_path / "n.h5", "r") as f:
        raw = dict(f.attrs)
    assert isinstance(raw["scales"], str)
    assert fingerprint(raw) == fingerprint({**attrs, "feature_shape": [4], "layer": None, "weights": None})


def test_work_that_reads_the_images_again_names_itself_when_the_folder_is_gone(tmp_path):
    """--rotations and geometric verification read the database's images again: one line naming
    the database, what needed the images and the folder, when it is not recorded or not there."""
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, dict(ATTRS, dataset_root=str(tmp_path / "photos")), (3,), [])
    w.add(["a.jpg"], np.ones((1, 3), np.float32), [""])
    w.finish({})
    with FeatureDB(path) as db:
        with pytest.raises(DatabaseError, match=rf"^{path}: geometric verification needs the database's images, "
                                                r"and its dataset folder .*photos is not there$"):
            db.images_folder("geometric verification")
    (tmp_path / "photos").mkdir()
    with FeatureDB(path) as db:
        assert db.images_folder("geometric verification") == tmp_path / "photos"


def test_a_database_whose_rows_contradict_themselves_is_refused_naming_it(tmp_path):
    """Hand-edited or damaged: two rows with one stable id (an HNSW index then held one vector and
    answered one result), or a label number with no name. Refused where they are read."""
    import h5py

    from ris.errors import DatabaseError
    from ris.featuredb import FeatureDB
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8, seed=1), labels=["a", "b"] * 10)
    with h5py.File(db, "a") as f:
        f["ids"][5] = f["ids"][4]
    with FeatureDB(db) as f, pytest.raises(DatabaseError, match=r"f\.h5: .*ids .*not increasing"):
        f.row_ids  # noqa: B018
    db = make_feature_db(tmp_path / "g.h5", clustered_vectors(20, 8, seed=1), labels=["a", "b"] * 10)
    with h5py.File(db, "a") as f:
        f["labels"][3] = 7
    with FeatureDB(db) as f, pytest.raises(DatabaseError, match=r"g\.h5: damaged: a row has label 7, and the database has 2 label names"):
        f.labels  # noqa: B018


def test_a_database_that_lists_an_image_twice_is_refused_naming_the_id(tmp_path, capsys):
    """Hand-edited or written by another tool: two rows with one image id were trusted (scored as
    two queries, removed together, skipped once by --append). Refused where the ids are read, in
    one line naming the file and the first repeated id; ris-eval exits 2."""
    from ris.cli import eval as eval_cli
    from ris.cli.common import run
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8, seed=1), labels=["a", "b"] * 10)
    with FeatureDB(db) as f:
        assert len(set(f.image_ids)) == 20  # the writer's own ids are unique
    with h5py.File(db, "a") as f:
        f["image_ids"][7] = f["image_ids"][2]
        f["image_ids"][9] = f["image_ids"][3]
    with FeatureDB(db) as f, pytest.raises(DatabaseError) as e:
        f.image_ids  # noqa: B018
    assert str(e.value) == (f"{db}: damaged: image id 'img000002.jpg' is on rows 2 and 7 (2 ids repeated); "
                            "a database lists each image once: extract it again")
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--split", "all"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ris-eval: error: {e.value}"
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (8,), ["a", "b"], append=True)
    try:
        with pytest.raises(DatabaseError, match=r"f\.h5: damaged: image id 'img000002\.jpg' is on rows 2 and 7"):
            w.done_ids()
    finally:
        w.close()
