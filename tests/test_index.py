"""Exact and HNSW indexes: same answers as brute force, persistence, incremental update."""
import json
import os
import re
import sys

import h5py
import numpy as np
import pytest

from ris.errors import DatabaseError, RisError
from ris.index import (ExactIndex, HnswIndex, build_hnsw_from_db, index_path_for, open_search_index,
                       hnsw_available, update_hnsw)
from ris.topk import pairwise_distances

METRICS = ["euclidean", "cosine"]
# the README's test command without the `ann` extra skips these, as it skips faiss's and Milvus's
needs_hnswlib = pytest.mark.skipif(not hnsw_available(), reason="hnswlib not installed (pip install 'ris[ann]')")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian mixture: nearer to real features than uniform noise, and HNSW-friendly like them."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, dim)).astype(np.float32)
    return centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)


def brute(q, db, k, metric):
    full = pairwise_distances(q, db, metric)
    idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, idx, 1), idx


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture
def h5db(tmp_path):
    db = clustered(2000, 24, 0)
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=db, chunks=(128, 24), maxshape=(None, 24))
    return str(path), db


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "in_memory"])
def test_exact_index_equals_brute_force_from_hdf5(h5db, metric, cache_bytes):
    path, db = h5db
    q = clustered(9, 24, 1)
    with h5py.File(path, "r") as f:
        index = ExactIndex(f["features"], metric, block_rows=300, cache_bytes=cache_bytes)  # 7 blocks
        assert index.in_memory == bool(cache_bytes) and len(index) == 2000
        for nq in (1, 2, 9):  # 1-2 queries take the einsum path, more take GEMM
            dist, idx = index.search(q[:nq], 10)
            ref_d, ref_i = brute(q[:nq], db, 10, metric)
            np.testing.assert_array_equal(idx, ref_i)
            np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)


def test_exact_index_on_array_clips_k():
    db = clustered(5, 8, 0)
    dist, idx = ExactIndex(db).search(db[2], 10)
    assert idx.shape == (1, 5) and idx[0, 0] == 2 and np.all(np.diff(dist[0]) >= 0)


@needs_hnswlib
@pytest.mark.parametrize("metric", METRICS)
def test_hnsw_recall_and_units_match_exact(metric):
    db, q = clustered(5000, 64, 2), clustered(50, 64, 3)
    hnsw = HnswIndex(64, metric)  # the defaults must reach the target
    hnsw.add(db, 0)
    assert len(hnsw) == 5000
    d, i = hnsw.search(q, 10)
    ref_d, ref_i = ExactIndex(db, metric).search(q, 10)
    assert recall(i, ref_i) >= 0.95
    hit = i == ref_i  # same neighbour -> same distance: true L2 (not squared) or 1 - cos
    np.testing.assert_allclose(d[hit], ref_d[hit], rtol=1e-3, atol=1e-3)
    assert np.all(np.diff(d, axis=1) >= 0)


@needs_hnswlib
def test_save_load_round_trip_is_atomic(tmp_path):
    db, q = clustered(1000, 16, 4), clustered(20, 16, 5)
    hnsw = build_hnsw_from_db(db, "cosine", chunk_rows=300, progress=False, M=8, ef_search=32)
    path = str(tmp_path / "f.h5.hnsw")
    hnsw.save(path)
    graph, meta = sorted(os.listdir(tmp_path))  # no .partial left; the metadata names its graph
    assert meta == "f.h5.hnsw.json" and re.fullmatch(r"f\.h5\.hnsw\.[0-9a-f]{8}\.graph", graph)
    loaded = HnswIndex.load(path)
    assert (len(loaded), loaded.dim, loaded.metric, loaded.params) == (1000, 16, "cosine", hnsw.params)
    for a, b in zip(hnsw.search(q, 5), loaded.search(q, 5)):
        np.testing.assert_array_equal(a, b)


@needs_hnswlib
def test_update_adds_new_rows_and_finds_them():
    db = clustered(1200, 16, 6)
    hnsw = build_hnsw_from_db(db[:1000], "euclidean", chunk_rows=400, progress=False, M=8)
    assert update_hnsw(hnsw, db) == 200 and len(hnsw) == 1200
    assert update_hnsw(hnsw, db) == 0
    dist, idx = hnsw.search(db[1000:], 1)
    assert np.mean(idx[:, 0] == np.arange(1000, 1200)) >= 0.99 and np.all(dist[:, 0] < 1e-3)
    with pytest.raises(ValueError, match="in order"):
        hnsw.add(db[:5], 0)


