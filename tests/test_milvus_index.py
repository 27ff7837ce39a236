"""Milvus: the collection made from a database, its search against exact, following appends and
removals, a half-built collection never trusted. Every test runs against Milvus Lite (embedded)
and, where one is reachable, a Milvus server (``milvus://HOST:PORT``, the same client code):
RIS_MILVUS_SERVER=HOST:PORT names one; RIS_MILVUS_SERVER=start starts a standalone Milvus 2.3
server from the ``milvus`` wheel (``pip install --no-deps milvus==2.3.5``) for the session, only
inside a network namespace with nothing but loopback (it listens on every interface; .ci/run runs
this file so, under ``unshare -n``). Otherwise the server cases skip, saying why."""
import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("pymilvus") is None or importlib.util.find_spec("milvus_lite") is None:
    pytest.skip("pymilvus / milvus-lite not installed (pip install 'ris[milvus]')", allow_module_level=True)

from ris.errors import RisError  # noqa: E402
from ris.featuredb import FeatureDB  # noqa: E402
from ris.featurewriter import FeatureWriter  # noqa: E402
from ris.index import ExactIndex, open_search_index, parse_index  # noqa: E402
from ris.index_state import source_of  # noqa: E402
from ris.sync import remove_images  # noqa: E402
from ris.testing import clustered_vectors, make_feature_db  # noqa: E402


@pytest.fixture(params=["lite", "server"])
def target(request, tmp_path):
    """What follows 'milvus:' in --index: a Milvus Lite file, or //HOST:PORT of a server."""
    if request.param == "lite":
        return str(tmp_path / "m.db")
    return "//" + request.getfixturevalue("milvus_server")


def open_milvus(db, target, metric="euclidean"):
    with FeatureDB(db) as f:
        return open_search_index(str(db), f.features, metric, kind=f"milvus:{target}", source=source_of(f))


@pytest.fixture
def labelled_db(tmp_path):
    x = clustered_vectors(1500, 16, seed=1)
    names = [f"dir/img{i:05d}.jpg" for i in range(1500)]
    labels = [f"obj{i // 4}" for i in range(1500)]
    return make_feature_db(tmp_path / "feats.h5", x, names, labels), x


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_collection_is_made_from_the_database_and_searches_like_exact(target, labelled_db, metric):
    db, x = labelled_db
    index = open_milvus(db, target, metric)
    assert len(index) == 1500
    q = clustered_vectors(40, 16, seed=2)
    d, i = index.search(q, 10)
    ref_d, ref_i = ExactIndex(x, metric).search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, ref_i)]) >= 0.95
    same = i == ref_i
    np.testing.assert_allclose(d[same], ref_d[same], rtol=1e-3, atol=1e-4)  # true L2 / 1 - cos
    rows = index.client.query(index.name, filter="id in [0, 7]", output_fields=["path", "label"])
    assert sorted((r["path"], r["label"]) for r in rows) == [("dir/img00000.jpg", "obj0"), ("dir/img00007.jpg", "obj1")]
    index.close()


def test_follows_removals_and_appends_without_rebuilding(target, labelled_db, monkeypatch):
    import ris.milvus_index

    db, x = labelled_db
    open_milvus(db, target).close()
    monkeypatch.setattr(ris.milvus_index.MilvusIndex, "create", classmethod(lambda *a, **k: pytest.fail("rebuilt")))
    gone = [f"dir/img{i:05d}.jpg" for i in range(0, 1500, 3)]
    remove_images(db, gone)
    extra = clustered_vectors(100, 16, seed=3)
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), ["new"], append=True)
    w.add([f"new{i}.jpg" for i in range(100)], extra, ["new"] * 100)
    w.finish({})
    index = open_milvus(db, target)
    with FeatureDB(db) as f:
        names, n = f.image_ids, len(f)
    assert len(index) == n == 1500 - len(gone) + 100
    _, found = index.search(np.concatenate([x[:30], extra[:30]]), 1)
    hits = [names[r] for r in found[:, 0]]
    assert not set(hits) & set(gone) and hits[30:] == [f"new{i}.jpg" for i in range(30)]
    index.close()


