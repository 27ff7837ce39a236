"""faiss IVF-PQ: recall against exact, the saved (memory-mapped) index, following appends and
removals without rebuilding, and a killed build that leaves nothing under the final name."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("faiss") is None:  # (not imported here: ris.faiss_index sets OpenMP up first)
    pytest.skip("faiss not installed (pip install 'ris[faiss]')", allow_module_level=True)

from ris.errors import RisError  # noqa: E402
from ris.faiss_index import IvfPqIndex, build_ivfpq, choose_params  # noqa: E402
from ris.stored_rows import StoredRows  # noqa: E402
from ris.featuredb import FeatureDB  # noqa: E402
from ris.featurewriter import FeatureWriter  # noqa: E402
from ris.index import ExactIndex, open_search_index  # noqa: E402
from ris.index_state import source_of  # noqa: E402
from ris.sidecars import clear_sidecars, ivfpq_path, sidecar_files  # noqa: E402
from ris.sync import remove_images  # noqa: E402
from ris.testing import clustered_vectors, make_feature_db  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def open_ivfpq(path, **kw):
    with FeatureDB(path) as db:
        return open_search_index(str(path), db.features, "euclidean", kind="ivfpq", source=source_of(db), **kw)


@pytest.mark.parametrize("metric,n,codec", [("euclidean", 10000, "pq"), ("cosine", 10000, "pq"),
                                            ("euclidean", 3000, "sq8")])
def test_recall_and_distances_against_exact(metric, n, codec):
    x = clustered_vectors(n, 16, seed=1)
    q = clustered_vectors(60, 16, seed=2)
    index = build_ivfpq(x, metric, progress=False)
    assert index.params.codec == codec
    ref_d, ref_i = ExactIndex(x, metric).search(q, 10)
    _, approx = index.search(q, 10)  # PQ distances only
    assert recall(approx, ref_i) >= 0.6
    index.stored = StoredRows(x)  # shortlist re-ranked exactly
    d, i = index.search(q, 10)
    assert recall(i, ref_i) >= 0.95
    same = i == ref_i
    np.testing.assert_allclose(d[same], ref_d[same], rtol=1e-4, atol=1e-5)  # exact units: L2 or 1 - cos
    assert np.all(np.diff(d, axis=1) >= 0)


def test_default_probes_keep_recall_with_reranking_at_small_sizes():
    """nprobe was 32 at every size: at 20,000 synthetic 256-d rows (1024 clusters, bench/index_scale.py)
    recall@10 with re-ranking was 0.89 (0.98 at 1M), since a small collection's neighbours lie in
    more of its cells. The default now probes enough cells to scan a few thousand rows (32 from
    ~500k rows on, as before); here (9,000 rows, 1024 clusters) 32 probes gave 0.89."""
    allx = clustered_vectors(9200, 128, seed=5, clusters=1024, spread=1.0)
    x, q = allx[:9000], allx[9000:]
    index = build_ivfpq(x, "euclidean", progress=False)
    index.stored = StoredRows(x)
    assert recall(index.search(q, 10)[1], ExactIndex(x, "euclidean").search(q, 10)[1]) >= 0.95


def test_params_for_ten_million_rows_fit_in_a_gigabyte():
    p = choose_params(10_000_000, 256)
    assert (p.nlist, p.m, p.nbits, p.opq, p.nprobe) == (4096, 64, 8, True, 32)
    assert (choose_params(1_000_000, 256).nlist, choose_params(1_000_000, 256).nprobe) == (4096, 32)  # as benched
    assert p.factory(256) == "OPQ64_256,IVF4096_HNSW32,PQ64x8"
    assert 10_000_000 * (p.m + 8) < 1 << 30  # codes + ids
    assert choose_params(20_000, 100).factory(100) == "IVF512,PQ50x8"  # m divides the dimension, no OPQ yet
    small = choose_params(500, 12)  # too few rows to train PQ codebooks: 8-bit scalar codes
    assert small.nlist * 39 <= 500 and small.factory(12) == f"IVF{small.nlist},SQ8"


def test_code_shapes_other_than_the_default():
    p = choose_params(10_000_000, 256, m=96, opq_dim=192)  # OPQ projects to a dimension 96 divides
    assert p.factory(256) == "OPQ96_192,IVF4096_HNSW32,PQ96x8" and p.code_bytes(256) == 96
    fs = choose_params(10_000_000, 256, m=128, nbits=4, fastscan=True)
    assert fs.factory(256) == "OPQ128_256,IVF4096_HNSW32,PQ128x4fs" and fs.code_bytes(256) == 64


def test_fastscan_codes_build_save_and_reload_with_their_settings(tmp_path):
    x = clustered_vectors(4000, 16, seed=1)
    params = choose_params(len(x), 16, codec="pq", nlist=64, m=8, nbits=4, fastscan=True, nprobe=7, rerank=0)
    index = build_ivfpq(x, "euclidean", params=params, progress=False)
    assert index.remove_ids(np.arange(5)) == 5  # removals must work for catching up with the database
    path = str(tmp_path / "v.ivfpq")
    index.save(path)
    loaded = IvfPqIndex.load(path)
    assert loaded.params == params and json.loads(Path(path).read_text())["factory"] == "IVF64,PQ8x4fs"
    assert len(loaded) == len(x) - 5
    import faiss

    assert faiss.extract_index_ivf(loaded.index).nprobe == 7
    ref = ExactIndex(x[5:], "euclidean").search(x[:40], 10)[1] + 5
    assert recall(loaded.search(x[:40], 10)[1], ref) >= 0.5


def test_saved_index_is_memory_mapped_and_reused(tmp_path, monkeypatch):
    import ris.faiss_index

    x = clustered_vectors(3000, 16, seed=3)
    db = make_feature_db(tmp_path / "feats.h5", x)
    built = open_ivfpq(db)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:2] == ["feats.h5", "feats.h5.ivfpq"] and len(names) == 3 and names[2].endswith(".faiss")
    assert [p.name for p in sidecar_files(db)] == names[1:]
    monkeypatch.setattr(ris.faiss_index, "build_ivfpq", lambda *a, **k: pytest.fail("rebuilt"))
    again = open_ivfpq(db)
    assert again.mmap and len(again) == 3000
    for a, b in zip(built.search(x[:20], 5), again.search(x[:20], 5)):
        np.testing.assert_array_equal(a, b)
    assert np.all(again.search(x[:20], 1)[1][:, 0] == np.arange(20))


def test_follows_appends_and_removals_without_rebuilding(tmp_path, monkeypatch):
    import ris.faiss_index

    x = clustered_vectors(3000, 16, seed=4)
    db = make_feature_db(tmp_path / "feats.h5", x)
    open_ivfpq(db)
    monkeypatch.setattr(ris.faiss_index, "build_ivfpq", lambda *a, **k: pytest.fail("rebuilt"))
    gone = [f"img{i:06d}.jpg" for i in range(0, 3000, 4)]
    remove_images(db, gone)
    extra = clustered_vectors(200, 16, seed=5)
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), [], append=True)
    w.add([f"new{i}.jpg" for i in range(200)], extra, [""] * 200)
    w.finish({})
    assert (tmp_path / "feats.h5.ivfpq").is_file()  # an append keeps the index files
    index = open_ivfpq(db)
    with FeatureDB(db) as f:
        names, n = f.image_ids, len(f)
    assert len(index) == n == 3000 - len(gone) + 200
    _, found = index.search(np.concatenate([x[:40], extra[:40]]), 3)
    hits = [names[r] for r in found[:, 0]]
    assert not set(hits) & set(gone)
    assert hits[40:] == [f"new{i}.jpg" for i in range(40)]  # appended rows found as themselves
    kept = [i for i in range(40) if i % 4]
    assert [hits[i] for i in kept] == [f"img{i:06d}.jpg" for i in kept]
    meta = json.loads((tmp_path / "feats.h5.ivfpq").read_text())
    assert meta["removed_seen"] == len(gone) and meta["count"] == n
    assert len(list(tmp_path.glob("feats.h5.ivfpq.*.faiss"))) == 1  # the old data files are gone


def test_a_reextracted_database_gets_a_new_index(tmp_path):
    x = clustered_vectors(2000, 16, seed=6)
    db = make_feature_db(tmp_path / "feats.h5", x)
    open_ivfpq(db)
    y = clustered_vectors(2000, 16, seed=7)
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), [], overwrite=True)
    w.add([f"img{i:06d}.jpg" for i in range(2000)], y, [""] * 2000)
    w.finish({})
    assert not (tmp_path / "feats.h5.ivfpq").exists()  # cleared with the other caches
    index = open_ivfpq(db)
    assert np.all(index.search(y[:10], 1)[1][:, 0] == np.arange(10))


def test_damaged_metadata_is_named_and_the_index_rebuilt(tmp_path):
    db = make_feature_db(tmp_path / "feats.h5", clustered_vectors(1500, 16, seed=8))
    open_ivfpq(db)
    (tmp_path / "feats.h5.ivfpq").write_text('{"kind": "ivfpq", "dim": 16}')
    from ris.errors import DatabaseError

    with pytest.raises(DatabaseError, match=r"feats\.h5\.ivfpq is damaged"):
        IvfPqIndex.load(ivfpq_path(db))
    with pytest.warns(UserWarning, match="ignoring IVF-PQ index"):  # auto never rebuilds: exact instead
        with FeatureDB(db) as f:
            assert isinstance(open_search_index(str(db), f.features, "euclidean", source=source_of(f), threshold=10),
                              ExactIndex)
    assert len(open_ivfpq(db)) == 1500


@pytest.mark.parametrize("text", ["", '{"kind": "ivfpq", "di', "[]", '{"kind": "hnsw"}'])
def test_unreadable_metadata_is_rebuilt_and_saved_not_refused_at_every_save(tmp_path, text):
    """Metadata that is not JSON (cut short, emptied) or not an IVF-PQ index's: the index was
    rebuilt, then its save read the old metadata for the data file to drop and failed on it, so
    ``ris-search --index ivfpq`` and ``ris-index build`` stopped with "cannot read it" every time,
    each leaving one more orphan data file. The rebuilt index is saved and used now."""
    from ris.cli.index import main as index_main

    x = clustered_vectors(1500, 16, seed=8)
    db = make_feature_db(tmp_path / "feats.h5", x)
    open_ivfpq(db)
    (tmp_path / "feats.h5.ivfpq").write_text(text)
    index = open_ivfpq(db)
    assert len(index) == 1500 and np.all(index.search(x[:5], 1)[1][:, 0] == np.arange(5))
    saved = IvfPqIndex.load(ivfpq_path(db))  # saved whole this time
    assert len(saved) == 1500
    data_files = set(tmp_path.glob("feats.h5.ivfpq.*.faiss"))
    assert len(data_files) <= 2  # the new one, and the orphan the damaged metadata named (dropped when old)
    (tmp_path / "feats.h5.ivfpq").write_text(text)
    assert index_main(["build", "--features-db", str(db), "--index", "ivfpq"]) == 0
    assert len(IvfPqIndex.load(ivfpq_path(db))) == 1500


def test_a_killed_saves_data_file_is_removed_by_the_next_build_unless_held_or_named(tmp_path):
    """``kill -9`` of ``ris-index build --index ivfpq`` after its data file was renamed into place
    but before its metadata was written left ``feats.h5.ivfpq.<token>.faiss`` (100 MB+ at 1M rows)
    that the rebuild kept: orphans were only dropped by a save more than 600 s later. Now a save
    drops every data file of the index that its metadata does not name and no process holds; one
    another process is still writing (it holds its lock) is kept, however old."""
    from ris.cli.index import main as index_main
    from ris.sidecars import create_locked

    x = clustered_vectors(1500, 16, seed=8)
    db = make_feature_db(tmp_path / "feats.h5", x)
    orphan = tmp_path / "feats.h5.ivfpq.0badf00d.faiss"  # the killed build's: no metadata names it
    orphan.write_bytes(b"x" * 100)
    minutes_ago = orphan.stat().st_mtime - 300  # killed, then built again a few minutes later
    os.utime(orphan, (minutes_ago, minutes_ago))
    other = tmp_path / "feats.h5.emb-0123456789ab.h5.ivfpq.0badf00d.faiss"  # another index's (an embedding cache's)
    other.write_bytes(b"z" * 100)
    live = tmp_path / "feats.h5.ivfpq.0123abcd.faiss"  # another process's save, not committed yet
    held = create_locked(live)
    try:
        os.utime(live, (minutes_ago - 3600,) * 2)
        assert index_main(["build", "--features-db", str(db), "--index", "ivfpq"]) == 0
        named = tmp_path / json.loads((tmp_path / "feats.h5.ivfpq").read_text())["data"]
        assert not orphan.exists()
        assert live.exists() and other.exists() and named.exists()
        index = IvfPqIndex.load(ivfpq_path(db), mmap=False)
        index.save(ivfpq_path(db))  # the next save: the named file is now the previous one, dropped
        again = tmp_path / json.loads((tmp_path / "feats.h5.ivfpq").read_text())["data"]
        assert again != named and not named.exists()
        assert sorted(tmp_path.glob("feats.h5.ivfpq.*.faiss")) == sorted([again, live])
    finally:
        os.close(held)
    IvfPqIndex.load(ivfpq_path(db), mmap=False).save(ivfpq_path(db))  # its writer gone: dropped
    assert len(list(tmp_path.glob("feats.h5.ivfpq.*.faiss"))) == 1 and other.exists()
    assert len(open_ivfpq(db)) == 1500

def test_an_empty_database_is_named_when_no_ivfpq_index_can_be_trained_on_it(tmp_path, capsys):
    """Every image removed, then ``--index ivfpq``: "ris-index: error: cannot build an IVF-PQ index
    over an empty database", naming no file (README: errors name their file). A search over it
    answers nothing, as every other kind does (it failed, so a service on --index ivfpq would keep
    serving the old rows after a sync removed every image, its reload failing)."""
    from ris.cli.common import run
    from ris.cli.index import main as index_main

    db = make_feature_db(tmp_path / "feats.h5", clustered_vectors(1, 16, seed=8))
    remove_images(db, ["img000000.jpg"])
    index = open_ivfpq(db)
    d, i = index.search(clustered_vectors(2, 16, seed=9), 5)
    assert len(index) == 0 and i.shape == (2, 0) and d.shape == (2, 0)
    assert not os.path.exists(ivfpq_path(db))  # nothing trained, nothing saved
    assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", "ivfpq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ris-index: error: {db}: ") and "--index exact or hnsw" in err


def test_a_data_file_damaged_in_place_is_refused_and_rebuilt(tmp_path):
    """Bytes changed in the middle of the .faiss file (same size) were used: answers from damaged
    codes, silently. The metadata holds the data file's CRC-32 now, as the HNSW index's does."""
    from ris.errors import DatabaseError

    x = clustered_vectors(1500, 16, seed=8)
    db = make_feature_db(tmp_path / "feats.h5", x)
    open_ivfpq(db)
    data = tmp_path / json.loads((tmp_path / "feats.h5.ivfpq").read_text())["data"]
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(255 - b for b in raw[middle : middle + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(DatabaseError, match=r"feats\.h5\.ivfpq is damaged \(its data file .*checksum"):
        IvfPqIndex.load(ivfpq_path(db))
    index = open_ivfpq(db)  # asked for by name: built again
    assert len(index) == 1500 and np.all(index.search(x[:5], 1)[1][:, 0] == np.arange(5))


def test_missing_faiss_is_a_clear_error(monkeypatch):
    from ris.faiss_index import _faiss

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(RisError, match=r"pip install 'ris\[faiss\]'"):
        _faiss()


KILLED_BUILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import ris.sidecars
    from ris.featuredb import FeatureDB
    from ris.index import open_search_index
    from ris.index_state import source_of

    calls = 0
    real = ris.sidecars.fsync_file

    def stall(path):  # the file is written in full under its temp name; now we get killed
        global calls
        calls += 1
        real(path)
        if calls == {stall_at}:
            print("written", path, flush=True)
            time.sleep(600)

    ris.sidecars.fsync_file = stall
    with FeatureDB({db!r}) as db:
        open_search_index({db!r}, db.features, "euclidean", kind={kind!r}, source=source_of(db))
    print("finished", flush=True)
""")


