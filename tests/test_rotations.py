"""Query-time rotations (ris.rotations): the turned copies, the exact merge, re-rankers, the engine."""
import json

import cv2
import numpy as np
import pytest

from ris.errors import RisError
from ris.rerank import RERANKERS, Reranker
from ris.rotations import check_rerank, merge_best, turned
from ris.topk import blockwise_topk, pairwise_distances


def test_turned_copies_are_the_four_quarter_turns_of_each_image():
    imgs = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    out = turned(imgs)
    assert out.shape == (8, 3, 3, 1)
    for b in range(2):
        for k in range(4):
            assert np.array_equal(out[4 * b + k], np.rot90(imgs[b], k))
    with pytest.raises(ValueError):
        turned(np.zeros((3, 4, 3)))


def test_images_kept_at_their_aspect_ratio_turn_into_copies_of_two_shapes():
    """--aspect keep: a 3 x 4 image's quarter turns are 4 x 3; the copies come back as a list, in order."""
    imgs = np.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
    out = turned(imgs)
    assert isinstance(out, list) and len(out) == 8
    assert [o.shape for o in out[:4]] == [(3, 4, 1), (4, 3, 1), (3, 4, 1), (4, 3, 1)]
    for b in range(2):
        for k in range(4):
            assert np.array_equal(out[4 * b + k], np.rot90(imgs[b], k))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_merging_per_copy_top_k_equals_ranking_by_the_best_distance(metric):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    for trial in range(20):
        copies = rng.normal(size=(4, 16)).astype(np.float32)
        best = pairwise_distances(copies, db, metric).min(axis=0)
        want = np.lexsort((np.arange(len(db)), best))[:10]
        d, i = blockwise_topk(copies, db, 10, metric)
        md, mi = merge_best(d, i, 10)
        assert mi.shape == (1, 10) and mi[0].tolist() == want.tolist()
        assert np.allclose(md[0], best[want], atol=1e-5)


def test_merge_drops_empty_slots_and_keeps_each_row_once():
    d = np.array([[0.5, np.inf], [0.1, 0.2]])
    i = np.array([[3, -1], [7, 3]])
    md, mi = merge_best(d, i, 5)
    assert mi[0].tolist() == [7, 3] and np.allclose(md[0], [0.1, 0.2])


@pytest.mark.parametrize("method", ["none", "qe", "dba+qe"])
def test_a_reranker_keeps_each_rows_best_score_over_the_copies(method):
    rng = np.random.default_rng(1)
    db = rng.normal(size=(60, 8)).astype(np.float32)
    copies = rng.normal(size=(4, 8)).astype(np.float32)
    r = Reranker(db, method)
    per_copy = r.impl.scores(copies, np.full(4, -1))
    best = per_copy.min(axis=0)
    s, i = r.search(copies, 5, variants=4)
    assert i[0].tolist() == np.lexsort((np.arange(60), best))[:5].tolist()
    assert np.allclose(s[0], np.sort(best)[:5], atol=1e-6)


@pytest.mark.parametrize("method", ["diffusion", "kreciprocal"])
def test_rerankers_whose_scores_are_normalised_per_query_are_refused(method):
    assert not RERANKERS[method].comparable_scores
    with pytest.raises(RisError, match=f"--rotations does not work with --rerank {method}"):
        check_rerank(method)
    r = Reranker(np.random.default_rng(2).normal(size=(60, 8)).astype(np.float32), method,
                 **({"graph_k": 5, "query_k": 3} if method == "diffusion" else {}))
    with pytest.raises(RisError):
        r.search(np.ones((4, 8), np.float32), 3, variants=4)


@pytest.fixture(scope="module")
def turned_case(tmp_path_factory):
    """A photo A, a near copy D of A turned by 90 degrees, and the query: A turned by 90 degrees.
    Without rotations the query's nearest image is D (same orientation); with them, A itself."""
    import ris
    from ris.testing import _object_image

    root = tmp_path_factory.mktemp("turned")
    images = root / "images"
    images.mkdir()
    a = _object_image(0, 64, seed=3)
    a[:, :20] = 0  # a dark left band: the photo is far from symmetric under a quarter turn
    d = np.rot90(a).copy()
    d[40:44, 40:44] = 255 - d[40:44, 40:44]  # a small blemish: near the query, not equal to it
    cv2.imwrite(str(images / "a.png"), a)
    cv2.imwrite(str(images / "d.png"), d)
    for n in range(1, 5):
        cv2.imwrite(str(images / f"other{n}.png"), _object_image(n, 64, seed=3))
    query = root / "query.png"
    cv2.imwrite(str(query), np.rot90(a))
    db = root / "feats.h5"
    ris.build_database(images, db, model="vgg16", weights="none", input_size=64, labels="none", progress=False)
    return db, query