def test_a_collection_whose_rows_differ_from_its_state_is_rebuilt_even_when_the_count_agrees(target, labelled_db):
    """Milvus Lite that falls back to its previous manifest (a damaged last save) keeps the ris
    state of the newer one: after a sync that removed two images and added two, the collection
    held the two removed ones and lacked the two new ones, the count agreed, and searches silently
    returned fewer results and never the new images. Simulated: rows swapped behind ris' back."""
    db, x = labelled_db
    index = open_milvus(db, target)
    with FeatureDB(db) as f:
        last = int(f.row_ids[-1])
    index.client.delete(index.name, ids=[last, last - 1])  # the newest images are gone ...
    index.client.insert(index.name, [{"id": 10**9 + i, "path": "old.jpg", "label": "", "vector": x[i].tolist()}
                                     for i in range(2)])  # ... and as many stale ones are there
    index.client.flush(index.name)
    index.close()
    index = open_milvus(db, target)  # rebuilt: it finds the newest row again
    assert len(index) == 1500 and index.search(x[-1:], 1)[1][0, 0] == 1499
    found = index.client.query(index.name, filter=f"id >= {10**9}", output_fields=["id"])
    assert found == []
    index.close()


def test_a_half_built_collection_is_rebuilt(target, labelled_db):
    from ris.milvus_index import MilvusIndex, collection_name, connect

    db, x = labelled_db
    with FeatureDB(db) as f:
        name = collection_name(source_of(f), str(db))
    client = connect(target)
    half = MilvusIndex.create(client, name, 16, "euclidean", target)  # killed before its state was written
    half.add_ids(x[:100], np.arange(100))
    index = open_milvus(db, target)
    assert len(index) == 1500 and index.search(x[1000:1001], 1)[1][0, 0] == 1000
    index.close()


def test_bad_targets_are_one_clear_line():
    assert parse_index("milvus://localhost:19530") == ("milvus", "//localhost:19530")
    with pytest.raises(RisError, match="unknown index"):
        parse_index("milvus:")
    from ris.milvus_index import parse_target

    with pytest.raises(RisError, match=r"must end in \.db"):
        parse_target("feats.milvus")
    with pytest.raises(RisError, match="HOST:PORT"):
        parse_target("//localhost")
    assert parse_target("//db.example.org:19530") == ("http://db.example.org:19530", False)


def test_ris_index_build_rebuild_drops_the_collection(target, labelled_db, capsys):
    from ris.cli.index import main

    db, _ = labelled_db
    assert main(["build", "--features-db", str(db), "--index", f"milvus:{target}"]) == 0
    assert main(["build", "--features-db", str(db), "--index", f"milvus:{target}", "--rebuild"]) == 0
    err = capsys.readouterr().err
    assert err.count("building Milvus index") == 2  # built, then dropped and built again


def test_milvus_lite_that_cannot_write_says_so_in_one_line(tmp_path):
    """Milvus Lite on a full disk (here: a file size limit): ris printed 40 lines of Milvus Lite's and
    pymilvus' logged tracebacks, then 'MilvusException: <MilvusException: (code=1, message=...)>'."""
    from ris.testing_faults import run_size_limited

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(50, 8, seed=0))
    target = f"milvus:{tmp_path / 'm.db'}"
    done = run_size_limited("index", ["build", "--features-db", db, "--index", target], limit=1000)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1] == f"ris-index: error: {target}: [Errno 27] File too large", lines
    assert len(lines) <= 2, lines  # the 'building ...' line and the error


