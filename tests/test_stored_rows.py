"""Rows of a stored feature matrix read by pread at their HDF5 offsets, as h5py reads them."""
import numpy as np

from ris.featuredb import FeatureDB
from ris.stored_rows import StoredRows
from ris.sync import remove_images
from ris.testing import clustered_vectors, make_feature_db


def test_stored_rows_read_like_h5py(tmp_path):
    x = clustered_vectors(3000, 16, seed=9)
    db = make_feature_db(tmp_path / "feats.h5", x)
    remove_images(db, ["img000001.jpg"])
    with FeatureDB(db) as f:
        rows = np.array([2998, 0, 1500, 7, 7, 1024, 1023])
        reader = StoredRows(f.features)
        assert reader._fd is not None  # the direct path, not h5py
        np.testing.assert_array_equal(reader.read(rows), f.features[:][rows])
        reader.close()


def test_anything_else_is_read_through_h5py_or_numpy():
    x = clustered_vectors(50, 8, seed=3)
    reader = StoredRows(x)  # a NumPy array: no file to pread
    assert reader._fd is None
    np.testing.assert_array_equal(reader.read(np.array([3, 3, 0])), x[[3, 3, 0]])


def test_rows_come_from_the_file_that_is_open_even_after_it_was_replaced(tmp_path):
    """A database replaced under its name (``ris-index remove``, ``--sync``, a copy) while a reader
    holds it open: the rows read are the open version's, never the new file's at the old offsets."""
    x = clustered_vectors(3000, 16, seed=9)
    db = make_feature_db(tmp_path / "feats.h5", x)
    other = make_feature_db(tmp_path / "other.h5", clustered_vectors(2000, 16, seed=4))
    with FeatureDB(db) as f:
        expected = f.features[:][[5, 2500, 17]]
        other.replace(db)  # the name now points at another file; ours stays open
        reader = StoredRows(f.features)
        np.testing.assert_array_equal(reader.read(np.array([5, 2500, 17])), expected)
        reader.close()
    (tmp_path / "feats.h5").write_bytes(b"\0" * 5000)  # and a damaged file under the name
    with FeatureDB(make_feature_db(tmp_path / "again.h5", x)) as f:
        reader = StoredRows(f.features)
        (tmp_path / "feats.h5").replace(tmp_path / "again.h5")
        np.testing.assert_array_equal(reader.read(np.array([0, 2999])), x[[0, 2999]])
        reader.close()
