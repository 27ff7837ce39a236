"""A saved HNSW index is one consistent pair (graph + metadata), whoever saves or reads it at once.

The graph (``.hnsw``) and its metadata (``.hnsw.json``) were renamed into place one after the other,
so two processes catching up the same index together (a ``--sync`` ending while a search caught up
after an append) could leave one's graph beside the other's metadata: its checksum then called it
damaged, ``--index hnsw`` rebuilt it (minutes at 1M vectors) and ``auto`` searched exactly.
"""
import fcntl
import json
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")

from ris.featuredb import FeatureDB  # noqa: E402
from ris.featurewriter import FeatureWriter  # noqa: E402
from ris.hnsw_index import HnswIndex, build_hnsw_from_db  # noqa: E402
from ris.index import open_search_index  # noqa: E402
from ris.index_state import source_of  # noqa: E402
from ris.sidecars import clear_sidecars, file_crc32, sidecar_files  # noqa: E402
from ris.testing import clustered_vectors, make_feature_db  # noqa: E402


def two_saves(n_first: int = 300, n_second: int = 340):
    """Two versions of one index, as two processes hold them: before and after an append."""
    x = clustered_vectors(n_second, 16, seed=3)
    first = build_hnsw_from_db(x[:n_first], "euclidean", progress=False, M=8, ef_search=32)
    second = build_hnsw_from_db(x, "euclidean", progress=False, M=8, ef_search=32)
    return x, first, second


def graphs(folder) -> list[str]:
    """The HNSW graph files in ``folder``: the old layout's ``.hnsw`` and the new ``.hnsw.<token>.graph``."""
    return sorted(p for p in os.listdir(folder) if p.endswith((".hnsw", ".graph")))


def assert_whole(path: str, x: np.ndarray, sizes: tuple[int, ...]) -> HnswIndex:
    """The saved index loads and is one of the saved versions, graph and metadata alike."""
    loaded = HnswIndex.load(path)
    assert len(loaded) in sizes and loaded.next_id == len(loaded)
    n = len(loaded)
    assert np.all(loaded.search(x[:n][-20:], 1)[1][:, 0] == np.arange(n - 20, n))
    return loaded


@pytest.mark.parametrize("newer_last", [True, False])
def test_two_saves_interleaved_leave_one_whole_index_not_a_mixed_pair(tmp_path, monkeypatch, newer_last):
    """A second process's whole save runs right after the first one's first rename (either may hold
    the newer index). Before the fix that left the second's graph with the first's metadata."""
    x, first, second = two_saves()
    if not newer_last:
        first, second = second, first
    path = str(tmp_path / "f.h5.hnsw")
    real_replace, state = os.replace, {"done": False}

    def interleaved(src, dst, *a, **kw):
        out = real_replace(src, dst, *a, **kw)
        if not state["done"]:
            state["done"] = True
            second.save(path)
        return out

    monkeypatch.setattr(os, "replace", interleaved)
    first.save(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert state["done"]
    assert len(assert_whole(path, x, (300, 340))) == len(first)  # the last to commit
    meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
    graph = tmp_path / meta["graph"]
    assert graphs(tmp_path) == [graph.name] and file_crc32(graph) == meta["crc32"]  # the other save's graph dropped


def test_a_reader_never_pairs_one_saves_metadata_with_anothers_graph(tmp_path, monkeypatch):
    """A save finishing between a reader's read of the metadata and its read of the graph: before
    the fix the reader got the new graph with the old metadata and called the index damaged."""
    x, first, second = two_saves()
    path = str(tmp_path / "f.h5.hnsw")
    first.save(path)
    real_load, state = json.load, {"done": False}

    def then_a_save(fh, *a, **kw):
        meta = real_load(fh, *a, **kw)
        if not state["done"]:
            state["done"] = True
            second.save(path)
        return meta

    monkeypatch.setattr(json, "load", then_a_save)
    loaded = assert_whole(path, x, (300, 340))
    monkeypatch.setattr(json, "load", real_load)
    assert state["done"] and len(loaded) == 340  # the graph it had read the metadata of was gone: read again
    assert len(graphs(tmp_path)) == 1


def save_old_layout(index: HnswIndex, path: str) -> None:
    """How an index was saved before graphs were named by token: ``path`` + ``path.json``."""
    index._index.save_index(path)
    meta = {"format": 2, "kind": "hnsw", "dim": index.dim, "metric": index.metric, "count": len(index),
            "db_rows": len(index), "next_id": index.next_id, "removed_seen": index.removed_seen,
            "deleted": index.deleted, "params": index.params, "fingerprint": index.fingerprint,
            "fingerprint_rows": index.fingerprint_rows, "source": index.source,
            "index_bytes": os.path.getsize(path), "crc32": file_crc32(path)}
    with open(path + ".json", "w") as fh:
        json.dump(meta, fh)


def test_an_index_saved_in_the_old_layout_loads_and_its_next_save_moves_it(tmp_path):
    """``feats.h5.hnsw`` + a ``.json`` naming no graph: searched as it is, not rebuilt; the first
    catch-up saves the new layout and deletes the old graph."""
    x = clustered_vectors(340, 16, seed=3)
    db = make_feature_db(tmp_path / "f.h5", x[:300])
    with FeatureDB(db) as f:
        old = open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
    for p in tmp_path.glob("f.h5.hnsw*"):
        p.unlink()
    save_old_layout(old, str(tmp_path / "f.h5.hnsw"))
    assert len(HnswIndex.load(str(tmp_path / "f.h5.hnsw"))) == 300  # read as it is
    with FeatureDB(db) as f, warnings.catch_warnings():
        warnings.simplefilter("error")  # neither ignored nor rebuilt
        index = open_search_index(str(db), f.features, "euclidean", kind="auto", threshold=10, source=source_of(f))
        assert isinstance(index, HnswIndex) and len(index) == 300
    assert graphs(tmp_path) == ["f.h5.hnsw"]  # nothing changed: not re-saved
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), [], append=True)
    w.add([f"new{i}.jpg" for i in range(40)], x[300:], [""] * 40)
    w.finish({})
    with FeatureDB(db) as f:  # caught up, saved in the new layout; the old graph is gone
        index = open_search_index(str(db), f.features, "euclidean", kind="hnsw", source=source_of(f))
        assert len(index) == 340
    meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
    assert graphs(tmp_path) == [meta["graph"]] and meta["graph"].startswith("f.h5.hnsw.")
    assert_whole(str(tmp_path / "f.h5.hnsw"), x, (340,))