def test_closing_an_engine_lets_another_process_open_its_milvus_lite_file(tmp_path):
    """SearchEngine.close() (or its with-block) left the Milvus Lite client open: the .db stayed
    locked until the process ended, so a ris-search beside it failed 'is another process using it?'."""
    import subprocess
    import sys

    import ris
    from ris.testing import make_tiny_dataset

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    ris.build_database(photos, db, model="vgg16", weights="none", input_size=32, progress=False)
    target = f"milvus:{tmp_path / 'm.db'}"
    with ris.open_database(db, index=target) as engine:
        assert engine.search_row(3, k=1)[0].row in (0, 1, 2)
    code = ("from ris.featuredb import FeatureDB; from ris.index import open_search_index\n"
            "from ris.index_state import source_of\n"
            f"f = FeatureDB({str(db)!r}); i = open_search_index({str(db)!r}, f.features, 'euclidean', kind={target!r}, "
            "source=source_of(f)); print(len(i)); i.close()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr[-2000:]


def test_milvus_lite_paths_that_cannot_be_opened_say_why(tmp_path):
    """Every failure to open said 'is another process using it? Milvus Lite allows one', also for
    a path whose folder does not exist or that is a plain file."""
    from ris.milvus_index import connect

    (tmp_path / "plain.db").write_text("")
    for target, says in ((tmp_path / "plain.db", "not a folder"), (tmp_path / "no" / "dir" / "x.db", "does not exist")):
        with pytest.raises(RisError, match=says) as caught:
            connect(str(target))
        assert "another process" not in str(caught.value)


def test_milvus_lite_held_by_another_process_says_so_plainly(tmp_path):
    """Another process holding the folder's lock gave 'cannot open ...: <ConnectionConfigException:
    (code=1, message=Open local milvus failed)> (is another process using it? Milvus Lite allows
    one)': pymilvus' words and a guess. The lock is now looked at, and named as the reason."""
    import subprocess
    import sys

    from ris.milvus_index import connect

    target = tmp_path / "m.db"
    target.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(target / 'LOCK')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RisError) as caught:
            connect(str(target))
    finally:
        holder.communicate("", timeout=60)
    message = str(caught.value)
    assert str(target) in message and "another process is using it" in message, message
    assert "ConnectionConfigException" not in message and "?" not in message, message


def test_milvus_lite_that_cannot_be_written_names_the_reason_not_another_process(tmp_path):
    """A Milvus Lite folder in a read-only place (a read-only mount, another user's folder) was
    refused with 'is another process using it? Milvus Lite allows one', sending the user after a
    process that does not exist. Simulated root-proof: the folder's LOCK cannot be opened (a
    folder stands in its place), as it cannot on a read-only file system (checked there by hand:
    'Read-only file system')."""
    from ris.milvus_index import connect

    target = tmp_path / "m.db"
    (target / "LOCK").mkdir(parents=True)
    with pytest.raises(RisError) as caught:
        connect(str(target))
    message = str(caught.value)
    assert str(target) in message and "Is a directory" in message, message
    assert "another process" not in message and "ConnectionConfigException" not in message, message


@pytest.mark.parametrize("damage", ["index file", "both manifests"])
def test_a_damaged_milvus_lite_collection_is_rebuilt_when_milvus_is_asked_for(tmp_path, labelled_db, damage):
    """A Milvus Lite collection whose files were damaged (a truncated HNSW file, both manifests
    unreadable) made every search fail ('milvus:m.db: Error in void faiss::read_HNSW ...'), and
    'ris-index build --rebuild' then crashed as 'internal error (a bug in ris ...): MilvusException'
    (has_collection itself fails on it). As for a damaged hnsw or ivfpq file, the collection is
    now rebuilt when its kind is asked for, and --rebuild drops it."""
    from ris.cli.index import main

    db, x = labelled_db
    target = str(tmp_path / "m.db")
    open_milvus(db, target).close()
    (folder,) = (tmp_path / "m.db" / "collections").iterdir()
    if damage == "index file":
        (idx,) = folder.rglob("*.idx")
        with open(idx, "r+b") as fh:
            fh.truncate(1000)
    else:
        for name in ("manifest.json", "manifest.json.prev"):
            (folder / name).write_text("garbage")
    index = open_milvus(db, target)
    assert len(index) == 1500 and index.search(x[1000:1001], 1)[1][0, 0] == 1000
    index.close()
    for name in ("manifest.json", "manifest.json.prev"):
        (folder / name).write_text("garbage")
    assert main(["build", "--features-db", str(db), "--index", f"milvus:{target}", "--rebuild"]) == 0


