"""Removing images and ris-extract --sync: stable ids, the removal log, atomic rewrites under the
writer lock, and saved indexes that follow instead of being rebuilt."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ris.featuredb import FeatureDB
from ris.featurewriter import FeatureWriter
from ris.sidecars import DatabaseLocked, WriterLock, rewrite_path
from ris.sync import plan_sync, remove_images
from ris.testing import clustered_vectors, make_feature_db, make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "vgg16", "--weights", "none", "--resize", "64", "--no-progress"]


def test_removal_keeps_ids_stable_and_logs_them(tmp_path):
    x = clustered_vectors(100, 8)
    db = make_feature_db(tmp_path / "f.h5", x, labels=[f"o{i // 4}" for i in range(100)])
    with FeatureDB(db) as f:
        before = (f.content_id, f.lineage, f.image_ids, f.row_ids)
    gone = [f"img{i:06d}.jpg" for i in (3, 50, 51, 99)]
    s = remove_images(db, gone + ["missing.jpg"])
    assert s.removed == gone and s.not_found == ["missing.jpg"] and s.rows == 96
    with FeatureDB(db) as f:
        keep = [i for i in range(100) if i not in (3, 50, 51, 99)]
        assert f.image_ids == [before[2][i] for i in keep]
        np.testing.assert_array_equal(f.row_ids, keep)  # ids of the others unchanged
        np.testing.assert_array_equal(f.removed_ids, [3, 50, 51, 99])
        np.testing.assert_array_equal(f.features[:], x[keep])
        assert [f.label_names[k] for k in f.labels] == [f"o{i // 4}" for i in keep]
        assert f.lineage == before[1] and before[0] in f.content_history and f.content_id != before[0]
        assert f.next_id == 100
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (8,), [], append=True)
    w.add(["again.jpg", "img000003.jpg"], x[:2], ["", ""])
    w.finish({})
    with FeatureDB(db) as f:  # ids are never reused, even for a name that comes back
        assert f.row_ids[-2:].tolist() == [100, 101] and f.next_id == 102 and f.lineage == before[1]


def test_a_removal_without_room_refuses_before_writing_and_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    import errno

    x = clustered_vectors(20, 8)
    db = make_feature_db(tmp_path / "f.h5", x)
    before = db.read_bytes()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(OSError, match="not enough free space to rewrite the database without the removed images") as exc:
        remove_images(db, ["img000003.jpg"])
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path)
    assert db.read_bytes() == before and not rewrite_path(db).exists()


def test_failed_entries_can_be_removed_and_nothing_to_remove_writes_nothing(tmp_path):
    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(10, 4))
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (4,), [], append=True)
    w.add_failures([("broken.jpg", "broken.jpg: not an image")])
    w.finish({})
    s = remove_images(db, ["broken.jpg"])
    assert s.removed == [] and s.removed_failed == ["broken.jpg"] and s.rows == 10
    with FeatureDB(db) as f:
        assert f.failures == [] and len(f) == 10
        content = f.content_id
    remove_images(db, ["not-there.jpg"])
    with FeatureDB(db) as f:
        assert f.content_id == content


def test_a_running_writer_blocks_removal(tmp_path):
    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(10, 4))
    with WriterLock(db):
        with pytest.raises(DatabaseLocked, match="being written by"):
            remove_images(db, ["img000001.jpg"])


KILLED_REMOVAL = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import ris.sync

    def stall(path):  # the new database is written in full; killed before the rename
        print("written", flush=True)
        time.sleep(600)

    ris.sync.fsync_file = stall
    ris.sync.remove_images({db!r}, ["img000001.jpg"])
""")


def test_a_killed_removal_leaves_the_old_database_whole(tmp_path):
    x = clustered_vectors(3000, 8)
    db = make_feature_db(tmp_path / "f.h5", x)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_REMOVAL.format(root=str(ROOT), db=str(db))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("written")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert rewrite_path(db).exists()
    with FeatureDB(db) as f:  # the old database, untouched
        assert len(f) == 3000 and "img000001.jpg" in f.image_ids
    assert remove_images(db, ["img000001.jpg"]).rows == 2999  # the next writer drops the leftover
    assert not rewrite_path(db).exists()


def _extract(*args) -> int:
    from ris.cli.extract import main

    return main(list(args))


