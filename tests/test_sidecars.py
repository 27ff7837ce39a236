"""Files kept beside a feature database: atomic writes, content keys, listing/clearing, the writer lock."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ris.errors import DatabaseError
from ris.featuredb import FeatureDB, FeatureWriter
from ris.sidecars import (DatabaseLocked, WriterLock, atomic_write, clear_sidecars, read_h5_cache, sidecar_files,
                          write_h5_cache)

ATTRS = {"model": "m", "weights": "w", "layer": "l", "input_size": 32, "scales": [1.0], "pooling": "gap"}


def make_db(path, rows=3, seed=0):
    w = FeatureWriter(path, ATTRS, (4,), [])
    w.add([f"{seed}-{i}.jpg" for i in range(rows)], np.random.default_rng(seed).random((rows, 4), np.float32),
          [""] * rows)
    return w.finish()


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]  # temp removed
    with atomic_write(target, suffix=".keras") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".keras") and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.parametrize("raised_name", [None, "temp"])
def test_a_failed_atomic_write_names_the_file_the_user_asked_for(tmp_path, raised_name):
    """Keras and zipfile said only "File too large" on a full disk; ris-train printed just that."""
    import errno

    target = tmp_path / "head.keras"
    with pytest.raises(OSError) as caught:
        with atomic_write(target, suffix=".keras") as tmp:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), *([str(tmp)] if raised_name else []))
    assert caught.value.filename == str(target) and caught.value.errno == errno.EFBIG
    assert os.listdir(tmp_path) == []


def test_cache_is_used_only_under_its_own_key(tmp_path):
    path = tmp_path / "f.h5.emb-abc.h5"
    write_h5_cache(path, "key-1", embeddings=np.ones((2, 3), np.float32))
    assert read_h5_cache(path, "key-1")["embeddings"].shape == (2, 3)
    assert read_h5_cache(path, "key-2") is None  # another database content or parameters: rebuild
    path.write_bytes(b"damaged")
    assert read_h5_cache(path, "key-1") is None
    assert read_h5_cache(tmp_path / "missing.h5", "key-1") is None


def test_a_cache_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    import errno
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(OSError) as exc:  # callers catch OSError and go on uncached
        write_h5_cache(tmp_path / "f.h5.emb-x.h5", "k", embeddings=np.ones((10, 4), np.float32))
    assert exc.value.errno == errno.ENOSPC and "not enough free space to write f.h5.emb-x.h5" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_content_key_changes_with_every_change(tmp_path):
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, ATTRS, (4,), [])
    ids = [w.f.attrs["content_id"]]
    w.add(["a"], np.ones((1, 4), np.float32), [""])
    ids.append(w.f.attrs["content_id"])
    w.add_failures([("b", "b: empty file")])
    ids.append(w.f.attrs["content_id"])
    w.finish()
    with FeatureDB(path) as db:
        first = db.content_key
        assert db.attrs["content_id"] not in ids[:1]
    assert len(set(ids)) == 3
    w = FeatureWriter(path, ATTRS, (4,), [], append=True)  # append with nothing new: content unchanged
    w.finish()
    with FeatureDB(path) as db:
        assert db.content_key == first
    w = FeatureWriter(path, ATTRS, (4,), [], append=True)
    w.add(["c"], np.ones((1, 4), np.float32), [""])
    w.finish()
    with FeatureDB(path) as db:
        assert db.content_key != first
        assert first.split(":")[0] in db.content_history  # appended: the old rows are a prefix


def test_sidecar_listing_and_clearing_touch_only_sidecars(tmp_path):
    db = make_db(tmp_path / "feats.h5")
    sidecars = ["feats.h5.emb-0123456789ab.h5", "feats.h5.dba-n10-a3.h5", "feats.h5.thumbs16.h5", "feats.h5.hnsw",
                "feats.h5.hnsw.json", "feats.h5.emb-0123456789ab.h5.hnsw", "feats.h5.emb-0123456789ab.h5.hnsw.json",
                "feats.h5.emb-0123456789ab.h5.dba-n10-a0.5.h5", "feats.h5.thumbs16.h5.1a2b3c4d.tmp",
                "feats.h5.local-sift500-512.h5",
                "feats.h5.ivfpq", "feats.h5.ivfpq.0a1b2c3d.faiss", "feats.h5.ivfpq.0a1b2c3d.faiss.9f8e7d6c.tmp",
                "feats.h5.emb-0123456789ab.h5.ivfpq", "feats.h5.ivfpq.1a2b3c4d.tmp", "feats.h5.hnsw.0a1b2c3d.graph",
                "feats.h5.hnsw.0a1b2c3d.graph.9f8e7d6c.tmp", "feats.h5.emb-0123456789ab.h5.hnsw.0a1b2c3d.graph"]
    others = ["feats.h5.partial", "feats.h5.bak", "feats.h5x.hnsw", "other.h5.hnsw", "feats.h5.hnsw.txt",
              "notes.txt", "feats.h5.emb-zz.h5", "feats.h5.rewrite", "feats.h5.ivfpq.zz.faiss", "feats.h5.hnsw.zz.graph",
              "feats.h5.hnsw.0a1b2c3d.faiss"]
    for name in sidecars + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "feats.h5.thumbs32.h5").mkdir()  # not a regular file: never touched
    assert sorted(p.name for p in sidecar_files(db)) == sorted(sidecars)
    removed = clear_sidecars(db, keep_indexes=True)
    assert sorted(p.name for p in removed) == sorted(n for n in sidecars if ".hnsw" not in n and ".ivfpq" not in n)
    clear_sidecars(db)
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(others + ["feats.h5", "feats.h5.thumbs32.h5"])


def test_second_lock_is_refused_with_the_holders_pid(tmp_path):
    db = tmp_path / "f.h5"
    first = WriterLock(db).acquire()
    with pytest.raises(DatabaseLocked, match=rf"pid {os.getpid()}\b") as err:
        WriterLock(db).acquire()
    assert str(db) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, DatabaseError)
    first.release()
    assert not Path(str(db) + ".lock").exists()  # released cleanly: nothing left beside the database
    WriterLock(db).acquire().release()


def test_lock_of_a_killed_process_is_free(tmp_path):
    db = tmp_path / "f.h5"
    code = ("import os, sys; from ris.sidecars import WriterLock; WriterLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(db)])
    assert proc.returncode == -9
    assert Path(str(db) + ".lock").exists()  # stale file, but no stale lock
    WriterLock(db).acquire().release()


def test_h5_cache_file_is_a_plain_hdf5_file(tmp_path):
    path = tmp_path / "c.h5"
    write_h5_cache(path, "k", embeddings=np.zeros((1, 2), np.float32), extra=np.arange(3))
    with h5py.File(path, "r") as f:
        assert f.attrs["cache_key"] == "k" and set(f) == {"embeddings", "extra"}


def _killed_writer(target, suffix=""):
    """A process killed (SIGKILL) inside atomic_write, as `kill -9` during an index save: its temp stays."""
    code = ("import os, sys; from ris.sidecars import atomic_write\n"
            f"with atomic_write({str(target)!r}, suffix={suffix!r}) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    left = [p for p in target.parent.iterdir() if p.name.startswith(target.name + ".")]
    assert len(left) == 1, left
    old = left[0].stat().st_mtime - 3600
    os.utime(left[0], (old, old))  # an hour ago: past the age a just-created temp is given
    return left[0]


def test_a_killed_writers_temp_is_removed_by_the_next_write_of_that_file(tmp_path):
    """kill -9 during an index save left its temp (1.3 GB for an HNSW index at 1M rows) until the
    database was extracted again; every killed save added one."""
    target = tmp_path / "feats.h5.hnsw"
    stale = _killed_writer(target)
    other = _killed_writer(tmp_path / "other.bin")  # another file's temp is not this write's to judge
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists() and other.exists() and target.read_bytes() == b"new"
    model = _killed_writer(tmp_path / "head.keras", suffix=".keras")
    with atomic_write(tmp_path / "head.keras", suffix=".keras") as tmp:
        tmp.write_bytes(b"zip")
    assert not model.exists()


def test_a_live_writers_temp_is_left_alone_however_old(tmp_path):
    """Another process mid-save holds a lock on its temp: neither the next write nor clear_sidecars
    may delete it under it (its rename would fail, or it would commit a file another deleted)."""
    target = tmp_path / "f.h5.hnsw"
    make_db(tmp_path / "f.h5")
    code = ("import os, sys, time; from ris.sidecars import atomic_write\n"
            f"with atomic_write({str(target)!r}) as tmp:\n"
            "    tmp.write_bytes(b'slow'); old = time.time() - 3600; os.utime(tmp, (old, old))\n"
            "    print('writing', flush=True); sys.stdin.readline()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert writer.stdout.readline().strip() == "writing"
        live = [p for p in tmp_path.iterdir() if p.name.startswith("f.h5.hnsw.")]
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"mine")
        assert clear_sidecars(tmp_path / "f.h5") == [target]
        assert all(p.exists() for p in live) and len(live) == 1
    finally:
        writer.communicate("go\n", timeout=60)
    assert writer.returncode == 0 and target.read_bytes() == b"slow"


def test_hdf5_caches_are_written_under_the_temps_lock(tmp_path):
    """HDF5 locks the files it writes with the same kind of lock: the temp's own lock must not stop it."""
    path = tmp_path / "f.h5.thumbs64.h5"
    write_h5_cache(path, "k", thumbs=np.zeros((2, 3), np.uint8))
    assert read_h5_cache(path, "k")["thumbs"].shape == (2, 3)
