"""ris.partial: what a resume reads from the file an interrupted run left, and what it copies."""
import contextlib
import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import ris.partial
from ris.errors import DatabaseError
from ris.featuredb import partial_path
from ris.featurewriter import FeatureWriter
from ris.partial import Damaged, copy_committed, verified_rows

ATTRS = {"model": "m", "weights": "w", "layer": "l", "input_size": 32, "scales": [1.0], "pooling": "gap"}


def _interrupted(path: Path, batches: int = 3) -> Path:
    w = FeatureWriter(path, ATTRS, (2,), [])
    for i in range(batches):
        w.add([f"{i}.jpg"], np.full((1, 2), i, np.float32), [""])
    w.close()
    return partial_path(path)


def test_a_copy_that_cannot_be_written_keeps_the_interrupted_runs_file(tmp_path, monkeypatch):
    partial = _interrupted(tmp_path / "f.h5")
    before = hashlib.sha256(partial.read_bytes()).hexdigest()

    @contextlib.contextmanager
    def full_disk(path):  # the new file cannot be made (as on a full disk)
        yield tmp_path / "no-such-folder" / "copy.h5"

    monkeypatch.setattr(ris.partial, "atomic_write", full_disk)
    with pytest.raises(DatabaseError, match=r"f\.h5\.partial: could not copy its committed rows into a new file "
                                            r"to resume \(.*\); it is kept: run again once that is fixed"):
        FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [])
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == before
    monkeypatch.undo()
    w = FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [])  # once that is fixed, nothing was lost
    assert w.resumed_rows == 3
    w.close()


def test_a_file_that_cannot_be_read_is_damaged(tmp_path):
    bad = tmp_path / "f.h5.partial"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(Damaged):
        copy_committed(bad, ATTRS, tmp_path / "f.h5", 0, lambda line: None)
    w = FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [])  # the writer starts over, saying why
    assert w.resumed_rows == 0 and "damaged" in w.discarded_partial
    w.close()


def test_verified_rows_stop_at_the_first_batch_that_reads_back_different(tmp_path):
    partial = _interrupted(tmp_path / "f.h5", batches=4)
    with h5py.File(partial, "r") as f:
        assert verified_rows(f, 4) == (4, 4)
        assert verified_rows(f, 2) == (2, 2)  # rows_done lags the entries: only committed batches
        assert verified_rows(f, 4, block_bytes=1) == (4, 4)  # one batch per block
    with h5py.File(partial, "r+") as f:
        f["image_ids"][2] = b"other.jpg"
    with h5py.File(partial, "r") as f:
        assert verified_rows(f, 4) == (2, 2)


def test_a_resume_without_room_for_the_copy_refuses_in_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    partial = _interrupted(tmp_path / "f.h5")
    size = partial.stat().st_size
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size))
    with pytest.raises(DatabaseError, match=r"f\.h5\.partial: not enough free space to copy its committed rows into a "
                                            r"new file to resume \(.* free, about .* needed\); it is kept"):
        FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [])
    assert partial.stat().st_size == size and not list(tmp_path.glob("*.tmp"))


def test_a_resume_shows_its_check_and_copy_as_progress_bars(tmp_path, capsys):
    """At 10M rows the copy takes minutes: the user sees it move (and nothing when bars are off)."""
    partial = _interrupted(tmp_path / "f.h5")
    FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [], progress=False).close()
    assert "resume:" not in capsys.readouterr().err
    w = FeatureWriter(tmp_path / "f.h5", ATTRS, (2,), [], progress=True)
    assert w.resumed_rows > 0 and partial.exists()
    w.close()
    err = capsys.readouterr().err
    assert "resume: check" in err and "resume: copy" in err and "row/s" in err


def test_a_run_without_labels_interrupted_twice_resumes_both_times(tmp_path):
    """The first copy turned the empty, fixed-size label list into a chunked dataset whose chunks were
    larger than itself; the second resume then failed to copy it, every time ("it is kept: run again")."""
    path = tmp_path / "f.h5"
    _interrupted(path)
    for resume in range(3):
        w = FeatureWriter(path, ATTRS, (2,), [])
        assert w.resumed_rows == 3 + resume
        w.add([f"more{resume}.jpg"], np.full((1, 2), 9, np.float32), [""])
        w.close()
    w = FeatureWriter(path, ATTRS, (2,), [])
    w.finish()
    with h5py.File(path) as f:
        assert f["features"].shape == (6, 2) and len(f["label_names"]) == 0


@pytest.mark.parametrize("removed", [5, 45])
def test_an_append_resumed_after_removals_keeps_the_whole_removal_log(tmp_path, removed):
    """A killed --sync (or --append) on a database with removals behind it: the resume copied the
    removal log (``removed_ids``) as if it held one value per row. Shorter than the rows, the copy
    failed at every run ("could not copy its committed rows ... (Can't broadcast (2,) -> (28,)); it
    is kept: run again once that is fixed"); longer, it was cut to the row count without a word,
    and the saved indexes, which replay that log by position, never removed later removals' ids."""
    from ris.featuredb import FeatureDB
    from ris.sync import remove_images
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(50, 4))
    remove_images(db, [f"img{i:06d}.jpg" for i in range(removed)])
    attrs = {"model": "synthetic", "pooling": "gap"}  # the recipe, as make_feature_db wrote it
    with FeatureDB(db) as f:
        log = f.removed_ids.tolist()
    w = FeatureWriter(db, attrs, (4,), [], append=True)
    w.add(["new0.jpg", "new1.jpg"], np.ones((2, 4), np.float32), ["", ""])
    w.close()  # not finished: what a killed run leaves
    w = FeatureWriter(db, attrs, (4,), [], append=True)  # the next run resumes it
    assert w.resumed_rows == 50 - removed + 2
    w.add(["new2.jpg"], np.ones((1, 4), np.float32), [""])
    w.finish({})
    with FeatureDB(db) as f:
        assert f.removed_ids.tolist() == log == list(range(removed)) and len(f) == 50 - removed + 3
        assert f.image_ids[-3:] == ["new0.jpg", "new1.jpg", "new2.jpg"]
