"""A Milvus collection rebuilt under another name and switched to once complete: ``kill -9`` at any
point of ``ris-index build --rebuild`` leaves the old or the new collection serving under its name,
and the next run removes what the killed one left, in one line. Runs against Milvus Lite (and a
server where tests/test_milvus_index.py's fixture finds one)."""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("pymilvus") is None or importlib.util.find_spec("milvus_lite") is None:
    pytest.skip("pymilvus / milvus-lite not installed (pip install 'ris[milvus]')", allow_module_level=True)

from ris.featuredb import FeatureDB  # noqa: E402
from ris.index import open_search_index  # noqa: E402
from ris.index_state import source_of  # noqa: E402
from ris.testing import clustered_vectors, make_feature_db  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["lite", "server"])
def target(request, tmp_path):
    if request.param == "lite":
        return str(tmp_path / "m.db")
    return "//" + request.getfixturevalue("milvus_server")


KILLED_REBUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import pymilvus
    import ris.milvus_index
    from ris.cli.common import run
    from ris.cli.index import main

    def stall(real):
        def stalled(*a, **k):
            {before}
            out = real(*a, **k)
            print("written", flush=True)
            time.sleep(600)
            return out
        return stalled

    {patch}
    run("ris-index", main, ["build", "--features-db", {db!r}, "--index", {index!r}, "--rebuild"])
    print("finished", flush=True)
""")

STALLS = {  # where it is killed: new rows written (no state yet), new complete, old dropped, switched
    "building": ("pass", "ris.milvus_index.MilvusIndex.add_ids = stall(ris.milvus_index.MilvusIndex.add_ids)"),
    "built": ("print('written', flush=True); time.sleep(600)",
              "pymilvus.MilvusClient.drop_collection = stall(pymilvus.MilvusClient.drop_collection)"),
    "switching": ("print('written', flush=True); time.sleep(600)",
                  "pymilvus.MilvusClient.rename_collection = stall(pymilvus.MilvusClient.rename_collection)"),
    "switched": ("pass", "pymilvus.MilvusClient.rename_collection = stall(pymilvus.MilvusClient.rename_collection)"),
}


def _kill_9_once_written(script: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("written"):
            proc.kill()
            pytest.fail(f"the rebuild never reached its stall: {line!r} {proc.stderr.read()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stall", list(STALLS))
def test_a_killed_rebuild_leaves_a_collection_serving_and_its_leftovers_go_next_run(target, tmp_path, stall,
                                                                                    monkeypatch, capsys):
    """``ris-index build --index milvus:... --rebuild`` emptied the collection's state first and
    rebuilt it in place: killed mid-way, no usable collection was left (the next open rebuilt it
    from scratch; a saved-only open had none). It now builds under another name and switches to it
    once complete."""
    import ris.milvus_index
    from ris.cli.index import main
    from ris.milvus_index import collection_name, connect, disconnect

    x = clustered_vectors(1500, 16, seed=11)
    db = make_feature_db(tmp_path / "feats.h5", x)
    assert main(["build", "--features-db", str(db), "--index", f"milvus:{target}"]) == 0
    capsys.readouterr()
    before, patch = STALLS[stall]
    _kill_9_once_written(KILLED_REBUILD.format(root=str(ROOT), db=str(db), index=f"milvus:{target}",
                                               before=before, patch=patch))
    monkeypatch.setattr(ris.milvus_index.MilvusIndex, "create", classmethod(lambda *a, **k: pytest.fail("rebuilt")))
    with FeatureDB(db) as f:
        source = source_of(f)
        index = open_search_index(str(db), f.features, "euclidean", kind=f"milvus:{target}", source=source)
    try:  # the old collection, or the complete new one, serves: nothing is built again
        assert type(index).__name__ == "MilvusIndex" and len(index) == 1500
        assert np.all(index.search(x[:5], 1)[1][:, 0] == np.arange(5))
    finally:
        index.close()
    err = capsys.readouterr().err
    assert "building" not in err
    if stall != "switched":  # what the killed rebuild left is removed, or switched to, in one line
        assert len([line for line in err.splitlines() if "killed" in line]) == 1, err
    name = collection_name(source, str(db))
    client = connect(target)
    try:  # (a server holds other tests' collections too)
        left = [n for n in client.list_collections() if n.startswith(name)]
    finally:
        disconnect(client, target)
    assert left == [name]


def test_a_rebuild_replaces_the_collection_and_leaves_nothing_beside_it(target, tmp_path, capsys):
    from ris.cli.index import main
    from ris.milvus_index import collection_name, connect, disconnect

    x = clustered_vectors(300, 16, seed=12)
    db = make_feature_db(tmp_path / "feats.h5", x)
    for _ in range(2):
        assert main(["build", "--features-db", str(db), "--index", f"milvus:{target}", "--rebuild"]) == 0
    assert capsys.readouterr().err.count("building Milvus index") == 2
    with FeatureDB(db) as f:
        name = collection_name(source_of(f), str(db))
    client = connect(target)
    try:
        assert [n for n in client.list_collections() if n.startswith(name)] == [name]
    finally:
        disconnect(client, target)