@needs_hnswlib
def test_open_search_index_picks_and_refreshes(h5db):
    path, db = h5db
    with h5py.File(path, "r") as f:
        assert isinstance(open_search_index(path, f["features"], "euclidean"), ExactIndex)  # below threshold
        assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10), ExactIndex)  # no index
        built = open_search_index(path, f["features"], "euclidean", kind="hnsw")
        assert isinstance(built, HnswIndex) and os.path.isfile(index_path_for(path) + ".json")
    extra = clustered(100, 24, 7)
    with h5py.File(path, "a") as f:  # the database grows: the saved index is updated, not rebuilt
        f["features"].resize(2100, axis=0)
        f["features"][2000:] = extra
    with h5py.File(path, "r") as f:
        index = open_search_index(path, f["features"], "euclidean", threshold=10)
        assert isinstance(index, HnswIndex) and len(index) == 2100
        assert HnswIndex.load(index_path_for(path)).__len__() == 2100
        assert index.search(extra[:1], 1)[1][0, 0] == 2000
        with pytest.warns(UserWarning, match="metric"):  # index built for another metric
            assert isinstance(open_search_index(path, f["features"], "cosine", threshold=10), ExactIndex)
    with h5py.File(path, "w") as f:  # a rebuilt database of the same size is detected
        f["features"] = clustered(2100, 24, 8)
    with h5py.File(path, "r") as f, pytest.warns(UserWarning, match="changed"):
        assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10), ExactIndex)


def test_missing_hnswlib_is_a_clear_error(monkeypatch, h5db):
    monkeypatch.setitem(sys.modules, "hnswlib", None)  # makes `import hnswlib` raise ImportError
    with pytest.raises(RisError, match=r"pip install 'ris\[ann\]'"):
        HnswIndex(8)
    path, _ = h5db
    with h5py.File(path, "r") as f:  # auto quietly falls back to exact search
        assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10), ExactIndex)


def test_streamed_exact_index_keeps_its_row_count(h5db):
    path, db = h5db
    with h5py.File(path, "a") as f:
        index = ExactIndex(f["features"], cache_bytes=0)
        f["features"].resize(2100, axis=0)
        f["features"][2000:] = db[:100]  # duplicates would tie with rows 0..99
        _, idx = index.search(db[:5], 3)
        assert len(index) == 2000 and idx.max() < 2000


def test_dba_from_the_hnsw_index_matches_the_exact_pass():
    if not hnsw_available():
        pytest.skip("hnswlib not installed (pip install 'ris[ann]')")
    from ris.rerank import dba_database

    db = clustered(3000, 32, 11)
    db /= np.linalg.norm(db, axis=1, keepdims=True)  # as features are: then euclidean ranks like cosine
    index = HnswIndex(32, "euclidean")
    index.add(db, 0)
    exact = dba_database(db, 2, 3.0)
    approx = dba_database(db, 2, 3.0, index=index, chunk=700)  # several chunks
    same_rows = np.isclose(exact, approx, atol=1e-5).all(axis=1).mean()
    assert same_rows > 0.98, same_rows
    assert np.allclose(np.linalg.norm(approx, axis=1), 1.0, atol=1e-5)


@needs_hnswlib
def test_saved_index_is_keyed_on_the_database_content(h5db, monkeypatch):
    import ris.index

    path, db = h5db
    first = {"content_id": "a", "history": [], "vectors": "raw"}
    with h5py.File(path, "r") as f:
        open_search_index(path, f["features"], "euclidean", kind="hnsw", source=first)
        assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10, source=first), HnswIndex)
        # re-extracted: same rows, same size, even the same first rows, but another content
        again = dict(first, content_id="b")
        with pytest.warns(UserWarning, match="content"):
            assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10, source=again), ExactIndex)
        with pytest.warns(UserWarning, match="content"):  # other vectors made from the same database
            assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10,
                                                source=dict(first, vectors="emb-123")), ExactIndex)
        assert open_search_index(path, f["features"], "euclidean", kind="hnsw", source=again).source == again
    with h5py.File(path, "a") as f:
        f["features"].resize(2100, axis=0)
        f["features"][2000:] = clustered(100, 24, 7)

    def no_rebuild(*a, **k):
        raise AssertionError("an appended database extends its index")

    monkeypatch.setattr(ris.index, "build_hnsw_from_db", no_rebuild)
    appended = {"content_id": "c", "history": ["a", "b"], "vectors": "raw"}
    with h5py.File(path, "r") as f:
        index = open_search_index(path, f["features"], "euclidean", threshold=10, source=appended)
        assert isinstance(index, HnswIndex) and len(index) == 2100
    assert HnswIndex.load(index_path_for(path)).source == appended