def test_a_folder_that_is_not_milvus_lite_data_is_refused_untouched(tmp_path):
    """--index milvus:photos.db naming a folder of the user's own files (not Milvus Lite data) was
    used as one: Milvus Lite wrote LOCK, collections/ and databases/ among the user's files."""
    from ris.milvus_index import connect, disconnect

    folder = tmp_path / "photos.db"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(RisError, match="not a Milvus Lite folder") as caught:
        connect(str(folder))
    assert str(folder) in str(caught.value)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
    empty = tmp_path / "empty.db"
    empty.mkdir()
    disconnect(connect(str(empty)), str(empty))  # an empty folder, or Milvus Lite's own, is fine
    disconnect(connect(str(empty)), str(empty))


def test_an_index_dropped_unclosed_gives_back_its_share_of_the_milvus_lite_folder(tmp_path, labelled_db):
    """ris-serve's reload (SearchEngine.refreshed) opens a new index beside the old one and drops the
    old engine without closing it (requests may still be answered from it): each reload left one
    count in the process' tally of clients on the folder, so closing the last engine never stopped
    Milvus Lite, whose lock stayed held until the process ended (after 8 reloads: 8 left)."""
    import fcntl
    import gc

    db, _ = labelled_db
    target = str(tmp_path / "m.db")
    old = open_milvus(db, target)
    new = open_milvus(db, target)  # as a reload: the new one before the old one goes
    del old
    gc.collect()
    new.close()
    with open(tmp_path / "m.db" / "LOCK", "a") as fh:  # refused while Milvus Lite still holds it
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_the_api_answers_the_distances_of_exact_search(target, tmp_path, metric):
    """MilvusIndex.search answered Milvus' own float32 distances (squared L2 rooted, 1 - cosine):
    a float32 step off the exact distance the commands show (1e-3 at distances of 10^4), near-
    duplicates' 1 - cosine 100 times off; ris' commands recompute them from the stored rows
    (ris.topk.exact_shown), direct API callers got Milvus' own."""
    from ris.topk import exact_shown

    rng = np.random.default_rng(4)
    x = (np.maximum(rng.normal(size=(300, 512)), 0) * 30 + 200).astype(np.float32)
    db = make_feature_db(tmp_path / "big.h5", x)
    index = open_milvus(db, target, metric)
    q = np.concatenate([x[:10] + (rng.normal(size=(10, 512)) * 1e-2).astype(np.float32),  # near-duplicates
                        (np.maximum(rng.normal(size=(10, 512)), 0) * 30 + 200).astype(np.float32)])
    d, rows = index.search(q, 5)
    index.close()
    assert (rows[:10, 0] == np.arange(10)).all()
    shown = [exact_shown(q[i : i + 1], d[i : i + 1], rows[i : i + 1], x.__getitem__, metric) for i in range(len(q))]
    np.testing.assert_array_equal(d, np.concatenate([s[0] for s in shown]))
    np.testing.assert_array_equal(rows, np.concatenate([s[1] for s in shown]))