def test_saves_leave_only_the_graph_named_and_those_being_written(tmp_path):
    """A killed save's graph (no metadata names it, no process holds it) is dropped by the next save;
    a graph another process is still writing (it holds its lock) is kept, however old."""
    x, first, second = two_saves()
    db = make_feature_db(tmp_path / "f.h5", x[:10])
    path = str(tmp_path / "f.h5.hnsw")
    for _ in range(3):
        first.save(path)
    assert len(graphs(tmp_path)) == 1
    orphan = tmp_path / "f.h5.hnsw.0badf00d.graph"  # a save killed between its graph and its metadata
    orphan.write_bytes(b"x" * 100)
    live = tmp_path / "f.h5.hnsw.0123abcd.graph"  # another process's, not committed yet
    live.write_bytes(b"y" * 100)
    old = live.stat().st_mtime - 3600
    os.utime(live, (old, old))
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert {orphan, live} <= set(sidecar_files(db))  # known as this database's index files
        assert clear_sidecars(db, keep_indexes=True) == [] and orphan.exists()
        second.save(path)
        meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
        assert graphs(tmp_path) == sorted([meta["graph"], live.name])
    finally:
        os.close(fd)
    first.save(path)
    meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
    assert graphs(tmp_path) == [meta["graph"]]
    assert_whole(path, x, (300,))
    assert sorted(p.name for p in sidecar_files(db)) == sorted(["f.h5.hnsw.json", meta["graph"]])


def test_ris_index_build_rebuild_leaves_one_graph(tmp_path):
    """``--rebuild`` builds anew and commits the new metadata over the old; the rebuilt index's save
    drops the graph the old metadata named."""
    from ris.cli.common import run
    from ris.cli.index import main as index_main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(200, 16, seed=1))
    for extra in ([], ["--rebuild"]):
        assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", "hnsw", *extra]) == 0
        meta = json.loads((tmp_path / "f.h5.hnsw.json").read_text())
        assert graphs(tmp_path) == [meta["graph"]]


def test_ris_index_build_names_the_files_it_saved(tmp_path, capsys):
    """``ris-index build --index hnsw`` printed ``(f.h5.hnsw)`` and ``--json`` gave "path":
    ".../f.h5.hnsw", a file that no longer exists since graphs are named by token; the path is now
    the metadata (the commit point, as ``--index ivfpq`` gives ``f.h5.ivfpq``)."""
    from ris.cli.common import run
    from ris.cli.index import main as index_main

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(200, 16, seed=1))
    assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", "hnsw", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert os.path.isfile(out["path"]) and out["path"] == str(tmp_path / "f.h5.hnsw.json")
    assert run("ris-index", index_main, ["build", "--features-db", str(db), "--index", "hnsw"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"({tmp_path / 'f.h5.hnsw.json'})")
