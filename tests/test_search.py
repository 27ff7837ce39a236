"""ris.search.SearchEngine: what it holds per row, and hits that carry their rows."""
from __future__ import annotations

import pytest

from ris.extract import ExtractConfig, ExtractOptions, extract_features
from ris.featuredb import FeatureDB, RowLabels
from ris.errors import BadChoice
from ris.search import SearchEngine
from ris.testing import make_tiny_dataset

FAST = ExtractConfig(model="vgg16", weights="none", input_size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = make_tiny_dataset(root / "images", n_objects=4, views=4, size=96)
    db = root / "feats.h5"
    extract_features(data, db, FAST, ExtractOptions(labels="ukbench", progress=False, log=lambda s: None))
    return data, db


def test_an_engine_reads_image_ids_on_demand_not_the_whole_column(tiny, monkeypatch):
    """At 10M rows the id column as Python strings is ~1 GB: the engine must not load it to open,
    to search, or to name its hits (it reads the rows it shows)."""
    data, db = tiny
    with FeatureDB(db) as f:
        ids, labels, names = f.image_ids, f.labels, f.label_names

    def whole_column(self):
        raise AssertionError("the whole image_ids column was decoded")

    monkeypatch.setattr(FeatureDB, "image_ids", property(whole_column))
    with SearchEngine(db) as engine:
        assert len(engine.image_ids) == len(ids) == 16
        assert [engine.image_ids[i] for i in (0, 5, -1)] == [ids[0], ids[5], ids[-1]]
        assert engine.image_ids[2:5] == ids[2:5] and list(engine.image_ids) == ids
        assert engine.image_ids.many([5, 1, 5]) == [ids[5], ids[1], ids[5]] and engine.image_ids.many([]) == []
        assert [engine.labels[i] for i in range(16)] == [names[l] for l in labels]
        hits = engine.query(data / ids[6], k=4)
        assert hits[0].image_id == ids[6] and hits[0].row == 6  # hits carry their row
        assert {h.label for h in hits} == {names[labels[6]]}
        with pytest.raises(IndexError):
            engine.image_ids[16]


def test_row_labels_say_whether_any_row_is_labelled():
    import numpy as np

    assert RowLabels(np.array([-1, 1, 0]), ["a", "b"]).any() and list(RowLabels(np.array([-1, 1]), ["a", "b"])) == ["", "b"]
    assert not RowLabels(np.array([-1, -1]), []).any()


@pytest.mark.parametrize("index", ["exact", "hnsw", "ivfpq"])
def test_shown_distances_are_exact_so_a_database_image_is_at_zero(tiny, tmp_path, index):
    """Logo and copyright checks read the distance: a database image queried as its own file must
    be at 0 (it was ~3e-4: the float32 expansion ||q||^2 + ||x||^2 - 2 q.x cancels), and every
    shown distance, whatever the index kind (IVF-PQ's are approximate), is the true one to the
    stored row, best first. TensorFlow computes the query's descriptor bit for bit as the stored
    one; Keras on JAX (the GPU machine's backend) rounds a batch of one differently from the
    extraction's padded batches (~3e-7 on the CPU), so there the zero is a bound."""
    import shutil

    import keras
    import numpy as np

    pytest.importorskip({"exact": "numpy", "hnsw": "hnswlib", "ivfpq": "faiss"}[index])
    data, db = tiny
    local = tmp_path / "feats.h5"
    shutil.copy(db, local)
    with SearchEngine(local, index=index) as engine:
        with FeatureDB(local) as f:
            stored = np.asarray(f.features[:], np.float64)
        for row in (3, 9):
            hits = engine.query(data / engine.image_ids[row], k=5)
            assert hits[0].row == row
            assert hits[0].distance == 0.0 if keras.backend.backend() == "tensorflow" else hits[0].distance < 1e-5
            q = np.asarray(engine.embed_query(data / engine.image_ids[row]), np.float64)[0]
            true = [float(np.linalg.norm(stored[h.row] - q)) for h in hits]
            np.testing.assert_allclose([h.distance for h in hits], true, atol=1e-6)
            assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_distances_an_index_re_ranked_exactly_are_not_computed_again(tiny, tmp_path, monkeypatch):
    """IVF-PQ with re-ranking answers true distances from the stored rows: the engine shows them as
    they are (it read every shown row again, through h5py, ~2 ms per query at 100k rows)."""
    import shutil

    import ris.topk

    pytest.importorskip("faiss")
    data, db = tiny
    local = tmp_path / "feats.h5"
    shutil.copy(db, local)

    def again(*a, **k):
        raise AssertionError("shown distances computed twice")

    with SearchEngine(local, index="ivfpq") as engine:
        assert engine.index.exact_distances
        monkeypatch.setattr(ris.topk, "exact_shown", again)
        hits = engine.query(data / engine.image_ids[3], k=5)
        assert hits[0].row == 3 and hits[0].distance == 0.0


def test_an_open_engine_answers_from_its_own_database_after_the_file_is_replaced(tiny, tmp_path):
    """``ris-index remove`` / ``--sync`` / a copy replace the database under its name while a
    service or a Python caller holds an engine open: its answers stay those of the rows it has
    (the exact distances were read from the new file at the old offsets: the query's own image
    came second at 0.93)."""
    import shutil

    from ris.sync import remove_images

    data, db = tiny
    local, smaller = tmp_path / "feats.h5", tmp_path / "smaller.h5"
    shutil.copy(db, local)
    shutil.copy(db, smaller)
    with SearchEngine(local) as engine:
        before = [(h.row, h.distance) for h in engine.query(data / engine.image_ids[6], k=5)]
    with FeatureDB(smaller) as f:
        remove_images(smaller, f.image_ids[:5])
    with SearchEngine(local) as engine:
        smaller.replace(local)
        after = [(h.row, h.distance) for h in engine.query(data / engine.image_ids[6], k=5)]
    assert after == before and after[0] == (6, after[0][1]) and after[0][1] < 1e-5


@pytest.mark.parametrize("kw,needle", [({"rerank": "dba-qe"}, "unknown re-ranking method 'dba-qe'"),
                                         ({"index": "hnws"}, "unknown index kind 'hnws'")])
def test_a_misspelt_rerank_or_index_is_refused_before_anything_is_opened(tmp_path, monkeypatch, kw, needle):
    """ris.open_database('feats.h5', rerank='bogus') loaded the database, the backbone and its warm-up
    (46 s on a busy 2-core machine) before saying the name was wrong, as the commands do at once."""
    import ris.featuredb

    monkeypatch.setattr(ris.featuredb, "FeatureDB", lambda *a, **k: pytest.fail("the database was opened"))
    with pytest.raises(BadChoice, match=needle):
        SearchEngine(tmp_path / "feats.h5", **kw)


def test_a_query_path_given_as_bytes_is_read_as_the_file_system_names_it(tiny):
    """os.listdir(b'.') gives bytes names (the only exact form of a name that is not UTF-8);
    engine.query(b'...') raised Path's TypeError instead of searching the file."""
    import os
    import shutil

    data, db = tiny
    odd = data.parent / os.fsdecode(b"caf\xe9-query.jpg")
    shutil.copy(data / "ukbench00006.jpg", odd)
    with SearchEngine(db) as engine:
        by_bytes = engine.query(os.fsencode(odd), k=2)
        assert [h.row for h in by_bytes] == [h.row for h in engine.query(odd, k=2)] and by_bytes[0].row == 6
        assert engine.search(os.fsencode(odd), k=1)[0].row == 6


def test_a_montage_never_replaces_a_database_image_reached_through_a_link_out_of_the_dataset(tmp_path, capsys,
                                                                                           monkeypatch):
    """A database image that is a link to a file outside the dataset folder (or under a folder link
    pointing out of it): --output naming that outside file was let through (only paths under the
    dataset root were compared), and the montage replaced the collection's photo. Found by the rows'
    file stamps and the files' identity, without reading any image file or every name."""
    import shutil

    import ris.row_views
    from ris.cli import search as search_cli
    from ris.cli.common import run

    data = make_tiny_dataset(tmp_path / "images", n_objects=1, views=3, size=64)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(data / "ukbench00001.jpg", outside / "photo.jpg")
    (data / "ext.jpg").symlink_to(outside / "photo.jpg")
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.move(data / "ukbench00002.jpg", shared / "p.jpg")
    (data / "sub").symlink_to(shared)
    db = tmp_path / "feats.h5"
    extract_features(data, db, FAST, ExtractOptions(labels="none", progress=False, log=lambda s: None))
    with FeatureDB(db) as f:
        assert sorted(f.image_ids) == ["ext.jpg", "sub/p.jpg", "ukbench00000.jpg"]
    query = tmp_path / "q.jpg"
    shutil.copy(data / "ukbench00000.jpg", query)
    other = outside / "mine.png"  # an existing file outside, of no database row: replaced, as documented
    shutil.copy(data / "ukbench00000.jpg", other)
    names = []
    whole = ris.row_views.RowNames.__iter__
    monkeypatch.setattr(ris.row_views.RowNames, "__iter__", lambda self: names.append(1) or whole(self))
    for output, rel in ((outside / "photo.jpg", "ext.jpg"), (shared / "p.jpg", "sub/p.jpg")):
        before = output.read_bytes()
        capsys.readouterr()
        code = run("ris-search", search_cli.main, ["--image", str(query), "--features-db", str(db),
                                                   "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and err == (f"ris-search: error: {output}: is an image of the database ({rel}); "
                                     "give --output another file name\n"), err
        assert output.read_bytes() == before
    assert names == []  # outside the dataset folder: the name column is not read through
    assert run("ris-search", search_cli.main, ["--image", str(query), "--features-db", str(db), "-k", "1",
                                               "--output", str(other)]) == 0


def _damaged_copy(src, dst):
    """``src`` with 90 bytes of junk before its end marker: it decodes, and libjpeg warns
    'Corrupt JPEG data: N extraneous bytes before marker 0xd9' (N as libjpeg counts them)."""
    jpeg = src.read_bytes()
    dst.write_bytes(jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:])
    return dst


def test_a_damaged_jpeg_query_is_named_in_one_warning_line_and_searched_as_before(tiny, tmp_path, capfd,
                                                                                   monkeypatch):
    """libjpeg printed its own line, unnamed, for a query with junk before its end marker
    ('Corrupt JPEG data: 84 extraneous bytes before marker 0xd9' on stderr); ris-extract names such
    files. The engine says it as ris-extract does, through its log, naming the file as given."""
    import re

    data, db = tiny
    _damaged_copy(data / "ukbench00006.jpg", tmp_path / "bad.jpg")
    monkeypatch.chdir(tmp_path)
    said: list[str] = []
    with SearchEngine(db, log=said.append) as engine:
        clean = [(h.row, h.distance) for h in engine.query(data / "ukbench00006.jpg", k=3)]
        capfd.readouterr()
        damaged = [(h.row, h.distance) for h in engine.query("./bad.jpg", k=3)]
        assert [h.row for h in engine.search(b"./bad.jpg", k=3)] == [r for r, _ in clean]
    assert damaged == clean
    assert len(said) == 2 and said[0] == said[1], said
    assert re.fullmatch(r"warning: \./bad\.jpg: corrupt JPEG data \(\d+ extraneous bytes before marker 0xd9\)",
                        said[0]), said
    assert "Corrupt JPEG data" not in capfd.readouterr().err


def test_ris_search_names_a_damaged_jpeg_query_once_beside_its_montage_and_other_queries(tiny, tmp_path, capfd,
                                                                                         monkeypatch):
    """The query is decoded again for the montage (and for --verify): each decode printed libjpeg's
    unnamed line. Now one line per damaged query, results and exit status as before."""
    import json
    import re

    from ris.cli import search as search_cli
    from ris.cli.common import run

    data, db = tiny
    _damaged_copy(data / "ukbench00006.jpg", tmp_path / "bad.jpg")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = run("ris-search", search_cli.main, ["--image", "./bad.jpg", str(data / "ukbench00006.jpg"),
                                               "--features-db", str(db), "-k", "3", "--json",
                                               "--output", "m.png"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert re.fullmatch(r"warning: \./bad\.jpg: corrupt JPEG data \(\d+ extraneous bytes before marker 0xd9\)\n",
                        err), err
    bad, clean = json.loads(out)
    assert bad["query"] == "./bad.jpg" and bad["results"] == clean["results"]
    assert (tmp_path / "m-1.png").is_file() and (tmp_path / "m-2.png").is_file()


def test_a_damaged_database_image_is_named_once_when_a_shallow_heads_thumbnails_are_made(tiny, tmp_path, capfd):
    """An engine with a head that has a thumbnail branch (ris-train --shallow) makes the database's
    thumbnails on first load: a damaged JPEG among them printed libjpeg's unnamed line. It is said
    once, through the engine's log (ris-serve's carries its prefix), as ris-extract says it."""
    import re
    import shutil

    pytest.importorskip("keras")
    from ris.testing import damage_jpeg
    from ris.train import TrainConfig, train_head

    data, db = tiny
    shutil.copy(db, tmp_path / "feats.h5")
    train_head(tmp_path / "feats.h5", tmp_path / "h.keras", TrainConfig(arch="mlp", shallow=8, epochs=1, hidden=(8,),
                                                                         out_dim=8, p=2, k=2), progress=False,
               log=lambda s: None)
    (tmp_path / "feats.h5.thumbs8.h5").unlink()  # made again, from the moved folder holding a damaged image
    moved = shutil.copytree(data, tmp_path / "moved")
    bad = damage_jpeg(moved / "ukbench00005.jpg")
    said: list[str] = []
    capfd.readouterr()
    with SearchEngine(tmp_path / "feats.h5", tmp_path / "h.keras", dataset_root=moved, log=said.append) as engine:
        assert len(engine.query(data / "ukbench00004.jpg", k=3)) == 3
    assert len(said) == 1 and re.fullmatch(rf"warning: {re.escape(str(bad))}: corrupt JPEG data \(\d+ extraneous "
                                           r"bytes before marker 0xd9\)", said[0]), said
    assert "JPEG" not in capfd.readouterr().err
