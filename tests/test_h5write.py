"""HDF5 writes that may fail midway: room reserved before HDF5 writes, h5py's noise silenced."""
import errno
import os
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest

from ris.h5write import quiet_hdf5_failures, reserved_room


def _grow(f: h5py.File, n: int) -> None:
    d = f["a"]
    d.resize(len(d) + n, axis=0)
    d[-n:] = 1.0
    f.flush()


@pytest.fixture
def h5(tmp_path):
    f = h5py.File(tmp_path / "x.h5", "w")
    f.create_dataset("a", shape=(0, 256), maxshape=(None, 256), chunks=(64, 256), dtype="f4")
    yield f
    if f.id.valid:
        f.close()


def test_the_room_is_allocated_during_the_write_and_the_unused_part_given_back(h5):
    fd = h5.id.get_vfd_handle()
    with reserved_room(h5, 8 << 20):
        assert os.fstat(fd).st_size >= 8 << 20  # allocated on disk before HDF5 writes
        _grow(h5, 100)
    assert os.fstat(fd).st_size == h5.id.get_filesize() < 1 << 20  # nothing reserved is left
    name = h5.filename
    h5.close()
    with h5py.File(name) as again:
        assert again["a"].shape == (100, 256) and float(again["a"][99, 255]) == 1.0


def test_a_disk_without_room_fails_before_hdf5_writes_and_the_file_stays_closable(h5, monkeypatch):
    _grow(h5, 10)
    fd = h5.id.get_vfd_handle()
    before = os.fstat(fd).st_size

    def full(fd, offset, length):
        os.ftruncate(fd, offset + 4096)  # as glibc's emulation can: extended partway, then out of room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as caught:
        with reserved_room(h5, 8 << 20):
            pytest.fail("the write must not start")
    assert caught.value.errno == errno.ENOSPC
    assert os.fstat(fd).st_size == before  # the partway extension is taken back
    name = h5.filename
    h5.close()
    with h5py.File(name) as again:
        assert again["a"].shape == (10, 256)


def test_filesystems_without_posix_fallocate_are_written_unreserved(h5, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    with reserved_room(h5, 8 << 20):
        _grow(h5, 5)
    assert h5["a"].shape == (5, 256)


def test_a_failed_write_keeps_what_the_disk_holds(h5):
    with pytest.raises(RuntimeError):
        with reserved_room(h5, 1 << 20):
            raise RuntimeError("HDF5 failed")
    # nothing is given back after a failure: the file is abandoned, never touched again
    assert os.fstat(h5.id.get_vfd_handle()).st_size >= 1 << 20


def test_only_h5py_dealloc_failures_are_silenced():
    seen = []
    saved, hook = sys.unraisablehook, seen.append
    sys.unraisablehook = hook
    try:
        with quiet_hdf5_failures():
            with quiet_hdf5_failures():  # nested: one installation
                sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("x"),
                                                         exc_traceback=None, err_msg=None,
                                                         object="h5py._objects.ObjectID.__dealloc__"))
                other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("y"), exc_traceback=None,
                                              err_msg=None, object="mymodule.Thing.__del__")
                sys.unraisablehook(other)
        assert sys.unraisablehook is hook  # restored
    finally:
        sys.unraisablehook = saved
    assert seen == [other]