@needs_hnswlib
def test_a_damaged_saved_index_is_named_and_rebuilt(h5db):
    path, db = h5db
    with h5py.File(path, "r") as f:
        open_search_index(path, f["features"], "euclidean", kind="hnsw")
        with open(index_path_for(path) + ".json", "w") as fh:
            fh.write('{"format": 1}')  # valid JSON, keys missing
        with pytest.raises(DatabaseError, match=r"\.hnsw\.json"):
            HnswIndex.load(index_path_for(path))
        with pytest.warns(UserWarning, match="ignoring HNSW index"):
            assert isinstance(open_search_index(path, f["features"], "euclidean", threshold=10), ExactIndex)
        assert len(open_search_index(path, f["features"], "euclidean", kind="hnsw")) == len(db)


def test_index_flag_choices_come_from_the_registry():
    from ris.cli.eval import build_parser as eval_parser
    from ris.cli.search import build_parser as search_parser
    from ris.index import INDEX_KINDS, index_metavar, parse_index

    assert set(INDEX_KINDS) == {"auto", "exact", "hnsw", "ivfpq", "milvus"}
    assert parse_index("ivfpq") == ("ivfpq", None) and parse_index("milvus:x.db") == ("milvus", "x.db")
    for bad in ("annoy", "hnsw:x", "milvus"):
        with pytest.raises(RisError, match="unknown index"):
            parse_index(bad)
    for parser in (search_parser(), eval_parser()):
        action = next(a for a in parser._actions if "--index" in a.option_strings)
        assert action.metavar == index_metavar() and "milvus://HOST:PORT" in action.help
    with pytest.raises(SystemExit):
        search_parser().parse_args(["--image", "q.jpg", "--index", "annoy"])
    with pytest.raises(ValueError, match="unknown index kind"):
        open_search_index("x.h5", np.zeros((3, 2), np.float32), "euclidean", kind="flat")


