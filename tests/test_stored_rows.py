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