def test_ris_extract_under_a_file_size_limit_stops_in_one_line_and_resumes(tmp_path):
    """A quota or a file size limit is invisible to the free-space check: the reservation catches it."""
    from ris.testing import make_tiny_dataset
    from ris.testing_faults import run_size_limited

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=64)
    db = tmp_path / "f.h5"
    args = ["--dataset", str(data), "--features-db", str(db), "--model", "vgg16", "--weights", "none", "--resize", "64",
            "--batch-size", "1", "--no-progress"]
    done = run_size_limited("extract", args, limit=3 << 20)
    lines = [line for line in done.stderr.splitlines() if line.startswith("ris-extract")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and "could not reserve" in lines[0] and "File too large" in lines[0], done.stderr[-2000:]
    assert not db.exists()
    again = subprocess.run([sys.executable, "-c", "from ris.cli.extract import entry; entry()", *args],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    import ris.featuredb

    with ris.featuredb.FeatureDB(db) as out:
        assert len(out.image_ids) == 6


def test_a_whole_file_written_with_room_reserved_keeps_only_what_it_needs(tmp_path):
    from ris.h5write import hdf5_writing

    path = tmp_path / "c.h5"
    with hdf5_writing(path, reserve=16 << 20) as f:
        assert path.stat().st_size >= 16 << 20
        f.create_dataset("x", data=np.ones((100, 64), np.float32))
    assert path.stat().st_size < 1 << 20
    with h5py.File(path) as again:
        assert float(again["x"][:].sum()) == 6400.0


def test_a_whole_file_without_room_fails_before_writing_and_is_closed_not_abandoned(tmp_path, monkeypatch):
    import ris.h5write
    from ris.h5write import hdf5_writing

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"):
        with hdf5_writing(tmp_path / "c.h5", reserve=16 << 20):
            pytest.fail("the write must not start")
    assert ris.h5write.HDF5_UNCLOSED == []
    h5py.File(tmp_path / "c.h5", "r").close()  # closed whole: it opens


def test_a_file_closed_on_a_full_disk_is_closed_without_writing_and_stays_as_flushed(tmp_path, monkeypatch):
    """A writer stopped for lack of room closed its partial on the full disk; the close's failed
    writes left it unreadable ("addr overflow"), and its resume started over."""
    import hashlib
    import shutil

    import ris.h5write
    from ris.h5write import close_hdf5

    path = tmp_path / "p.h5"
    f = h5py.File(path, "w")
    f.create_dataset("a", data=np.arange(1000, dtype=np.float32))
    f.attrs["rows_done"] = 1000
    f.flush()
    flushed = hashlib.sha256(path.read_bytes()).hexdigest()
    f.attrs["dirty"] = "written after the flush"  # only in HDF5's cache: it must not reach the disk
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    close_hdf5(f, path)
    assert not f.id.valid and ris.h5write.HDF5_UNCLOSED == []
    assert hashlib.sha256(path.read_bytes()).hexdigest() == flushed
    with h5py.File(path, "r") as again:
        assert again["a"].shape == (1000,) and "dirty" not in again.attrs
    g = h5py.File(tmp_path / "q.h5", "w")  # with room: an ordinary close that writes what is pending
    g.attrs["dirty"] = 1
    monkeypatch.undo()
    close_hdf5(g, tmp_path / "q.h5")
    with h5py.File(tmp_path / "q.h5", "r") as again:
        assert again.attrs["dirty"] == 1


def test_after_a_failed_write_h5py_dealloc_noise_stays_silenced_until_released(tmp_path):
    """The objects of a failed write are freed when the caller drops the error, after the write:
    their dealloc failures were printed as tracebacks below the one-line error."""
    import ris.h5write
    from ris.h5write import abandon_hdf5, release_abandoned

    seen = []
    saved, hook = sys.unraisablehook, seen.append
    sys.unraisablehook = hook
    try:
        f = h5py.File(tmp_path / "x.h5", "w")
        abandon_hdf5(f, tmp_path / "x.h5")
        h5py_noise = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("x"), exc_traceback=None,
                                           err_msg=None, object="h5py._objects.ObjectID.__dealloc__")
        sys.unraisablehook(h5py_noise)
        other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("y"), exc_traceback=None,
                                      err_msg=None, object="mymodule.Thing.__del__")
        sys.unraisablehook(other)
        assert seen == [other]
        release_abandoned()
        assert sys.unraisablehook is hook and ris.h5write.HDF5_UNCLOSED == [] and not f.id.valid
    finally:
        sys.unraisablehook = saved