def _kill_9_once_written(script: str) -> None:
    """Run ``script`` (a build stalled after writing its data file) and kill -9 it once it says so."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("written"), line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind,stall_at,final", [("ivfpq", 1, "feats.h5.ivfpq"), ("ivfpq", 2, "feats.h5.ivfpq"),
                                                 ("hnsw", 1, "feats.h5.hnsw.json"), ("hnsw", 2, "feats.h5.hnsw.json")])
def test_a_killed_build_leaves_no_index_under_its_final_name(tmp_path, kind, stall_at, final):
    if kind == "hnsw":
        pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    x = clustered_vectors(2000, 16, seed=10)
    db = make_feature_db(tmp_path / "feats.h5", x)
    script = KILLED_BUILD.format(root=str(ROOT), db=str(db), kind=kind, stall_at=stall_at)
    _kill_9_once_written(script)
    assert not (tmp_path / final).exists()
    left = sidecar_files(db)
    assert left  # what the killed build left is named as a cache of this database ...
    for p in left:  # (an hour ago: older than a live writer's temp that is not locked yet)
        os.utime(p, (p.stat().st_mtime - 3600,) * 2)
    with FeatureDB(db) as f:  # ... never trusted: built again
        index = open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
        assert len(index) == 2000 and np.all(index.search(x[:5], 1)[1][:, 0] == np.arange(5))
    # ... and the next build removes what the killed one left (1.3 GB per killed save at 1M rows)
    assert [p.name for p in sidecar_files(db) if p.name.endswith(".tmp")] == []
    assert len([p for p in sidecar_files(db) if p.name.endswith((".faiss", ".graph"))]) == 1  # its data file only
    clear_sidecars(db)
    assert sidecar_files(db) == []


KILLED_REBUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import ris.sidecars
    from ris.cli.common import run
    from ris.cli.index import main

    real = ris.sidecars.fsync_file

    def stall(path):  # the new index is built and written under its temp name; now we get killed
        real(path)
        print("written", path, flush=True)
        time.sleep(600)

    ris.sidecars.fsync_file = stall
    run("ris-index", main, ["build", "--features-db", {db!r}, "--index", {kind!r}, "--rebuild"])
    print("finished", flush=True)
""")


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_a_killed_rebuild_leaves_the_old_index_usable_under_its_name(tmp_path, kind):
    """``ris-index build --rebuild`` deleted the saved index's metadata (the commit point) before
    building the new one, so a rebuild killed mid-way (kill -9, a reboot) left no index at all:
    ``--index auto`` fell back to exact search and ``--index KIND`` built from scratch. The old
    index now stays whole under its name until the rebuilt one is committed over it."""
    from ris.cli.common import run
    from ris.cli.index import main as index_main
    from ris.sidecars import hnsw_path

    if kind == "hnsw":
        pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    x = clustered_vectors(2000, 16, seed=10)
    db = make_feature_db(tmp_path / "feats.h5", x)
    assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", kind]) == 0
    meta = tmp_path / ("feats.h5.ivfpq" if kind == "ivfpq" else "feats.h5.hnsw.json")
    before = meta.read_text()
    script = KILLED_REBUILD.format(root=str(ROOT), db=str(db), kind=kind)
    _kill_9_once_written(script)
    assert meta.is_file() and meta.read_text() == before  # the old index, untouched
    with FeatureDB(db) as f:  # a saved-only open (what --index auto does) finds it and uses it
        index = open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f), build=False)
        assert type(index).__name__ == ("IvfPqIndex" if kind == "ivfpq" else "HnswIndex")
        assert len(index) == 2000 and np.all(index.search(x[:5], 1)[1][:, 0] == np.arange(5))
    for p in sidecar_files(db):  # (an hour ago: older than a live writer's temp that is not locked yet)
        os.utime(p, (p.stat().st_mtime - 3600,) * 2)
    assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", kind, "--rebuild"]) == 0
    assert meta.read_text() != before  # rebuilt and committed over the old one ...
    named = json.loads(meta.read_text())["data" if kind == "ivfpq" else "graph"]
    data = [p.name for p in sidecar_files(db) if p.name.endswith((".faiss", ".graph", ".tmp"))]
    assert data == [named]  # ... whose data file, and the killed rebuild's temp, are dropped
    if kind == "hnsw":
        assert not os.path.exists(hnsw_path(str(db)))