def test_a_turned_query_finds_its_original_first_only_with_rotations(turned_case):
    import ris

    db, query = turned_case
    assert ris.query(db, query, k=2)[0].image_id == "d.png"
    hits = ris.query(db, query, k=2, rotations=True)
    assert hits[0].image_id == "a.png" and hits[0].distance < 1e-3
    assert hits[1].image_id == "d.png"
    with ris.open_database(db, rotations=True) as engine:  # the serving path: a decoded array
        rgb = cv2.cvtColor(cv2.imread(str(query)), cv2.COLOR_BGR2RGB)
        assert engine.search(rgb, k=1)[0].image_id == "a.png"
        assert engine.embed_query(query).shape[0] == 4
        # qe expands each copy with its neighbours: the turned-back copy pulls A and D together
        assert {h.image_id for h in engine.search(query, k=2, rerank="qe")} == {"a.png", "d.png"}


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_ris_search_rotations_through_an_index_and_a_reranker(turned_case, capsys, index):
    from ris.cli import search as search_cli
    from ris.cli.common import run

    pytest.importorskip("hnswlib") if index == "hnsw" else None
    db, query = turned_case
    for extra in ([], ["--rerank", "dba+qe"]):
        code = run("ris-search", search_cli.main, ["--image", str(query), "--features-db", str(db), "-k", "2",
                                                   "--index", index, "--rotations", "--json", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["results"][0]["image_id"] == "a.png", (index, extra)


def test_ris_search_refuses_rotations_with_a_per_query_normalised_reranker(turned_case, capsys):
    from ris.cli import search as search_cli
    from ris.cli.common import run

    db, query = turned_case
    code = run("ris-search", search_cli.main, ["--image", str(query), "--features-db", str(db),
                                               "--rotations", "--rerank", "diffusion"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("ris-search: error: --rotations does not work with --rerank diffusion") and \
        len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra", [["--index", "exact"], ["--folds", "3"], ["--rerank", "kreciprocal"]])
def test_ris_eval_refuses_rotations_it_cannot_score_in_one_line(turned_case, capsys, extra):
    from ris.cli import eval as eval_cli
    from ris.cli.common import run

    db, _ = turned_case
    code = run("ris-eval", eval_cli.main, ["--features-db", str(db), "--rotations", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("ris-eval: error: --rotations "), err


def test_ris_eval_rotations_name_a_damaged_database_jpeg_instead_of_libjpegs_line(tmp_path, capfd):
    """--rotations describes the scored queries again from their files: a JPEG of the database with
    junk before its end marker printed libjpeg's unnamed line ('Corrupt JPEG data: 87 extraneous
    bytes before marker 0xd9'). Named now, as ris-extract named it; the scores as before."""
    import re

    import ris
    from ris.cli import eval as eval_cli
    from ris.cli.common import run
    from ris.testing import make_tiny_dataset

    images = make_tiny_dataset(tmp_path / "images", n_objects=2, views=4, size=96)
    jpeg = (images / "ukbench00001.jpg").read_bytes()
    (images / "ukbench00001.jpg").write_bytes(jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:])
    db = tmp_path / "f.h5"
    ris.build_database(images, db, model="vgg16", weights="none", input_size=64, progress=False, labels="ukbench")
    capfd.readouterr()
    code = run("ris-eval", eval_cli.main, ["--features-db", str(db), "--rotations", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert re.fullmatch(rf"warning: {re.escape(str(images / 'ukbench00001.jpg'))}: corrupt JPEG data \(\d+ "
                        r"extraneous bytes before marker 0xd9\)\n", err), err
    assert json.loads(out)["rotations"]["queries_embedded"] == 8