def test_a_server_is_never_asked_for_more_results_than_it_gives():
    """A Milvus server refuses a top-k above 16,384 (its own error, after the call); Milvus Lite
    accepts it. For a milvus://HOST:PORT index the request is refused first, in one line saying
    the limit. Checked with a stand-in client: no server needed."""
    from ris.milvus_index import SERVER_MAX_TOPK, MilvusIndex

    class Client:
        asked = []

        def search(self, name, data, limit, **kw):
            self.asked.append(limit)
            return [[{"id": 0, "distance": 0.0}] for _ in data]

    q = np.zeros((1, 4), np.float32)
    server = MilvusIndex(Client(), "ris_x_raw", 4, "euclidean", "milvus://db.example.org:19530")
    with pytest.raises(RisError, match=r"milvus://db\.example\.org:19530: .*20000 results.*16384"):
        server.search(q, 20000)
    assert Client.asked == []
    assert server.search(q, SERVER_MAX_TOPK)[1][0, 0] == 0 and Client.asked == [16384]
    lite = MilvusIndex(Client(), "ris_x_raw", 4, "euclidean", "milvus:/tmp/m.db")
    lite.search(q, 20000)
    assert Client.asked[-1] == 20000


def _overwrite(db, vectors):
    """ris-extract --overwrite of ``db``: a new database (a new lineage) replaces it."""
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (vectors.shape[1],), [], overwrite=True)
    w.add([f"img{i:06d}.jpg" for i in range(len(vectors))], vectors, [""] * len(vectors))
    w.finish({})


def open_head(db, target, model, vectors, name):
    """A head's embeddings as ris-search --model gives them to the index (no Keras needed)."""
    with FeatureDB(db) as f:
        source = source_of(f, {"content_id": f.content_id, "history": f.content_history, "vectors": f"emb-{name}",
                               "key": f"{f.content_key}|model={name}", "model": str(model)})
        return open_search_index(f"{db}.emb-{name}.h5", vectors, "euclidean", kind=f"milvus:{target}", source=source)


def test_collections_a_database_left_behind_are_removed_and_no_other_databases(target, tmp_path, capsys):
    """A Milvus Lite folder grew for ever: the collection of a database replaced by ris-extract
    --overwrite (a new lineage), and that of a head replaced by another ris-train'd model at the
    same path, were never dropped (m1.db held 4 collections, 2 of them stale). Only collections
    this database alone ever used, and can no longer use, go; those of other databases sharing
    the Milvus folder (another database, a copy of this one) and of a moved one stay."""
    x = clustered_vectors(200, 16, seed=5)
    f, other, copied, moved = (tmp_path / n for n in ("f.h5", "other.h5", "copied.h5", "moved.h5"))
    for db in (f, other, copied, moved):
        make_feature_db(db, x)

    def names(db=other):
        index = open_milvus(db, target)
        try:
            return set(index.client.list_collections())
        finally:
            index.close()

    before = names(f) | names(other) | names(copied) | names(moved)
    import shutil

    shutil.copyfile(copied, tmp_path / "copy2.h5")  # cp copied.h5 copy2.h5: both use one collection
    assert names(tmp_path / "copy2.h5") == before
    moved.rename(tmp_path / "moved_away.h5")  # a new database where it was: the moved one may come back
    make_feature_db(moved, x)
    capsys.readouterr()
    held = open_milvus(f, target)  # ris-serve answering from the old database while its reload opens the new
    _overwrite(f, x)
    assert held.name in names(f) and "removed" not in capsys.readouterr().err
    assert held.search(x[:1], 1)[1][0, 0] == 0
    held.close()
    _overwrite(copied, x)
    after = names(f) | names(moved) | names(copied)
    assert "removed" in capsys.readouterr().err
    assert len(after) == len(before) + 3 - 1  # f's old collection went; copied's and moved's stayed
    assert names(tmp_path / "moved_away.h5") == after and names(tmp_path / "copy2.h5") == after

    model = tmp_path / "model.keras"
    open_head(f, target, model, x * 2, "a").close()
    open_head(f, target, tmp_path / "other_model.keras", x * 3, "c").close()
    heads = names(f)
    open_head(f, target, model, x * 4, "b").close()  # another model written over model.keras
    err = capsys.readouterr().err
    assert len(names(f)) == len(heads)  # model.keras' old head went, other_model.keras' stayed, b came
    assert sum("removed" in line for line in err.splitlines()) == 1