def test_index_scale_bench_parses_code_shapes_and_scores_both_recalls():
    spec = importlib.util.spec_from_file_location("index_scale", ROOT / "bench" / "index_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    over = bench.parse_params("m=96,opq_dim=192,fastscan=0,codec=pq")
    assert over == {"m": 96, "opq_dim": 192, "fastscan": False, "codec": "pq"}
    assert choose_params(10_000_000, 256, **over).factory(256) == "OPQ96_192,IVF4096_HNSW32,PQ96x8"
    for bad in ("mm=96", "m=x", "m="):
        with pytest.raises(ValueError, match="--ivfpq-params"):
            bench.parse_params(bad)
    assert bench.settings_for("ivfpq", None) == bench.SETTINGS["ivfpq"]
    assert bench.settings_for("ivfpq", "default,96") == [{"rerank": 0}, {"rerank": 100}, {"nprobe": 96, "rerank": 0},
                                                         {"nprobe": 96, "rerank": 100}]
    assert bench.settings_for("hnsw", "96") == bench.SETTINGS["hnsw"]
    truth = np.arange(20).reshape(2, 10)
    found = np.array([[0, *range(100, 109)], [*range(11, 20), 99]])  # query 0: only its nearest; 1: all but it
    assert bench.recall_at(found, truth) == pytest.approx(0.5)
    assert bench.one_recall_at(found, truth) == pytest.approx(0.5)
    assert bench.one_recall_at(found[:1], truth[:1]) == 1.0 and bench.recall_at(found[:1], truth[:1]) == 0.1


def test_asking_for_as_many_results_as_the_shortlist_still_reranks_them_exactly():
    """k >= the shortlist (ris-search -k 100, ris-eval --index's ranked lists of 100) used to skip
    the re-ranking: PQ's approximate order and distances came back although re-ranking was on."""
    x = clustered_vectors(10000, 16, seed=1)
    q = clustered_vectors(20, 16, seed=2)
    index = build_ivfpq(x, "euclidean", params=choose_params(len(x), 16, rerank=30), progress=False)
    index.stored = StoredRows(x)
    for k in (30, 50):
        d, i = index.search(q, k)
        exact = np.linalg.norm(x[i] - q[:, None, :], axis=2)
        np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-5)  # exact distances of what came back
        assert np.all(np.diff(d, axis=1) >= 0)  # in exact order


