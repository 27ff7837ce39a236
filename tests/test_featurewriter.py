"""The feature writer after a kill: a resumed run never writes into the file the killed run left.

HDF5 writes its metadata whenever its cache evicts it, so a file whose writer was killed can be read
(its committed rows are intact) but not extended: continuing to write into it corrupted the finished
database in 7 of 20 kill-and-resume cycles (``bad heap pointer`` on reading it, or the resumed run
failing mid-write). A resume copies the committed rows into a new file and continues there.
"""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import ris.h5write
from ris.featuredb import FeatureDB, partial_path
from ris.featurewriter import FeatureWriter
from ris.testing import committed_rows
from ris.testing_faults import run_size_limited, size_limit

ATTRS = {"model": "m", "weights": "w", "layer": "l", "input_size": 32, "scales": [1.0], "pooling": "gap"}

# a writer that never ends by itself: 8-row batches of row number features, a failure every 8 batches
ENDLESS_WRITER = r"""
import sys, numpy as np
from ris.featurewriter import FeatureWriter
w = FeatureWriter(sys.argv[1], {"model": "m", "pooling": "gap"}, (16,), ["even", "odd"])
start = w.rows
for s in range(start, 10**9, 8):
    w.add([f"{i:07d}.jpg" for i in range(s, s + 8)], np.repeat(np.arange(s, s + 8, dtype=np.float32)[:, None], 16, 1),
          ["odd" if i % 2 else "even" for i in range(s, s + 8)])
    if s % 64 == 0:
        w.add_failures([(f"bad{s}.jpg", f"bad{s}.jpg: empty file")])
"""


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_resume_never_writes_into_the_file_the_interrupted_run_left(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), ["x"])
    w.add(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3), ["x", ""])
    w.add_failures([("c", "c: empty file")])
    w.close()  # as a killed run leaves it
    left = tmp_path / "left-by-the-killed-run.h5"
    os.link(partial_path(path), left)  # the same file (inode): any write into it shows here
    before = _sha(left)
    said: list[str] = []
    w2 = FeatureWriter(path, ATTRS, (3,), ["x"], log=said.append)
    assert w2.resumed_rows == 2 and w2.done_ids() == {"a", "b", "c"}
    assert said == ["resuming: copying the 2 committed images of f.h5.partial into a new file "
                    "(an interrupted HDF5 file is read, never extended)"]
    w2.add(["d"], np.full((1, 3), 9, np.float32), ["x"])
    w2.finish()
    assert _sha(left) == before
    with FeatureDB(path) as db:
        assert db.image_ids == ["a", "b", "d"] and db.labels.tolist() == [0, -1, 0]
        assert db.features[:].tolist() == [[0, 1, 2], [3, 4, 5], [9, 9, 9]]
        assert db.failures == [("c", "c: empty file")]
        assert db.row_ids.tolist() == [0, 1, 2]


def test_a_resume_keeps_the_ids_lineage_and_added_times_of_committed_rows(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (2,), [])
    w.add(["a", "b"], np.ones((2, 2), np.float32), ["", ""])
    w.close()
    with h5py.File(partial_path(path), "r") as f:
        lineage, added = f.attrs["lineage_id"], f["added_at"][:]
    w2 = FeatureWriter(path, ATTRS, (2,), [])
    w2.add(["c"], np.ones((1, 2), np.float32), [""])
    w2.finish()
    with h5py.File(path, "r") as f:
        assert f.attrs["lineage_id"] == lineage and f.attrs["next_id"] == 3
        assert f["ids"][:].tolist() == [0, 1, 2] and f["added_at"][:2].tolist() == added.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_committed_rows_that_read_back_different_are_extracted_again_not_trusted(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), ["x"])
    w.add(["a", "b"], np.ones((2, 3), np.float32), ["x", "x"])
    w.add(["c", "d"], np.full((2, 3), 2, np.float32), ["x", "x"])
    w.add(["e"], np.full((1, 3), 3, np.float32), ["x"])
    w.close()
    with h5py.File(partial_path(path), "r+") as f:  # what a torn read after a kill would return
        f["features"][2] = 0.0
    said: list[str] = []
    w2 = FeatureWriter(path, ATTRS, (3,), ["x"], log=said.append)
    assert w2.resumed_rows == 2 and w2.done_ids() == {"a", "b"}
    assert said[-1] == ("warning: 3 committed images of f.h5.partial read back different from what was written "
                        "(checksums); they are extracted again")
    w2.add(["c", "d", "e"], np.array([[2, 2, 2], [2, 2, 2], [3, 3, 3]], np.float32), ["x"] * 3)
    w2.finish()
    with FeatureDB(path) as db:
        assert db.image_ids == ["a", "b", "c", "d", "e"] and db.features[2].tolist() == [2, 2, 2]
        assert db.row_ids.tolist() == [0, 1, 5, 6, 7]  # ids are never reused, not even those of dropped rows
    with h5py.File(path, "r") as f:
        assert "commit_crc" not in f  # a partial's bookkeeping, not part of the database


