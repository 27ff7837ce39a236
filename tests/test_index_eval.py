"""ris-eval --index: an index's ranked lists scored on the same protocol as ris-eval itself
(held-out queries searching the whole collection, --gallery split, --queries with distractors)."""
import numpy as np
import pytest

from ris.evaluate import evaluate_db
from ris.index_eval import evaluate_index
from ris.testing import make_feature_db


@pytest.fixture()
def db_with_distractors(tmp_path):
    """20 objects x 4 views and 20 unlabelled distractors near some of the objects (110 rows at most,
    so the ranked lists of ris-eval --index reach the whole gallery and mAP is exact)."""
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(20, 16))
    views = np.repeat(centers, 4, axis=0) + 0.45 * rng.normal(size=(80, 16))
    confusers = centers[rng.integers(0, 20, 20)] + 0.45 * rng.normal(size=(20, 16))
    x = np.vstack([views, confusers])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    names = [f"objects/{i:03d}.jpg" for i in range(80)] + [f"distractors/{i:03d}.jpg" for i in range(20)]
    labels = [f"o{i // 4:02d}" for i in range(80)] + [""] * 20
    path = make_feature_db(tmp_path / "f.h5", x, names=names, labels=labels)
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(names[:40:3]) + "\n")
    return path, queries


@pytest.mark.parametrize("protocol", [dict(split="all"), dict(split="test", gallery="all"),
                                      dict(split="test", gallery="split"), dict(queries=True)],
                         ids=["all", "held-out-whole-collection", "held-out-fold-gallery", "queries-with-distractors"])
def test_exact_search_through_the_index_path_scores_as_ris_eval_does(db_with_distractors, protocol):
    path, queries = db_with_distractors
    kw = dict(protocol)
    if kw.pop("queries", False):
        kw = dict(split="all", queries=str(queries))
    plain = evaluate_db(path, **kw)["raw"]
    r = evaluate_index(path, "exact", **kw)["exact"]
    assert r["queries"] == plain["queries"]
    for key in ("ns_score", "map", "top4_accuracy"):
        assert r[key] == pytest.approx(plain[key], abs=1e-3), (key, r, plain)
    assert r["recall_at"]["1"] == pytest.approx(plain["recall_at"]["1"], abs=1e-3)


def test_distractors_near_the_queries_lower_the_scores_of_both(db_with_distractors):
    path, queries = db_with_distractors
    listed = evaluate_index(path, "exact", queries=str(queries))
    assert "distractors" in listed["protocol"]
    alone = evaluate_index(path, "exact", split="all")
    assert listed["exact"]["map"] < alone["exact"]["map"]  # the distractors are in the gallery


def test_ris_eval_refuses_what_the_index_scoring_does_not_do(db_with_distractors):
    from ris.cli.eval import main
    from ris.errors import RisError

    path, _ = db_with_distractors
    for extra in (["--rerank", "qe"], ["--verify", "5"], ["--folds", "3"]):
        with pytest.raises(RisError, match="--index"):
            main(["--features-db", str(path), "--index", "exact", *extra])


def test_a_head_on_a_collection_it_never_saw_is_scored_through_the_index_too(tmp_path):
    """ris-eval --model head --index KIND on another collection refused ('its held-out images are
    not in this database'): the --index path now chooses its queries as ris-eval does."""
    pytest.importorskip("keras")
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig
    from ris.testing import make_tiny_dataset
    from ris.train import TrainConfig, train_head

    cfg = ExtractConfig(model="vgg16", weights="none", input_size=64)
    opts = ExtractOptions(labels="ukbench", progress=False, log=lambda s: None)
    train_db, new_db = tmp_path / "train.h5", tmp_path / "new.h5"
    extract_features(make_tiny_dataset(tmp_path / "a", n_objects=8, views=4, size=64), train_db, cfg, opts)
    make_tiny_dataset(tmp_path / "b" / "new", n_objects=5, views=4, size=64, seed=9)  # other names, other photos
    extract_features(tmp_path / "b", new_db, cfg, opts)
    head = tmp_path / "h.keras"
    train_head(train_db, head, TrainConfig(whiten_dim=8), progress=False, log=lambda s: None)
    r = evaluate_index(new_db, "exact", model=str(head))
    plain = evaluate_db(new_db, head)
    assert r["images"] == 20 and "never saw" in r["protocol"]
    assert r["exact"]["ns_score"] == pytest.approx(plain["head"]["ns_score"], abs=1e-3)


def test_scoring_through_milvus_lite_lets_go_of_its_folder(db_with_distractors, tmp_path):
    """evaluate_index (ris-eval --index milvus:...) never closed the index it opened: Milvus Lite kept
    the folder's lock until the process ended, so a ris-search beside a notebook that had scored
    through it failed with 'another process is using it'."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    import fcntl

    path, _ = db_with_distractors
    target = tmp_path / "m.db"
    r = evaluate_index(path, f"milvus:{target}", split="all")
    assert r["indexed"]["map"] == pytest.approx(r["exact"]["map"], abs=1e-4)
    with open(target / "LOCK", "a") as fh:  # flock: a lock still held by the Lite server refuses this one
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_index_table_explains_n_s_on_groups_that_are_not_of_four():
    from ris.index_eval import format_index_table, ranked_scores
    from ris.index import ExactIndex

    labels = np.repeat(np.arange(3), [2, 3, 5])
    vectors = np.eye(3, dtype=np.float32)[labels] + np.random.default_rng(0).normal(0, 0.01, (10, 3)).astype(np.float32)
    rows = np.arange(10)
    s = ranked_scores(ExactIndex(vectors, "euclidean"), vectors, labels, rows, rows, 9)
    assert s["ns_perfect"] == pytest.approx(3.3) and s["ns_score"] == pytest.approx(3.3)
    r = {"features_db": "f.h5", "protocol": "all", "depth": 9, "metric": "euclidean", "index": "hnsw",
         "index_type": "HnswIndex", "exact": s, "indexed": s, "delta": {"ns_score": 0.0, "map": 0.0}}
    assert "a perfect search scores N-S 3.300 here" in format_index_table(r)