def test_the_shortlist_grows_with_the_results_asked_for(monkeypatch):
    """A shortlist of only k re-ranks PQ's own choice of candidates: long lists (ris-search -k 100)
    stayed far from exact search on real features. At least 4 x k candidates are re-ranked."""
    x = clustered_vectors(10000, 16, seed=1)
    index = build_ivfpq(x, "euclidean", params=choose_params(len(x), 16, rerank=30), progress=False)
    index.stored = StoredRows(x)
    asked = []
    search = index._search
    monkeypatch.setattr(index, "_search", lambda q, k: asked.append(k) or search(q, k))
    for k in (5, 7, 20, 100):
        d, i = index.search(x[:3], k)
        assert d.shape == (3, k)
    assert asked == [30, 30, 80, 400]
    index.stored = None  # no stored rows: no re-ranking, k candidates
    index.search(x[:3], 20)
    assert asked[-1] == 20


def test_ris_index_build_tunes_the_index_it_built_and_refuses_other_kinds(tmp_path, capsys):
    """--nprobe/--rerank were ignored for a head's embeddings (the index beside the embedding cache
    kept its settings) and for kinds that have neither (hnsw): now applied, or one line."""
    pytest.importorskip("keras")
    from ris.cli.index import main
    from ris.train import TrainConfig, train_head

    x = clustered_vectors(3000, 16, seed=4)
    db = make_feature_db(tmp_path / "f.h5", x, labels=[f"o{i // 4}" for i in range(len(x))])
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--rerank", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["rerank"] == 7
    with pytest.raises(RisError, match="--nprobe 8 .*ivfpq"):
        main(["build", "--features-db", str(db), "--index", "hnsw", "--nprobe", "8"])
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "images", n_objects=6, views=4, size=64)
    db = tmp_path / "cnn.h5"  # a head's index needs a database made by a CNN (its query recipe)
    extract_features(data, db, ExtractConfig(model="vgg16", weights="none", input_size=64),
                     ExtractOptions(labels="ukbench", progress=False, log=lambda s: None))
    head = tmp_path / "h.keras"
    train_head(db, head, TrainConfig(whiten_dim=8, test_fraction=0.0), progress=False, log=lambda s: None)
    assert main(["build", "--features-db", str(db), "--model", str(head), "--index", "ivfpq",
                 "--rerank", "9", "--nprobe", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["rerank"] == 9 and out["params"]["nprobe"] == 3 and out["path"]
    assert out["path"] != ivfpq_path(str(db))  # the index beside the head's embedding cache
    saved = IvfPqIndex.load(out["path"])
    assert (saved.params.rerank, saved.params.nprobe) == (9, 3)


@pytest.mark.parametrize("reranked,shape", [(False, "default"), (True, "default"), (False, "opq-hnsw")])
def test_asking_for_nearly_the_whole_collection_returns_that_many_results(reranked, shape):
    """The cells ``nprobe`` visits may hold fewer vectors than asked for: 2,000 rows, k=1,500 gave
    about 1,400 results (-1 labels dropped) where every other index kind gives 1,500. Queries
    left short are searched again over every cell (through OPQ and an HNSW coarse quantizer too)."""
    from ris.faiss_index import IvfPqParams

    x = clustered_vectors(2000, 16, seed=3)
    params = (IvfPqParams(nlist=1024, m=8, nbits=4, opq=True, nprobe=8, train_rows=2000)
              if shape == "opq-hnsw" else choose_params(len(x), 16, nprobe=8))  # (by default all 51 cells)
    index = build_ivfpq(x, "euclidean", params=params, progress=False)
    assert index.params.nprobe < index.params.nlist
    if reranked:
        index.stored = StoredRows(x)
    d, i = index.search(x[:5], 1500)
    assert i.shape == (5, 1500) and (i >= 0).all() and np.isfinite(d).all()
    assert all(len(set(row)) == 1500 for row in i.tolist())
    _, few = index.search(x[:5], 10)  # a usual k keeps its usual (cheaper) search
    assert (few >= 0).all()


def _saved_before_the_flag(path: str, nprobe: int) -> None:
    """Make a saved index's metadata look like one written before nprobe's origin was recorded."""
    meta = json.loads(Path(path).read_text())
    meta.pop("nprobe_chosen", None)
    meta["params"].pop("nprobe_chosen", None)
    meta["params"]["nprobe"] = nprobe
    Path(path).write_text(json.dumps(meta))


def test_an_index_saved_with_the_old_default_probes_gets_todays_and_a_chosen_nprobe_stays(tmp_path):
    """Indexes saved before the default nprobe followed the size (2026-12-03) kept their 32 probes
    when reloaded, so a small collection's saved index kept the recall the change had fixed
    (0.89 instead of 0.98 at 20,000 rows). A saved nprobe that was the automatic one now becomes
    today's default for the index's size; one asked for (ris-index build --nprobe) is kept, and
    the metadata says which it is."""
    import faiss

    from ris.ivfpq_params import default_nprobe

    x = clustered_vectors(2000, 16, seed=1)
    path = str(tmp_path / "v.ivfpq")
    index = build_ivfpq(x, "euclidean", progress=False)
    today = default_nprobe(len(x), index.params.nlist)
    assert today > 32 and index.params.nprobe == today  # (51 cells: every one)
    index.save(path)
    _saved_before_the_flag(path, 32)  # the old automatic default: min(nlist, 32)
    loaded = IvfPqIndex.load(path)
    assert loaded.params.nprobe == today and faiss.extract_index_ivf(loaded.index).nprobe == today
    _saved_before_the_flag(path, 7)  # not what the old code chose: the user's
    assert IvfPqIndex.load(path).params.nprobe == 7
    index.save(path)
    assert json.loads(Path(path).read_text())["nprobe_chosen"] is False

    chosen = build_ivfpq(x, "euclidean", params=choose_params(len(x), 16, nprobe=32), progress=False)
    chosen.save(path)
    assert json.loads(Path(path).read_text())["nprobe_chosen"] is True
    loaded = IvfPqIndex.load(path)
    assert loaded.params.nprobe == 32 and faiss.extract_index_ivf(loaded.index).nprobe == 32


def test_ris_index_build_nprobe_is_recorded_as_chosen(tmp_path, capsys):
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "feats.h5", clustered_vectors(2000, 16, seed=3))
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--nprobe", "32"]) == 0
    path = ivfpq_path(str(db))
    assert json.loads(Path(path).read_text())["nprobe_chosen"] is True
    assert IvfPqIndex.load(path).params.nprobe == 32
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--rerank", "5"]) == 0  # nprobe untouched
    assert IvfPqIndex.load(path).params.nprobe == 32


def test_a_rebuild_keeps_the_search_settings_asked_for(tmp_path, capsys):
    """`ris-index build --index ivfpq --nprobe 7 --rerank 0`, later `--rebuild` (as the README
    advises once a collection has drifted) or a rebuild of a damaged data file: the new index came
    back with the automatic nprobe and re-ranking on, silently, though the settings are "saved
    with the index". A rebuild keeps the ones asked for; an automatic nprobe stays automatic."""
    from ris.cli.index import main

    db = make_feature_db(tmp_path / "feats.h5", clustered_vectors(2000, 16, seed=3))
    path = ivfpq_path(str(db))
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--nprobe", "7", "--rerank", "0"]) == 0
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--rebuild"]) == 0
    saved = IvfPqIndex.load(path)
    assert (saved.params.nprobe, saved.params.nprobe_chosen, saved.params.rerank) == (7, True, 0)
    data = Path(saved.data_file)
    data.write_bytes(data.read_bytes()[:-8] + b"damaged!")  # damaged in place: rebuilt by a search
    with FeatureDB(db) as f:
        index = open_search_index(str(db), f.features, "euclidean", kind="ivfpq", source=source_of(f))
    assert (index.params.nprobe, index.params.rerank) == (7, 0)
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--rerank", "50"]) == 0
    (tmp_path / "feats.h5.ivfpq").write_text(
        (tmp_path / "feats.h5.ivfpq").read_text().replace('"nprobe_chosen": true', '"nprobe_chosen": false'))
    assert main(["build", "--features-db", str(db), "--index", "ivfpq", "--rebuild"]) == 0
    saved = IvfPqIndex.load(path)  # automatic: today's default for the size, not the old number
    assert (saved.params.nprobe_chosen, saved.params.rerank) == (False, 50)
    assert saved.params.nprobe == choose_params(2000, 16).nprobe


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reranked_distances_are_the_ones_exact_search_shows(metric):
    """ris-search --index ivfpq showed distances that differed from --index exact's (and
    --index hnsw's, and milvus's) in the 7th digit, and ordered near-ties another way: its re-ranking
    computed them in float32 while every other kind's are recomputed in float64. They are now the
    same numbers, bit for bit, in the same order (README: "each answers ... in the same distance units")."""
    from ris.topk import exact_shown

    x = clustered_vectors(3000, 16, seed=1) * np.float32(7.3)  # not unit length: cosine normalises
    q = clustered_vectors(5, 16, seed=2) * np.float32(3.1)
    index = build_ivfpq(x, metric, params=choose_params(len(x), 16, rerank=200, nprobe=64), progress=False)
    index.stored = StoredRows(x)
    for query in q:
        d, i = index.search(query[None], 20)
        shown_d, shown_i = exact_shown(query[None], d, i, lambda rows: x[rows], metric)
        assert i.tolist() == shown_i.tolist() and d.tobytes() == shown_d.tobytes()