def test_a_rebuilt_collection_still_belongs_to_every_database_that_used_it(target, tmp_path, capsys):
    """A collection rebuilt (ris-index build --rebuild, or a copy that diverged from the one that
    built it last) keeps the record of the databases it served: the copy's collection is not
    taken for the overwritten original's own leftover."""
    import shutil

    from ris.cli.index import main

    x = clustered_vectors(200, 16, seed=6)
    f, copy = make_feature_db(tmp_path / "f.h5", x), tmp_path / "copy.h5"
    shutil.copyfile(f, copy)
    open_milvus(copy, target).close()
    assert main(["build", "--features-db", str(f), "--index", f"milvus:{target}", "--rebuild"]) == 0
    w = FeatureWriter(copy, {"model": "synthetic", "pooling": "gap"}, (16,), [], append=True)
    w.add(["new.jpg"], x[:1] + 1, [""])
    w.finish({})
    open_milvus(copy, target).close()
    w = FeatureWriter(f, {"model": "synthetic", "pooling": "gap"}, (16,), [], append=True)
    w.add(["own.jpg"], x[:1] + 2, [""])  # f.h5's new id is another image than copy.h5's: rebuilt next
    w.finish({})
    index = open_milvus(f, target)
    name = index.name
    index.close()
    err = capsys.readouterr().err
    assert err.count("building Milvus index") == 3 and "a rebuild was asked for" in err
    _overwrite(f, x)
    index = open_milvus(f, target)
    kept = name in index.client.list_collections()
    index.close()
    assert kept and "removed" not in capsys.readouterr().err


def test_two_copies_used_in_turn_share_the_collection_without_rebuilding(target, tmp_path, monkeypatch):
    """cp f.h5 g.h5, then ris-extract --append on g.h5: each time f.h5 was searched after g.h5 its
    collection was rebuilt from scratch ('the database content changed'), although it held f.h5's
    rows and g.h5's appended ones only. f.h5 now drops the ids g.h5 appended (g.h5 adds them back
    when next searched). Once the copies' removal logs or appends differ, ids may name different
    images in each: that is rebuilt, and each copy still finds its own images."""
    import shutil

    import ris.milvus_index

    x = clustered_vectors(300, 16, seed=7)
    f, g = make_feature_db(tmp_path / "f.h5", x), tmp_path / "g.h5"
    shutil.copyfile(f, g)

    def append(db, vectors, names):
        w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), [], append=True)
        w.add(names, vectors, [""] * len(names))
        w.finish({})

    def search(db, q):
        index = open_milvus(db, target)
        try:
            with FeatureDB(db) as d:
                names = d.image_ids
            return len(index), [names[r] for r in index.search(q, 1)[1][:, 0]]
        finally:
            index.close()

    open_milvus(f, target).close()
    extra = clustered_vectors(20, 16, seed=8) + 5
    append(g, extra, [f"g{i}.jpg" for i in range(20)])
    with monkeypatch.context() as m:
        m.setattr(ris.milvus_index.MilvusIndex, "create", classmethod(lambda *a, **k: pytest.fail("rebuilt")))
        for _ in range(2):
            assert search(g, extra[:3]) == (320, ["g0.jpg", "g1.jpg", "g2.jpg"])
            n, hits = search(f, extra[:3])
            assert n == 300 and not any(h.startswith("g") for h in hits)
    append(f, extra[:5] + 0.01, [f"f{i}.jpg" for i in range(5)])  # the same new ids, other images
    assert search(f, extra[:3]) == (305, ["f0.jpg", "f1.jpg", "f2.jpg"])
    assert search(g, extra[:3]) == (320, ["g0.jpg", "g1.jpg", "g2.jpg"])