@pytest.mark.slow
def test_sync_follows_a_real_folder_and_its_indexes_follow(tmp_path, capsys):
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from ris.index import open_search_index
    from ris.index_state import source_of

    data = make_tiny_dataset(tmp_path / "photos", n_objects=4, views=3, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    with FeatureDB(db) as f:
        ids_before = dict(zip(f.image_ids, f.row_ids.tolist()))
        open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
    assert _extract("--sync", "--features-db", str(db), "--no-progress") == 0  # nothing changed
    with FeatureDB(db) as f:
        assert dict(zip(f.image_ids, f.row_ids.tolist())) == ids_before
    # photos come and go: two deleted, two added, one replaced in place
    (data / "ukbench00001.jpg").unlink()
    (data / "ukbench00005.jpg").unlink()
    shutil.copy(data / "ukbench00000.jpg", data / "new_a.jpg")
    shutil.copy(data / "ukbench00009.jpg", data / "new_b.jpg")
    time.sleep(0.05)
    shutil.copy(data / "ukbench00003.jpg", data / "ukbench00002.jpg")  # same name, other content
    root, files, gone, changed, retry, new = plan_sync(db)
    assert sorted(gone) == ["ukbench00001.jpg", "ukbench00005.jpg"] and changed == ["ukbench00002.jpg"]
    assert sorted(new) == ["new_a.jpg", "new_b.jpg", "ukbench00002.jpg"]
    capsys.readouterr()
    assert _extract("--sync", "--features-db", str(db), "--no-progress", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == 3 and out["rows"] == 12 and sorted(out["removed"]) == sorted(gone)
    with FeatureDB(db) as f:
        ids = dict(zip(f.image_ids, f.row_ids.tolist()))
        assert set(ids) == set(files)
        for name in files:  # unchanged files keep their ids; replaced and new ones get new ids
            if name in ("new_a.jpg", "new_b.jpg", "ukbench00002.jpg"):
                assert ids[name] >= 12
            else:
                assert ids[name] == ids_before[name]
        vecs = f.features[:]
    meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())  # the index followed during --sync
    assert meta["count"] == 12 and meta["removed_seen"] == 3 and meta["next_id"] == 15
    with FeatureDB(db) as f:
        index = open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
        _, found = index.search(vecs, 1)
    assert len(index) == 12  # every vector finds itself (or a copy of its file: same vector), at its new row
    np.testing.assert_allclose(vecs[found[:, 0]], vecs, atol=1e-6)


def test_databases_made_before_ids_get_row_numbers(tmp_path):
    import h5py

    x = clustered_vectors(20, 4)
    db = make_feature_db(tmp_path / "f.h5", x)
    with h5py.File(db, "a") as f:  # as older versions wrote it
        del f["ids"], f["added_at"]
        for k in ("lineage_id", "next_id"):
            del f.attrs[k]
    with FeatureDB(db) as f:
        assert f.row_ids.tolist() == list(range(20)) and f.next_id == 20 and f.lineage == f.content_id
        lineage = f.lineage
        assert np.isnan(f.added_at).all()
    remove_images(db, ["img000000.jpg"])
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (4,), [], append=True)
    w.add(["z.jpg"], x[:1], [""])
    w.finish({})
    with FeatureDB(db) as f:
        assert f.row_ids.tolist() == list(range(1, 21)) and f.removed_ids.tolist() == [0] and f.lineage == lineage


def test_ris_index_remove_from_file_reads_only_a_regular_file(tmp_path):
    """ris-index remove --from-file list.fifo blocked forever opening the FIFO (ris-eval --queries
    refuses one in a line); a regular list still removes, non-UTF-8 names byte for byte."""
    from ris.errors import RisError
    from ris.cli.index import main
    from ris.testing import call_with_fifo_guard

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)
    with pytest.raises(RisError, match=r"list\.fifo: not a regular file \(FIFO\)"):
        call_with_fifo_guard(lambda: main(["remove", "--features-db", str(db), "--from-file", str(fifo)]), fifo, 20)
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"img000001.jpg\n\nimg000003.jpg\n")
    assert main(["remove", "--features-db", str(db), "--from-file", str(listed)]) == 0
    with FeatureDB(db) as f:
        assert len(f) == 18 and "img000001.jpg" not in f.image_ids


