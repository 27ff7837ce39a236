"""HDF5 feature database: layout, atomic rename, resume after interruption, append."""
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