@pytest.mark.parametrize("torn", ["zeros", "missing"])
def test_rows_without_a_sound_checksum_entry_are_not_trusted(tmp_path, torn):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (2,), [])
    for name in "abc":
        w.add([name], np.ones((1, 2), np.float32), [""])
    w.close()
    with h5py.File(partial_path(path), "r+") as f:
        if torn == "zeros":  # the entry of the second batch read back as the fill value
            f["commit_crc"][1] = 0
        else:  # the last entry lost, rows_done kept
            f["commit_crc"].resize(2, axis=0)
    w2 = FeatureWriter(path, ATTRS, (2,), [])
    assert w2.resumed_rows == (1 if torn == "zeros" else 2)
    w2.close()


def test_an_append_checks_only_its_own_batches(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a"], np.ones((1, 3), np.float32), [""])
    w.finish()
    w = FeatureWriter(path, ATTRS, (3,), [], append=True)
    w.add(["b"], np.full((1, 3), 2, np.float32), [""])
    w.close()
    w2 = FeatureWriter(path, ATTRS, (3,), [], append=True)
    assert w2.resumed_rows == 2
    w2.close()
    with h5py.File(partial_path(path), "r+") as f:  # the first checksum entry torn: the base's copy is suspect
        f["commit_crc"][0] = 0
    w3 = FeatureWriter(path, ATTRS, (3,), [], append=True)
    assert w3.resumed_rows == 1 and "checksums" in w3.discarded_partial  # started again from the base
    w3.add(["b"], np.full((1, 3), 2, np.float32), [""])
    w3.finish()
    with FeatureDB(path) as db:
        assert db.image_ids == ["a", "b"] and db.features[:].tolist() == [[1, 1, 1], [2, 2, 2]]


def _kill_when_committed(db, at_least: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", ENDLESS_WRITER, str(db)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and committed_rows(db) < at_least:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in the middle of a batch, or of a flush
    if proc.poll() is not None:
        pytest.fail(f"the writer ended before it was killed: {proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return committed_rows(db)


@pytest.mark.slow
def test_runs_killed_at_random_moments_and_resumed_finish_whole_and_right(tmp_path):
    random.seed(1)
    db = tmp_path / "f.h5"
    committed = 0
    for cycle in range(8):  # each resume continues the file the previous kill left
        committed = max(committed, _kill_when_committed(db, committed + random.randint(800, 4000)))
    w = FeatureWriter(db, {"model": "m", "pooling": "gap"}, (16,), ["even", "odd"])
    assert w.resumed_rows >= committed - 8 and w.discarded_partial is None
    rows = w.rows
    w.add([f"{i:07d}.jpg" for i in range(rows, rows + 8)], np.repeat(np.arange(rows, rows + 8, dtype=np.float32)[:, None],
                                                                     16, 1), ["odd" if i % 2 else "even" for i in range(rows, rows + 8)])
    w.finish()
    with h5py.File(db, "r") as f:
        attrs = dict(f.attrs)  # every attribute readable (it was not: "bad heap pointer")
        assert attrs["complete"] and int(attrs["rows_done"]) == rows + 8
    with FeatureDB(db) as fdb:
        n = rows + 8
        assert fdb.image_ids == [f"{i:07d}.jpg" for i in range(n)]
        np.testing.assert_array_equal(fdb.features[:], np.repeat(np.arange(n, dtype=np.float32)[:, None], 16, 1))
        assert fdb.labels.tolist() == [i % 2 for i in range(n)]
        assert fdb.row_ids.tolist() == list(range(n))
        failed = [name for name, _ in fdb.failures]
        assert len(failed) == len(set(failed)) and all(int(name[3:-4]) < n for name in failed)


def test_a_writer_stops_before_the_disk_is_full_and_keeps_what_is_committed(tmp_path, monkeypatch):
    import shutil as shutil_module

    import ris.featurewriter as fw

    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a"], np.ones((1, 3), np.float32), [""])
    real = shutil_module.disk_usage
    monkeypatch.setattr(fw.shutil, "disk_usage", lambda p: real(p)._replace(free=5 << 20))
    with pytest.raises(fw.DatabaseError, match=(r": not enough free space to write the next batch \(5(\.0)? MiB free, about "
                                                r"16\.\d MiB needed\); the 1 images committed before are kept in "
                                                r"f\.h5\.partial: free space and run the same command again to resume")):
        w.add(["b"], np.ones((1, 3), np.float32), [""])
    w.close()
    monkeypatch.undo()
    w2 = FeatureWriter(path, ATTRS, (3,), [])
    assert w2.resumed_rows == 1
    w2.close()


def test_a_batch_that_reads_back_different_ends_the_writer_in_one_line_and_is_not_committed(tmp_path, monkeypatch):
    import ris.featurewriter as fw

    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a"], np.ones((1, 3), np.float32), [""])
    calls = []
    real_crc = fw.batch_crc

    def lossy(*arrays):  # the second batch's read-back differs, as HDF5's did on a full disk
        calls.append(1)
        return real_crc(*arrays) + (1 if len(calls) == 2 else 0)

    monkeypatch.setattr(fw, "batch_crc", lossy)
    try:
        with pytest.raises(fw.DatabaseError, match=r"f\.h5\.partial: could not write \(the batch read back different "
                                                    r"from what was written; is the disk full\?\); the 1 images "
                                                    r"committed before are kept"):
            w.add(["b"], np.full((1, 3), 2, np.float32), [""])
        assert w.rows == 1 and w.f is None
        assert [p for p, _ in ris.h5write.HDF5_UNCLOSED] == [partial_path(path)]  # left open, never closed
    finally:
        ris.h5write.release_abandoned()  # here it can be closed: the disk is not full
    w.close()
    monkeypatch.undo()
    w2 = FeatureWriter(path, ATTRS, (3,), [])
    assert w2.resumed_rows == 1 and w2.done_ids() == {"a"}
    w2.close()


def test_ris_extract_that_runs_out_of_space_says_so_in_one_line_with_status_2(tmp_path):
    """In a child process: after a failed HDF5 write the CLI leaves without HDF5's shutdown (which
    retries the write and crashes the process: status 139 on a full tmpfs)."""
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    script = ("import sys, ris.featurewriter as fw\n"
              "real = fw.batch_crc\n"
              "fw.batch_crc = lambda *a, n=[0]: real(*a) + (n.__setitem__(0, n[0] + 1) or n[0] == 4)\n"
              "from ris.cli.extract import entry\n"
              "entry()\n")
    done = subprocess.run([sys.executable, "-c", script, "--dataset", str(data), "--features-db", str(tmp_path / "f.h5"),
                           "--model", "vgg16", "--weights", "none", "--resize", "64", "--batch-size", "2",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stderr.splitlines() if l.startswith("ris-extract")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == [f"ris-extract: error: {tmp_path / 'f.h5.partial'}: could not write (the batch read back different "
                     "from what was written; is the disk full?); the 2 images committed before are kept: run the same "
                     "command again to resume once that is fixed"]


# a real write failure without root or a tmpfs: a file size limit makes the disk "full" at 8 MiB
SIZE_LIMITED_WRITER = size_limit(8 << 20) + r"""
import sys, numpy as np
from ris.errors import DatabaseError
from ris.featurewriter import FeatureWriter
w = FeatureWriter(sys.argv[1], {"model": "m", "pooling": "gap"}, (1280,), [])
try:
    for s in range(0, 32 * 1000, 32):
        w.add([f"{i:07d}.jpg" for i in range(s, s + 32)],
              np.repeat(np.arange(s, s + 32, dtype=np.float32)[:, None], 1280, 1), [""] * 32)
except DatabaseError as exc:
    print("rows", w.rows)
    print("error", exc)
w.close()
print("ended")
"""


def test_a_python_writer_whose_disk_fills_raises_one_error_and_its_process_ends_normally(tmp_path):
    """HDF5 that fails inside a write crashes the process when the file is closed or the process ends
    (status 139 here, after the error was handled, with h5py tracebacks printed; the CLI's os._exit
    only covered ris-extract). A disk that fills after the free-space check (another process, a quota,
    a file size limit) now stops the writer before HDF5 writes, and its file stays closable."""
    path = tmp_path / "f.h5"
    done = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITER, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    rows = int(out["rows"])
    assert 0 < rows < 32 * 1000 and rows % 32 == 0
    assert out["error"] == (f"{partial_path(path)}: could not reserve 3.3 MiB for the next batch (File too large); the "
                            f"{rows} images committed before are kept: free space and run the same command again to resume")
    assert done.stdout.rstrip().endswith("ended")
    w = FeatureWriter(path, {"model": "m", "pooling": "gap"}, (1280,), [])  # the disk has room again: resume
    assert w.resumed_rows == rows
    w.add(["last.jpg"], np.full((1, 1280), -1, np.float32), [""])
    w.finish()
    with FeatureDB(path) as db:
        feats, ids = db.features[:], list(db.image_ids)
    assert len(ids) == rows + 1 and ids[-1] == "last.jpg"
    assert np.array_equal(feats[:rows, 0], np.arange(rows, dtype=np.float32)) and np.all(feats[:rows].T == feats[:rows, 0])


def test_a_database_in_a_folder_that_does_not_exist_yet_creates_it(tmp_path):
    """``--features-db out/feats.h5`` failed with "out/feats.h5.lock: No such file or directory"."""
    path = tmp_path / "out" / "sub" / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a"], np.ones((1, 3), np.float32), [""])
    assert w.finish() == path and path.is_file()


def test_a_database_that_cannot_even_be_created_says_so_in_one_line_and_leaves_nothing(tmp_path):
    """A disk that filled while the model was built: h5py's raw multi-line HDF5 message was printed
    ("Unable to synchronously create file (file write failed: time = ...") and a torn .partial left.
    (HDF5 cannot close a file whose first flush failed: a Python caller still sees h5py's messages
    when its process ends; the CLI ends without HDF5's shutdown.)"""
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    done = run_size_limited("extract", ["--dataset", data, "--features-db", db, "--model", "vgg16", "--weights", "none",
                                        "--resize", "64", "--no-progress"], limit=700)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("ris-extract")] == [
        f"ris-extract: error: {partial_path(db)}: could not create the database (File too large); nothing was "
        "written: free space and run the same command again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_no_room_to_create_the_database_is_refused_in_one_line(tmp_path, monkeypatch):
    import shutil as shutil_module

    import ris.featurewriter as fw

    real = shutil_module.disk_usage
    monkeypatch.setattr(fw.shutil, "disk_usage", lambda p: real(p)._replace(free=5 << 20))
    with pytest.raises(fw.DatabaseError) as caught:
        FeatureWriter(tmp_path / "f.h5", ATTRS, (3,), [])
    assert str(caught.value) == (f"{tmp_path}: not enough free space to create the database (5 MiB free, about 16 MiB "
                                 "needed); nothing was written: free space and run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_append_whose_copy_of_the_database_fails_leaves_no_torn_copy(tmp_path, monkeypatch):
    """--append copies the finished database first; a full disk said only 'f.h5: File too large' and
    left a torn f.h5.partial for the next run to discard."""
    import errno
    import shutil as shutil_module

    import ris.featurewriter as fw

    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (3,), [])
    w.add(["a"], np.ones((1, 3), np.float32), [""])
    w.finish()
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    def full(src, dst, **kwargs):
        with open(dst, "wb") as out:
            out.write(b"torn")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(shutil_module, "copyfile", full)
    with pytest.raises(fw.DatabaseError) as caught:
        FeatureWriter(path, ATTRS, (3,), [], append=True)
    assert str(caught.value) == (f"{partial_path(path)}: could not copy f.h5 to append to it (File too large); "
                                 f"{path} is unchanged: free space and run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