def test_ris_index_remove_and_info(tmp_path, capsys):
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(50, 8))
    assert main(["remove", "--features-db", str(db), "img000002.jpg", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["img000002.jpg"]
    assert main(["remove", "--features-db", str(db), "img000002.jpg"]) == 1  # not there any more: said so
    assert "not in the database: img000002.jpg" in capsys.readouterr().out
    assert main(["info", "--features-db", str(db), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["rows"], info["removed"], info["next_id"]) == (49, 1, 50)


def test_ris_index_info_prints_lines_not_python_dicts(tmp_path, capsys):
    """``ris-index info`` printed each saved index as a raw Python dict
    (``f.h5.hnsw.json: {'kind': 'hnsw', ..., 'params': {'M': 32, ...}}``); it now prints one
    ``key: value`` line each, nested settings on their own lines below; ``--json`` is unchanged."""
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(60, 8))
    assert main(["build", "--features-db", str(db), "--index", "hnsw"]) == 0
    (tmp_path / "f.h5.ivfpq").write_text("{not json")
    capsys.readouterr()
    assert main(["info", "--features-db", str(db), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["indexes"]["f.h5.hnsw.json"]["params"]["M"] == 32 and "error" in info["indexes"]["f.h5.ivfpq"]
    assert main(["info", "--features-db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "'" not in out, out
    lines = out.splitlines()
    at = lines.index("  f.h5.hnsw.json:")
    assert "    kind: hnsw" in lines[at:] and "    count: 60" in lines[at:] and "    metric: euclidean" in lines[at:]
    params = lines.index("    params:", at)
    assert lines[params + 1 : params + 4] == ["      M: 32", "      ef_construction: 200", "      ef_search: 128"]
    ivf = lines.index("  f.h5.ivfpq:")
    assert lines[ivf + 1].startswith("    error: ")


def test_ris_index_remove_of_a_path_says_how_the_image_is_stored(tmp_path, capsys, monkeypatch):
    """`ris-index remove --features-db f.h5 photos/ukbench00001.jpg` (the path a shell completes)
    said only 'not in the database: photos/ukbench00001.jpg', though that image is in it, stored
    relative to its folder; the line now names the stored name to give."""
    from ris.cli.index import main

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["remove", "--features-db", str(db), "photos/ukbench00001.jpg", str(data / "ukbench00002.jpg"),
                 "nothing.jpg"]) == 1
    out = capsys.readouterr().out
    assert (f"not in the database: photos/ukbench00001.jpg (it is stored as ukbench00001.jpg, relative to "
            f"its images' folder {data})") in out
    assert f"not in the database: {data / 'ukbench00002.jpg'} (it is stored as ukbench00002.jpg," in out
    assert "  not in the database: nothing.jpg\n" in out
    assert len(_ids(db)) == 4  # nothing removed: the names given were not the stored ones


@pytest.mark.slow
def test_a_refreshed_engine_follows_removals_through_stable_ids(tmp_path):
    """ris-serve's SearchEngine.refreshed() after images were removed: results name the right
    images, and the saved index still maps ids (not rows) afterwards."""
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from ris.search import SearchEngine

    data = make_tiny_dataset(tmp_path / "photos", n_objects=4, views=3, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    engine = SearchEngine(db, index="hnsw")
    try:
        remove_images(db, ["ukbench00000.jpg", "ukbench00004.jpg"])
        for fresh in (engine.refreshed(index="hnsw"), None):
            fresh = fresh or SearchEngine(db, index="hnsw")
            try:
                for row in range(len(fresh.image_ids)):
                    top = fresh.hits(*fresh.neighbours(fresh.row_vector(row), 1))[0]
                    assert top.image_id == fresh.image_ids[row]
            finally:
                fresh.close()
    finally:
        engine.close()
    meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
    assert meta["removed_seen"] == 2 and meta["count"] == 10


def test_an_index_over_row_numbers_is_rebuilt_once_images_are_removed(tmp_path):
    """An index saved without the stable ids (older versions, or a caller that did not pass
    them) labels rows; after a removal rows are not ids, so it must not be caught up by id."""
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from ris.index import open_search_index
    from ris.index_state import source_of

    x = clustered_vectors(600, 8, seed=5)
    db = make_feature_db(tmp_path / "f.h5", x)
    remove_images(db, [f"img{i:06d}.jpg" for i in range(0, 600, 2)])  # now row r holds id 2r + 1
    with FeatureDB(db) as f:
        legacy = {"content_id": f.content_id, "history": f.content_history, "vectors": "raw"}
        open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=legacy)
    with FeatureDB(db) as f:
        index = open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
        _, found = index.search(f.features[:], 1)
        assert len(index) == 300 and (found[:, 0] == np.arange(300)).mean() > 0.95


def test_a_removal_without_room_for_its_rewrite_names_the_database_and_leaves_it_unchanged(tmp_path):
    """Under a quota or a file size limit (invisible to the free-space check) the rewrite's room
    cannot be reserved: ris-index remove and --sync said only "error: File too large"."""
    import hashlib
    from ris.testing import make_feature_db
    from ris.testing_faults import run_size_limited

    db = make_feature_db(tmp_path / "f.h5", np.random.default_rng(0).standard_normal((500, 256)).astype(np.float32))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    done = run_size_limited("index", ["remove", "--features-db", db, "img000003.jpg"], limit=100000, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"ris-index: error: {db}: could not rewrite it without the removed images (File too large); it is unchanged"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def _command(*args) -> int:
    """ris-extract as the shell runs it: errors are one line and an exit status."""
    from ris.cli.common import run
    from ris.cli.extract import main

    return run("ris-extract", main, list(args))


def test_a_symlink_pointed_at_another_photo_is_extracted_again(tmp_path):
    """``rm link.jpg; ln -s other.jpg link.jpg``: the name stays, the picture changes. The link's
    own times changed, its old target's did not: --sync looked only at the target and kept the
    old picture's features under the link's name."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    (data / "link.jpg").symlink_to("ukbench00000.jpg")
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    time.sleep(0.05)
    (data / "link.jpg").unlink()
    (data / "link.jpg").symlink_to("ukbench00003.jpg")
    assert plan_sync(db)[3] == ["link.jpg"]
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    with FeatureDB(db) as f:
        rows = {name: i for i, name in enumerate(f.image_ids)}
        feats = f.features[:]
    np.testing.assert_array_equal(feats[rows["link.jpg"]], feats[rows["ukbench00003.jpg"]])


def test_a_sync_that_cannot_label_a_new_image_stops_before_removing_anything(tmp_path, capsys):
    """A database labelled ``--labels ukbench`` and a new file without a UKBench name: --sync
    removed the changed rows, then failed (exit 2, "nothing done") with those images missing."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), "--labels", "ukbench", *FAST) == 0
    with FeatureDB(db) as f:
        before = (f.image_ids, f.features[:])
    time.sleep(0.05)
    shutil.copy(data / "ukbench00003.jpg", data / "ukbench00000.jpg")  # changed
    shutil.copy(data / "ukbench00001.jpg", data / "holiday.jpg")  # new, not a UKBench name
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holiday.jpg" in err and "nothing was changed" in err
    with FeatureDB(db) as f:
        assert f.image_ids == before[0]
        np.testing.assert_array_equal(f.features[:], before[1])


def test_sync_labels_new_images_as_the_database_was_made_never_another_way(tmp_path, capsys):
    """``--sync --labels none`` on a database labelled by UKBench names stored 'none' as its mode:
    every later sync left new images unlabelled beside labelled ones. A --labels that differs from
    the database's is refused; the same one is accepted."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), "--labels", "ukbench", *FAST) == 0
    shutil.copy(data / "ukbench00001.jpg", data / "ukbench00104.jpg")
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--labels", "none", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--labels ukbench" in err and "--labels none" in err
    assert _command("--sync", "--features-db", str(db), "--labels", "ukbench", "--no-progress") == 0
    with FeatureDB(db) as f:
        assert f.attrs["labels_mode"] == "ukbench"
        assert f.label_names[f.labels[f.image_ids.index("ukbench00104.jpg")]] == "26"


def test_two_syncs_planned_at_once_do_the_work_once_and_the_refused_one_did_nothing(tmp_path, monkeypatch, capsys):
    """Two ``ris-extract --sync`` runs planned at the same moment: the writer lock was taken only to
    remove and to extract, so the second removed (and extracted again) the row the first had just
    made of the same changed file, a new id each time; or it removed rows and then, its extraction
    refused by the lock, exited 2 although its removals had happened. The lock is now taken before
    planning: the second is refused before it reads or changes anything, and the work is done once."""
    import ris.sync

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    time.sleep(0.05)
    shutil.copyfile(data / "ukbench00003.jpg", data / "ukbench00000.jpg")  # another picture: extracted again
    shutil.copyfile(data / "ukbench00002.jpg", data / "new.jpg")
    with FeatureDB(db) as f:
        next_id = f.next_id
    real, second = ris.sync._plan, {}

    def planned_with_another(*args):  # the first run has planned: the second runs whole now
        plan = real(*args)
        if not second:
            second["status"] = None  # once
            with FeatureDB(db) as f:
                before = (f.content_id, f.next_id)
            second["status"] = _command("--sync", "--features-db", str(db), "--no-progress")
            with FeatureDB(db) as f:
                second["changed"] = (f.content_id, f.next_id) != before
        return plan

    monkeypatch.setattr(ris.sync, "_plan", planned_with_another)
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    err = capsys.readouterr().err
    assert second == {"status": 2, "changed": False}, err  # refused, and it changed nothing
    assert "being written by" in err
    with FeatureDB(db) as f:  # the changed file and the new one extracted once each: two new ids
        assert f.next_id == next_id + 2 and sorted(f.image_ids).count("ukbench00000.jpg") == 1
        assert "new.jpg" in f.image_ids


def test_a_database_whose_images_were_all_removed_says_so(tmp_path, capsys):
    """After every image was removed: ``ris-index info`` printed "ids None..None" and ris-eval
    "no labels to evaluate against" (they were labelled; there were none left)."""
    from ris.cli.common import run
    from ris.cli.eval import main as eval_main
    from ris.cli.index import main as index_main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(8, 4, seed=2), labels=["a", "b"] * 4)
    with FeatureDB(db) as f:
        remove_images(db, f.image_ids)
    capsys.readouterr()
    assert run("ris-index", index_main, ["info", "--features-db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "0 images, no images" not in out and "None" not in out and "0 images" in out
    assert run("ris-eval", eval_main, ["--features-db", str(db)]) == 2
    assert "no images to evaluate (the database is empty" in capsys.readouterr().err


def test_a_database_named_through_a_symlink_is_written_through_it(tmp_path, capsys):
    """`--features-db link.h5` (link.h5 -> real.h5): a removal, --sync or --append replaced the link
    by a new plain file and left real.h5, what every other name sees, with the old rows; the writer
    lock was taken on link.h5.lock, so a writer using real.h5 was not kept out either."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=3, views=2, size=64)
    real = tmp_path / "store" / "real.h5"
    assert _extract("--dataset", str(data), "--features-db", str(real), *FAST) == 0
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    s = remove_images(link, ["ukbench00001.jpg"])
    assert s.rows == 5 and link.is_symlink()
    with FeatureDB(real) as f:
        assert len(f) == 5 and "ukbench00001.jpg" not in f.image_ids
    shutil.copy(data / "ukbench00000.jpg", data / "new.jpg")
    (data / "ukbench00003.jpg").unlink()
    capsys.readouterr()
    assert _extract("--sync", "--features-db", str(link), "--no-progress", "--json") == 0
    assert link.is_symlink() and json.loads(capsys.readouterr().out)["added"] == 2  # new.jpg, ukbench00001.jpg
    with FeatureDB(real) as f:
        assert sorted(f.image_ids) == sorted(p.name for p in data.glob("*.jpg"))
    with WriterLock(real).acquire():  # one lock, whichever name a writer uses
        with pytest.raises(DatabaseLocked):
            WriterLock(link).acquire()
    assert not (tmp_path / "link.h5.lock").exists()


def test_a_fixed_broken_image_is_retried_even_after_the_database_was_rewritten(tmp_path, capsys):
    """A failed image was retried only when its file was newer than the database file; any later
    rewrite (an --append of another image, a removal) moved that time on, and the fixed photo
    was never extracted."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    (data / "broken.jpg").write_bytes(b"")
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    shutil.copy(data / "ukbench00000.jpg", data / "broken.jpg")  # fixed ...
    time.sleep(0.05)
    shutil.copy(data / "ukbench00003.jpg", data / "new.jpg")
    assert _extract("--dataset", str(data), "--features-db", str(db), "--append", *FAST) == 0  # ... then a rewrite
    capsys.readouterr()
    assert _extract("--sync", "--features-db", str(db), "--no-progress", "--json") == 0
    with FeatureDB(db) as f:
        assert "broken.jpg" in f.image_ids and not f.failures


def test_a_sync_with_a_still_broken_image_leaves_the_database_and_its_caches_alone(tmp_path, capsys):
    """One broken photo in the folder (an empty or damaged .jpg): every --sync of the unchanged
    folder removed its failed entry, rewrote the database twice (a removal, then an append that
    failed on it again), drew a new content id and deleted the caches keyed on it (head
    embeddings, DBA, SIFT for --verify), and re-saved the HNSW index. A failed image that still
    fails the same way keeps its entry and is reported as skipped; nothing is written."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    (data / "broken.jpg").write_bytes(b"")
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    cache = tmp_path / "f.h5.dba-n2-a3.h5"
    cache.write_bytes(b"a cache keyed on the content id")
    with FeatureDB(db) as f:
        content, failures = f.content_id, f.failures
    stat = db.stat()
    assert plan_sync(db)[4] == []  # still broken, the same way: nothing to retry
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--no-progress", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == [list(failures[0])] and out["retried"] == [] and out["added"] == 0
    assert (db.stat().st_mtime_ns, db.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino) and cache.exists()
    with FeatureDB(db) as f:
        assert f.content_id == content and f.failures == failures
    (data / "broken.jpg").write_bytes(b"not an image at all")  # broken another way: tried again
    assert plan_sync(db)[4] == ["broken.jpg"]
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    with FeatureDB(db) as f:
        assert [i for i, _ in f.failures] == ["broken.jpg"] and f.failures != failures


def test_rows_are_stamped_no_later_than_their_files_were_read(tmp_path):
    """A row's added_at was the time it was written; the images are decoded batches ahead, so a
    file replaced between its reading and the row's writing looked older than its row, and --sync
    kept the old picture's features for good. Rows now carry the time the run began reading."""
    from ris.featurewriter import FeatureWriter

    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap"}, (4,), ["a"])
    began = time.time()
    time.sleep(0.2)  # images read and decoded ahead of the write
    w.add(["x.jpg"], np.ones((1, 4), np.float32), ["a"])
    w.finish({})
    with FeatureDB(tmp_path / "f.h5") as f:
        assert f.added_at[0] <= began


def test_a_resumed_sync_drops_rows_of_files_deleted_since_its_kill(tmp_path, capsys):
    """A killed --sync leaves its .partial; files deleted before the next --sync kept the rows the
    partial held for them (searched, returned) until yet another sync."""
    from ris.featurewriter import FeatureWriter

    data = make_tiny_dataset(tmp_path / "photos", n_objects=3, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    for i in range(4):
        shutil.copy(data / f"ukbench{i:05d}.jpg", data / f"new{i}.jpg")
    # a sync killed after committing new0 and new1: its .partial holds them
    with FeatureDB(db) as f:
        attrs, shape, names = dict(f.attrs), f.features.shape[1:], list(f.label_names)
        new_rows = f.features[:2]
    w = FeatureWriter(db, attrs, shape, names, append=True)
    w.add(["new0.jpg", "new1.jpg"], new_rows, [names[0], names[0]])
    w.close()  # not finished: what a killed run leaves
    (data / "new0.jpg").unlink()
    capsys.readouterr()
    assert _extract("--sync", "--features-db", str(db), "--no-progress", "--json") == 0
    with FeatureDB(db) as f:
        assert "new0.jpg" not in f.image_ids and {"new1.jpg", "new2.jpg", "new3.jpg"} <= set(f.image_ids)


def _older(folder: Path, seconds: float = 3600) -> None:
    """Every file of ``folder`` dated ``seconds`` back (a backup restored with its times)."""
    for p in folder.iterdir():
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns - int(seconds * 1e9), st.st_mtime_ns - int(seconds * 1e9)))


def test_a_folder_replaced_by_another_with_the_same_names_and_older_files_is_extracted_again(tmp_path):
    """``rm -rf album && mv backup/album album``: the same names, other photos, all older than the
    rows (a rename changes the folder's ctime, not its files'). The rows kept only times, so --sync
    kept the old photos' features under the new photos' names. Rows now keep each file's size and
    mtime as read, and a file whose size or mtime differs is extracted again."""
    data = make_tiny_dataset(tmp_path / "album", n_objects=2, views=2, size=64)
    other = make_tiny_dataset(tmp_path / "backup" / "album", n_objects=2, views=2, size=64, seed=7)
    _older(other)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    shutil.rmtree(data)
    os.rename(other, data)
    assert sorted(plan_sync(db)[3]) == sorted(p.name for p in data.glob("*.jpg"))
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    assert plan_sync(db)[3] == []  # and in step afterwards: nothing changed since
    fresh = tmp_path / "fresh.h5"
    assert _extract("--dataset", str(data), "--features-db", str(fresh), *FAST) == 0
    with FeatureDB(db) as a, FeatureDB(fresh) as b:
        got = dict(zip(a.image_ids, a.features[:]))
        for name, vec in zip(b.image_ids, b.features[:]):
            np.testing.assert_allclose(got[name], vec, atol=1e-5)


def test_a_folder_link_pointed_at_another_folder_is_extracted_again(tmp_path):
    """``ln -sfn ../other current``: the dataset is reached through a folder link and the link is
    pointed at another folder holding the same names, older files."""
    first = make_tiny_dataset(tmp_path / "a", n_objects=2, views=2, size=64)
    second = make_tiny_dataset(tmp_path / "b", n_objects=2, views=2, size=64, seed=7)
    _older(second)
    top = tmp_path / "top"
    top.mkdir()
    (top / "current").symlink_to(first)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(top), "--features-db", str(db), *FAST) == 0
    (top / "current").unlink()
    (top / "current").symlink_to(second)
    assert len(plan_sync(db)[3]) == 4


def test_rows_keep_the_size_and_mtime_of_the_file_as_it_was_before_reading(tmp_path):
    """The stamp is taken before the file is read: a file changed after that differs from its row."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=1, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    with FeatureDB(db) as f:
        stamps = dict(zip(f.image_ids, f.file_stamps.tolist()))
    for p in data.glob("*.jpg"):
        st = p.stat()
        assert stamps[p.name] == [st.st_size, st.st_mtime_ns]


def test_a_database_made_before_file_stamps_falls_back_to_times(tmp_path):
    """Rows written before the stamps existed read as unknown (-1) and --sync judges them by times only;
    an --append onto such a database stamps its new rows."""
    import h5py

    data = make_tiny_dataset(tmp_path / "photos", n_objects=1, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    with h5py.File(db, "r+") as f:
        del f["file_stamp"]
    with FeatureDB(db) as f:
        assert (f.file_stamps == -1).all()
    assert plan_sync(db)[3] == []
    shutil.copy(data / "ukbench00000.jpg", data / "new.jpg")
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    with FeatureDB(db) as f:
        stamps = dict(zip(f.image_ids, f.file_stamps.tolist()))
    assert stamps["ukbench00000.jpg"] == [-1, -1] and stamps["new.jpg"][0] == (data / "new.jpg").stat().st_size


def test_file_stamps_survive_a_resume_and_a_removal(tmp_path):
    """A resumed run copies its committed rows' stamps; a removal keeps the others' (and makes
    unknown ones for a database made before them)."""
    import h5py

    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap"}, (4,), ["a"])
    w.add(["x.jpg", "y.jpg"], np.ones((2, 4), np.float32), ["a", "a"], [(10, 11), (20, 21)])
    w.close()  # killed: a partial is left
    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap"}, (4,), ["a"])
    assert w.resumed_rows == 2
    w.add(["z.jpg"], np.ones((1, 4), np.float32), ["a"], [(30, 31)])
    w.finish({})
    remove_images(tmp_path / "f.h5", ["y.jpg"])
    with FeatureDB(tmp_path / "f.h5") as f:
        assert f.image_ids == ["x.jpg", "z.jpg"] and f.file_stamps.tolist() == [[10, 11], [30, 31]]
    with h5py.File(tmp_path / "f.h5", "r+") as f:
        del f["file_stamp"]
    remove_images(tmp_path / "f.h5", ["x.jpg"])
    with FeatureDB(tmp_path / "f.h5") as f:
        assert f.image_ids == ["z.jpg"] and f.file_stamps.tolist() == [[-1, -1]]


def test_recipe_options_equal_to_the_databases_are_accepted_with_sync(tmp_path, capsys):
    """A script that re-runs its extraction command with ``--sync`` added (the same --model, --weights,
    --resize) was refused as if it asked for another recipe: the options name the database's own."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), "--labels", "ukbench", *FAST) == 0
    shutil.copy(data / "ukbench00001.jpg", data / "ukbench00104.jpg")
    capsys.readouterr()
    assert _command("--sync", "--dataset", str(data), "--features-db", str(db), "--labels", "ukbench", *FAST) == 0, \
        capsys.readouterr().err
    with FeatureDB(db) as f:
        assert "ukbench00104.jpg" in f.image_ids and len(f.image_ids) == 5


@pytest.mark.parametrize("given", [["--preset", "accurate"], ["--model", "mobilenet_v2", "--flip"], ["--resize", "96"],
                                   ["--aspect", "keep"], ["--flip"], ["--weights", "imagenet"]])
def test_recipe_options_given_with_sync_are_refused_not_ignored(tmp_path, capsys, given):
    """``--sync`` extracts with the database's own recipe: ``--sync --preset accurate`` on another recipe's
    database said nothing, and its new images were made the old way. A recipe option is refused, naming it,
    before anything is read or changed."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), "--labels", "ukbench", *FAST) == 0
    shutil.copy(data / "ukbench00001.jpg", data / "ukbench00104.jpg")
    with FeatureDB(db) as f:
        before = f.image_ids
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--no-progress", *given) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{db}: --sync extracts new images with the database's own recipe" in err
    assert given[0] in err and "--overwrite" in err, err
    with FeatureDB(db) as f:
        assert f.image_ids == before


def _ids(db) -> dict:
    with FeatureDB(db) as f:
        return dict(zip(f.image_ids, f.row_ids.tolist()))


def _count_digests(monkeypatch) -> list:
    import ris.filestamp

    calls = []
    real = ris.filestamp.file_digest
    monkeypatch.setattr(ris.filestamp, "file_digest", lambda p: calls.append(p) or real(p))
    return calls


def test_a_copied_or_chmodded_folder_keeps_its_rows_and_ids(tmp_path, capsys, monkeypatch):
    """``cp -a photos photos2; ris-extract --sync --dataset photos2`` (or ``chmod -R go-r``): only the
    files' ctimes were new, yet every image was extracted again under a new id (a client holding ids
    got 404s). A file whose bytes have the digest its row was read with keeps its row and id; its
    row's times and stamp are refreshed, so the next --sync reads no file again."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    before = _ids(db)
    with FeatureDB(db) as f:
        content, features = f.content_id, f.features[:]
        assert (f.file_digests != 0).all()
    copy = tmp_path / "photos2"
    shutil.copytree(data, copy)  # cp -a: times kept, new ctimes
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--dataset", str(copy), "--no-progress") == 0
    out, err = capsys.readouterr()
    assert "0 replaced (file changed), 0 extracted" in out
    assert f"{db}: 4 file(s) with new times but the same content kept their rows" in err
    assert _ids(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "photos", "photos2"]
    with FeatureDB(db) as f:  # the same rows: caches made from them stay valid
        assert f.content_id == content and f.dataset_root and (f.features[:] == features).all()
    calls = _count_digests(monkeypatch)
    assert plan_sync(db, copy)[3] == [] and calls == []  # refreshed: nothing is read again
    time.sleep(0.05)
    for p in copy.glob("*.jpg"):
        p.chmod(0o600)  # chmod -R go-r
    assert _command("--sync", "--features-db", str(db), "--dataset", str(copy), "--no-progress") == 0
    assert _ids(db) == before and len(calls) <= 4  # hashed once each, at most
    calls.clear()
    assert plan_sync(db, copy)[3] == [] and calls == []


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_still_extracted_again(tmp_path):
    """``exiftool -P``: other bytes, the same size and mtime; only the ctime tells. Its digest differs."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    before = _ids(db)
    p = data / "ukbench00001.jpg"
    st = p.stat()
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # other pixels, the same size
    time.sleep(0.05)
    p.write_bytes(bytes(raw))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    assert plan_sync(db)[3] == ["ukbench00001.jpg"]
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    after = _ids(db)
    assert after.get("ukbench00001.jpg", -1) != before["ukbench00001.jpg"]
    assert {n: i for n, i in after.items() if n != "ukbench00001.jpg"} == {
        n: i for n, i in before.items() if n != "ukbench00001.jpg"}


def test_a_symlink_pointed_at_another_photo_changes_despite_digests(tmp_path):
    """A link re-pointed at another photo: the bytes it names now differ from its row's digest."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    (data / "link.jpg").symlink_to("ukbench00000.jpg")
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    with FeatureDB(db) as f:
        digests = dict(zip(f.image_ids, f.file_digests.tolist()))
    assert digests["link.jpg"] == digests["ukbench00000.jpg"] != 0
    time.sleep(0.05)
    (data / "link.jpg").unlink()
    (data / "link.jpg").symlink_to("ukbench00003.jpg")
    assert plan_sync(db)[3] == ["link.jpg"]


def test_a_database_made_before_file_digests_syncs_by_times_and_stamps(tmp_path):
    """Rows without a digest (older databases) read as unknown (0) and are judged as before;
    a removal keeps the digests of the rows it copies."""
    import h5py

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    with FeatureDB(db) as f:
        digests = dict(zip(f.image_ids, f.file_digests.tolist()))
    remove_images(db, ["ukbench00002.jpg"])
    with FeatureDB(db) as f:
        assert dict(zip(f.image_ids, f.file_digests.tolist())) == {
            n: d for n, d in digests.items() if n != "ukbench00002.jpg"}
    with h5py.File(db, "r+") as f:
        del f["file_digest"]
    with FeatureDB(db) as f:
        assert (f.file_digests == 0).all()
    copy = tmp_path / "photos2"
    shutil.copytree(data, copy)
    assert sorted(plan_sync(db, copy)[3]) == ["ukbench00000.jpg", "ukbench00001.jpg", "ukbench00003.jpg"]
    assert _command("--sync", "--features-db", str(db), "--dataset", str(copy), "--no-progress") == 0
    with FeatureDB(db) as f:  # the new rows carry digests
        assert len(f) == 4 and (f.file_digests != 0).all()


def test_a_sync_of_a_moved_folder_records_the_new_folder(tmp_path, capsys):
    """``mv photos album; ris-extract --sync --dataset album``: nothing changed but the folder's name,
    so nothing was rewritten and the database still named ``photos``: the next ``--sync`` (and
    thumbnails, --rotations, --verify) failed with 'photos: not a folder'. The folder synced against
    is recorded; the rows, ids and content id stay (caches made from them hold)."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    before = _ids(db)
    with FeatureDB(db) as f:
        content = f.content_id
    moved = tmp_path / "album"
    os.rename(data, moved)
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--dataset", str(moved), "--no-progress") == 0
    out, err = capsys.readouterr()
    assert "0 removed (file gone), 0 replaced (file changed), 0 extracted" in out
    assert f"{db}: its images' folder is now {moved} (was {data})" in err
    with FeatureDB(db) as f:
        assert f.dataset_root == str(moved) and f.content_id == content
    assert _ids(db) == before
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0  # no --dataset needed now
    assert "in step with" in capsys.readouterr().out and _ids(db) == before


def test_a_dataset_given_as_a_folder_link_is_synced_through_the_link(tmp_path, capsys):
    """``ris-extract --dataset photos/current`` (a link; ``ln -sfn b current`` switches albums): the
    database recorded the link's target, so after the link was pointed at another folder with the
    same names and older files, a plain ``--sync`` said 'in step with .../a' and kept a's features
    under b's names. The folder is recorded as given (made absolute, links kept)."""
    first = make_tiny_dataset(tmp_path / "a", n_objects=2, views=2, size=64)
    second = make_tiny_dataset(tmp_path / "b", n_objects=2, views=2, size=64, seed=7)
    _older(second)
    link = tmp_path / "current"
    link.symlink_to(first)
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(link), "--features-db", str(db), *FAST) == 0
    with FeatureDB(db) as f:
        assert f.dataset_root == str(link)
    link.unlink()
    link.symlink_to(second)
    capsys.readouterr()
    assert _command("--sync", "--features-db", str(db), "--no-progress") == 0
    assert f"in step with {link}: 0 removed (file gone), 4 replaced (file changed)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_a_followed_index_is_named_by_a_file_that_exists(tmp_path, kind):
    """'f.h5.hnsw: follows the database' named no file: the HNSW index lies in f.h5.hnsw.json
    (its metadata) and the graph that names; the line names the metadata now."""
    pytest.importorskip({"ivfpq": "faiss", "hnsw": "hnswlib"}[kind])
    from ris.index import open_search_index
    from ris.index_state import source_of
    from ris.index import follow_saved_indexes

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(1200, 16))
    with FeatureDB(db) as f:
        open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
    logged: list[str] = []
    assert follow_saved_indexes(db, log=logged.append) == [kind]
    assert len(logged) == 1 and os.path.isfile(logged[0].split(": follows the database")[0]), logged


@pytest.mark.parametrize("bom, codec", [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8")])
def test_ris_index_remove_from_file_reads_a_list_with_a_byte_order_mark(tmp_path, capsys, bom, codec):
    """A list saved by Windows Notepad (UTF-16 with a byte-order mark) was read as UTF-8: no name
    matched, and each 'not in the database:' line printed its NUL characters raw. It is decoded
    by its mark now; a name not found is printed with its control characters escaped."""
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    listed = tmp_path / "list.txt"
    listed.write_bytes(bom + "img000001.jpg\r\nimg000003.jpg\r\nno\x1bpe.jpg\r\n".encode(codec))
    assert main(["remove", "--features-db", str(db), "--from-file", str(listed)]) == 1  # one name not found
    out = capsys.readouterr().out
    with FeatureDB(db) as f:
        assert len(f) == 18 and "img000001.jpg" not in f.image_ids and "img000003.jpg" not in f.image_ids
    assert "\x00" not in out and "\x1b" not in out and "  not in the database: no\\x1bpe.jpg" in out.splitlines(), out


def test_ris_index_remove_from_file_refuses_a_list_that_is_not_text(tmp_path):
    """UTF-16 without a mark (or cut in half) holds NUL bytes, which no file name has: refused in
    one line naming the file, nothing removed."""
    from ris.errors import RisError
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    listed = tmp_path / "list.txt"
    for data in ("img000001.jpg\n".encode("utf-16-le"), b"\xff\xfe" + "img000001.jpg\n".encode("utf-16-le")[:-1]):
        listed.write_bytes(data)
        with pytest.raises(RisError, match=r"list\.txt: .*(NUL|UTF-16)"):
            main(["remove", "--features-db", str(db), "--from-file", str(listed)])
    with FeatureDB(db) as f:
        assert len(f) == 20


def test_a_damaged_index_left_behind_by_a_removal_says_how_to_rebuild_it(tmp_path):
    """`ris-index remove` (or `--sync`) beside a damaged saved index warned '...; using exact search
    (rebuild it with --index hnsw)': nothing searches there, and no ris-index flag of that name
    rebuilds it. The warning says the index was not caught up and the command that rebuilds it."""
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from ris.index import follow_saved_indexes

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    (tmp_path / "f.h5.hnsw.json").write_text('{"kind": "hnsw", "count": 3')  # damaged metadata
    with pytest.warns(UserWarning) as seen:
        assert follow_saved_indexes(db, log=lambda line: None) == []
    message = str(seen[0].message)
    assert message.startswith("ignoring HNSW index ") and "using exact search" not in message
    assert message.endswith(f"; it was not caught up: ris-index build --features-db {db} --index hnsw rebuilds it")


def test_readme_lists_every_json_key_of_sync_and_ris_index(tmp_path, capsys):
    """The --json outputs of --sync and ris-index were documented nowhere; README lists their keys."""
    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    from dataclasses import fields

    from ris.cli.index import main
    from ris.sync import SyncSummary

    readme = (ROOT / "README.md").read_text()
    start = readme.index("# --json on each: --sync")
    listed = readme[start : readme.index("\n\n", start)]
    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    keys = {f.name for f in fields(SyncSummary)}
    for args in (["info"], ["remove", "img000001.jpg"], ["build", "--index", "hnsw"]):
        capsys.readouterr()
        assert main([*args, "--features-db", str(db), "--json"]) == 0
        keys |= set(json.loads(capsys.readouterr().out))
    assert [k for k in sorted(keys) if f'"{k}"' not in listed] == []


def _unlistable(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be listed, as one without read permission for the user (tests run as root)."""
    real = os.scandir

    def scandir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_keeps_its_rows(tmp_path, monkeypatch, capsys):
    """A sub-folder --sync could not list (its permissions changed, a network share's hiccup) was taken
    for deleted: its images' rows were removed ('1 removed (file gone)'), without a word about the
    folder. Its rows are kept and one warning line names the folder and the reason."""
    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    (data / "sub").mkdir()
    shutil.copy(data / "ukbench00000.jpg", data / "sub" / "a.jpg")
    db = tmp_path / "f.h5"
    assert _extract("--dataset", str(data), "--features-db", str(db), *FAST) == 0
    capsys.readouterr()
    _unlistable(monkeypatch, data / "sub")
    assert plan_sync(db)[2] == []  # not gone
    assert _extract("--sync", "--features-db", str(db), "--no-progress") == 0
    out, err = capsys.readouterr()
    with FeatureDB(db) as f:
        assert "sub/a.jpg" in f.image_ids and len(f) == 5
    assert "0 removed" in out, out
    assert f"warning: {data / 'sub'}: cannot list this folder (Permission denied); its rows are kept as they are" \
        in err.splitlines(), err
    shutil.copy(data / "ukbench00001.jpg", data / "new.jpg")  # a sync that extracts says it once, not twice
    assert _extract("--sync", "--features-db", str(db), "--no-progress") == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "cannot list" in line] == [
        f"warning: {data / 'sub'}: cannot list this folder (Permission denied); its rows are kept as they are"], err
    with FeatureDB(db) as f:
        assert "sub/a.jpg" in f.image_ids and "new.jpg" in f.image_ids and len(f) == 6