def test_index_module_imports_without_keras_or_index_libraries():
    import subprocess

    code = ("import sys; import ris.index; bad = {'keras', 'tensorflow', 'faiss', 'hnswlib', 'pymilvus'} "
            "& set(sys.modules); print(sorted(bad)); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_each_index_kind_scores_ukbench_like_exact(tmp_path):
    """Real features (UKBench, first 200 images, MobileNetV2): each kind's N-S and mAP within 0.01
    of exact search, through the same ranked-list scoring as ris-eval --index."""
    import importlib.util
    import shutil

    from conftest import shared_dataset
    from ris.errors import WeightsUnavailable
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.index_eval import evaluate_index

    src = shared_dataset("ukbench1000")
    data = tmp_path / "ukbench200"
    data.mkdir()
    for i in range(200):  # a temporary copy of a subset (never into the repository)
        shutil.copy(src / f"ukbench{i:05d}.jpg", data)
    db = tmp_path / "uk.h5"
    try:
        extract_features(data, db, ExtractConfig(model="mobilenet_v2"), ExtractOptions(labels="ukbench", progress=False))
    except WeightsUnavailable as exc:
        pytest.skip(str(exc))
    kinds = ["exact"] + [k for k, mod in (("hnsw", "hnswlib"), ("ivfpq", "faiss")) if importlib.util.find_spec(mod)]
    if importlib.util.find_spec("pymilvus") and importlib.util.find_spec("milvus_lite"):
        kinds.append(f"milvus:{tmp_path / 'uk.milvus.db'}")
    for kind in kinds:
        r = evaluate_index(db, kind)
        assert r["images"] == 200 and r["exact"]["ns_score"] > 3.5, r
        assert abs(r["delta"]["ns_score"]) <= 0.01 and abs(r["delta"]["map"]) <= 0.01, (kind, r["delta"])


def test_ris_eval_index_scores_the_index_beside_exact(tmp_path, capsys):
    import json

    from ris.cli.eval import main
    from ris.testing import make_feature_db

    rng = np.random.default_rng(3)
    x = np.repeat(rng.normal(size=(100, 16)), 4, axis=0) + 0.05 * rng.normal(size=(400, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = [f"o{i // 4}" for i in range(400)]  # 100 objects of 4 views each
    db = make_feature_db(tmp_path / "f.h5", x, labels=labels)
    kind = "hnsw" if hnsw_available() else "exact"
    assert main(["--features-db", str(db), "--index", kind, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 400 and r["exact"]["ns_score"] == pytest.approx(4.0, abs=0.05)
    assert abs(r["delta"]["ns_score"]) <= 0.01 and r["indexed"]["recall_at"]["1"] > 0.9
    assert main(["--features-db", str(db), "--index", kind, "--min-ns", "4.5"]) == 1


@pytest.mark.parametrize("kind, suffix", [("hnsw", ".hnsw"), ("ivfpq", ".ivfpq")])
def test_an_index_that_cannot_be_saved_whole_is_never_left_under_its_name(kind, suffix, tmp_path):
    """hnswlib wrote a short file without a word and it was renamed into place (a torn index under
    its final name); faiss's write failure surfaced as 'internal error (a bug in ris)'."""
    pytest.importorskip("hnswlib" if kind == "hnsw" else "faiss")
    import subprocess

    from ris.testing import make_feature_db
    from ris.testing_faults import run_size_limited, size_limit

    rng = np.random.default_rng(0)
    db = make_feature_db(tmp_path / "f.h5", rng.standard_normal((2000, 64)).astype(np.float32))
    build = run_size_limited("index", ["build", "--features-db", db, "--index", kind], limit=128 << 10)
    lines = [line for line in build.stderr.splitlines() if line.startswith("ris-index")]
    assert build.returncode == 2, build.stderr[-2000:]
    assert len(lines) == 1 and "could not save" in lines[0] and "internal error" not in lines[0], build.stderr[-2000:]
    assert "Traceback" not in build.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["f.h5"], left  # no index, no temp, no data file
    # a search saves the index it built as a courtesy: there, not saving is a warning and the answer stands
    search = ("import sys\n"
              "from ris.featuredb import FeatureDB\n"
              "from ris.index import open_search_index\n"
              "from ris.index_state import source_of\n"
              "with FeatureDB(sys.argv[1]) as db:\n"
              "    index = open_search_index(sys.argv[1], db.features, 'euclidean', kind=sys.argv[2], source=source_of(db))\n"
              "    print(type(index).__name__, index.search(db.features[7:8], 3)[1][0][0])\n")
    done = subprocess.run([sys.executable, "-c", size_limit(128 << 10) + search, str(db), kind],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "could not save" in done.stderr and done.stdout.split() == [{"hnsw": "HnswIndex"}.get(kind, "IvfPqIndex"), "7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_a_change_that_adds_and_removes_no_rows_keeps_the_saved_index_usable(tmp_path, kind):
    """A --sync that only recorded an image that would not decode changed the content id without
    new ids or removals: the memory-mapped IVF-PQ index was then re-saved as it was opened, and
    every command that opened it failed ("internal error: a memory-mapped IVF-PQ index cannot be
    re-saved") until it was deleted by hand."""
    pytest.importorskip({"ivfpq": "faiss", "hnsw": "hnswlib"}[kind])
    from ris.featuredb import FeatureDB
    from ris.featurewriter import FeatureWriter
    from ris.index_state import source_of
    from ris.testing import clustered_vectors, make_feature_db

    x = clustered_vectors(300, 16, seed=5)
    db = make_feature_db(tmp_path / "f.h5", x)
    with FeatureDB(db) as f:
        open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
    with FeatureDB(db) as f:
        attrs = dict(f.attrs)
    w = FeatureWriter(db, attrs, (16,), [], append=True)  # what --sync does for a file that will not decode
    w.add_failures([("broken.jpg", "broken.jpg: not a readable image")])
    w.finish({})
    for _ in range(2):  # caught up (and saved) once, then used as saved
        with FeatureDB(db) as f:
            index = open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
            assert len(index) == 300
            _, found = index.search(x[:5], 1)
            assert found[:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind,edit", [("hnsw", "[1, 2]"), ("ivfpq", "source"), ("ivfpq", "metric")])
def test_sidecars_of_the_wrong_shape_are_damaged_indexes_not_internal_errors(tmp_path, kind, edit):
    """Valid JSON of the wrong shape in an index's metadata (a hand edit, another tool's file) gave
    "internal error: AttributeError ..." on every search; it is a damaged index: rebuilt."""
    import json

    pytest.importorskip({"ivfpq": "faiss", "hnsw": "hnswlib"}[kind])
    from ris.featuredb import FeatureDB
    from ris.index_state import source_of
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(300, 16, seed=5))
    with FeatureDB(db) as f:
        open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
    meta = tmp_path / ("f.h5.hnsw.json" if kind == "hnsw" else "f.h5.ivfpq")
    if edit.startswith("["):
        meta.write_text(edit)
    else:
        m = json.loads(meta.read_text())
        m[edit] = "x" if edit == "source" else "manhattan"
        meta.write_text(json.dumps(m))
    with FeatureDB(db) as f:
        index = open_search_index(str(db), f.features, "euclidean", kind=kind, source=source_of(f))
        assert len(index) == 300


def test_ivfpq_search_settings_that_cannot_search_are_refused(tmp_path, capsys):
    """``ris-index build --index ivfpq --nprobe 0`` was saved, then every search failed inside faiss
    ("internal error: ... cur_nprobe > 0 failed"); ``--rerank -3`` turned re-ranking off silently."""
    import json

    pytest.importorskip("faiss")
    from ris.cli.common import run
    from ris.cli.index import main as index_main
    from ris.featuredb import FeatureDB
    from ris.index_state import source_of
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(300, 16, seed=5))
    for flag, value in (("--nprobe", "0"), ("--nprobe", "-1"), ("--rerank", "-3")):
        with pytest.raises(SystemExit) as exc:  # argparse's refusal: usage line, status 2
            run("ris-index", index_main, ["build", "--features-db", str(db), "--index", "ivfpq", flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "f.h5.ivfpq").exists()
    with FeatureDB(db) as f:
        open_search_index(str(db), f.features, "euclidean", kind="ivfpq", source=source_of(f))
    meta = json.loads((tmp_path / "f.h5.ivfpq").read_text())
    meta["params"]["nprobe"] = 0  # by hand: a damaged index, rebuilt
    (tmp_path / "f.h5.ivfpq").write_text(json.dumps(meta))
    with FeatureDB(db) as f:
        index = open_search_index(str(db), f.features, "euclidean", kind="ivfpq", source=source_of(f))
        assert index.params.nprobe >= 1 and len(index.search(f.features[:3], 2)[1]) == 3


def test_a_damaged_hnsw_file_of_the_right_size_is_rebuilt_not_followed_into_a_crash(tmp_path):
    """20 kB of random bytes inside the .hnsw (same size): hnswlib followed the random links and
    every search died with a segmentation fault. The .json now carries the file's checksum. Run in
    a child process: before the fix it crashed the interpreter."""
    import subprocess

    pytest.importorskip("hnswlib")
    from ris.featuredb import FeatureDB
    from ris.index_state import source_of
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(2000, 32, seed=5))
    with FeatureDB(db) as f:
        open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
    hnsw = tmp_path / json.loads((tmp_path / "f.h5.hnsw.json").read_text())["graph"]
    size = hnsw.stat().st_size
    with open(hnsw, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(np.random.default_rng(0).bytes(20000))
    code = ("import sys, warnings; from ris.featuredb import FeatureDB; from ris.index import open_search_index; "
            "from ris.index_state import source_of\n"
            f"f = FeatureDB({str(db)!r}); ix = open_search_index({str(db)!r}, f.features, 'euclidean', kind='hnsw', "
            "source=source_of(f))\n"
            "d, i = ix.search(f.features[:20], 1); assert (i[:, 0] == list(range(20))).all(), i[:, 0]; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-1500:])
    assert "damaged" in r.stderr or "checksum" in r.stderr  # said why it rebuilt


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_index_messages_name_a_file_that_exists(tmp_path, kind, capsys):
    """'building HNSW index f.h5.hnsw' named no file: the index lies in f.h5.hnsw.json (the
    metadata) and the graph it names. Each message names the metadata, which the user can look at."""
    pytest.importorskip({"ivfpq": "faiss", "hnsw": "hnswlib"}[kind])
    from ris.featuredb import FeatureDB
    from ris.index_state import source_of
    from ris.testing import make_feature_db

    rng = np.random.default_rng(0)
    db = make_feature_db(tmp_path / "f.h5", rng.standard_normal((1200, 16)).astype(np.float32))
    with FeatureDB(db) as fdb:
        open_search_index(str(db), fdb.features, "euclidean", kind=kind, source=source_of(fdb))
    built = re.findall(r"building \S+ index (\S+) \(", capsys.readouterr().err)
    assert len(built) == 1 and os.path.isfile(built[0]), (built, sorted(p.name for p in tmp_path.iterdir()))
    with open(built[0], "w") as fh:
        fh.write('{"format": 1}')  # damaged: a search ignores it, naming it
    with FeatureDB(db) as fdb, pytest.warns(UserWarning, match="ignoring") as seen:
        assert isinstance(open_search_index(str(db), fdb.features, "euclidean", threshold=10, source=source_of(fdb)),
                          ExactIndex)
    ignored = re.findall(r"ignoring \S+ index (\S+): ", str(seen[0].message))
    assert ignored == built, str(seen[0].message)
