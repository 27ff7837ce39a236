"""Evaluation: which images are scored, that the scores are those of these images, and that scoring
raw features or a learned-whitening head never loads TensorFlow or Keras."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ris.errors import ModelError
from ris.evaluate import evaluate_db, evaluate_folds
from ris.metrics import evaluate_retrieval
from ris.splits import make_split, rows_of, split_objects

ROOT = Path(__file__).resolve().parents[1]


def _write_db(path, n_obj: int = 15, views: int = 4, dim: int = 16, seed: int = 0, prefix: str = ""):
    from ris.featuredb import FeatureWriter

    rng = np.random.default_rng(seed)
    x = np.repeat(rng.normal(size=(n_obj, dim)), views, 0) + 0.8 * rng.normal(size=(n_obj * views, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    lab = np.repeat(np.arange(n_obj), views)
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (dim,), [f"o{i}" for i in range(n_obj)])
    w.add([f"{prefix}{i:04d}.jpg" for i in range(len(x))], x, [f"o{g}" for g in lab])
    w.finish({})
    return path, x, lab


@pytest.fixture(scope="module")
def whitened(tmp_path_factory):
    """A database and the default head (learned whitening) trained on it."""
    pytest.importorskip("keras")
    from ris.train import TrainConfig, train_head

    tmp = tmp_path_factory.mktemp("eval")
    db, x, lab = _write_db(tmp / "f.h5")
    model = tmp / "w.keras"
    train_head(db, model, TrainConfig(whiten_dim=8), progress=False, log=lambda s: None)
    return db, model, x, lab


def test_without_a_model_the_seeded_held_out_objects_are_scored(tmp_path):
    db, x, lab = _write_db(tmp_path / "f.h5")
    r = evaluate_db(db, split="test", seed=4, test_fraction=0.4, gallery="split")
    rows = rows_of(lab, split_objects(lab, 0.4, 0.1, seed=4)["test"])
    assert (r["objects"], r["images"]) == (6, 24)
    assert r["raw"] == evaluate_retrieval(x[rows], lab[rows], "euclidean").to_dict()
    whole = evaluate_db(db, split="test", seed=4, test_fraction=0.4)  # default: they search everything
    assert (whole["images"], whole["gallery_images"]) == (24, 60)
    assert whole["raw"]["ns_score"] == evaluate_retrieval(x, lab, "euclidean", query_rows=rows).ns_score
    everything = evaluate_db(db, split="all")
    assert everything["images"] == 60 and everything["raw"] == evaluate_retrieval(x, lab, "euclidean").to_dict()


def test_a_model_is_scored_on_its_own_test_images_as_training_scored_it(whitened):
    db, model, x, lab = whitened
    from ris.modelio import read_meta

    meta = read_meta(model)
    whole = evaluate_db(db, model)  # training scores its test objects searching the whole collection ...
    split = evaluate_db(db, model, gallery="split")  # ... and, beside that, among themselves
    assert split["images"] == len(meta["split"]["test_images"]) and "held-out objects" in split["split_description"]
    for r, stored in ((whole, meta["test_scores"]), (split, meta["test_scores"]["test_gallery"])):
        for part in ("raw", "head"):
            for key in ("ns_score", "map", "top4_accuracy", "queries"):
                assert r[part][key] == pytest.approx(stored[part][key], abs=1e-9), (part, key)
    assert meta["test_scores"]["protocol"] == ("held-out queries search the whole collection; the head's training "
                                               "images, all of other objects, are distractors")
    assert meta["test_scores"]["protocol"].partition("; ")[2] in whole["split_description"]
    assert "not a held-out score" in evaluate_db(db, model, split="all")["split_description"]


def test_evaluation_imports_neither_tensorflow_nor_keras(whitened, tmp_path):
    """Raw features and a learned-whitening head are scored in NumPy: no TensorFlow start-up."""
    db, model, _, _ = whitened
    code = ("import json, sys\n"
            "from ris.evaluate import evaluate_db, evaluate_folds\n"
            "from ris.cli import eval as eval_cli\n"
            "head = evaluate_db(sys.argv[1], sys.argv[2])['head']\n"
            "evaluate_db(sys.argv[1], split='all'); evaluate_folds(sys.argv[1], 3, rerank='qe')\n"
            "from ris.cli.common import run\n"
            "assert run('ris-eval', eval_cli.main, ['--features-db', sys.argv[1], '--model', sys.argv[2], '--json']) == 0\n"
            "loaded = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
            "print(json.dumps({'loaded': loaded, 'ns': head['ns_score']}), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(db), str(model)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stderr.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["ns"] == evaluate_db(db, model)["head"]["ns_score"]


def test_a_model_on_a_collection_it_never_saw_scores_every_labelled_image(whitened, tmp_path):
    _, model, _, _ = whitened
    other, x, lab = _write_db(tmp_path / "other.h5", n_obj=4, seed=7, prefix="new/")
    r = evaluate_db(other, model)
    assert r["images"] == 16 and r["training_images_in_db"] == 0
    assert "never saw" in r["split_description"]
    assert r["raw"] == evaluate_retrieval(x, lab, "euclidean").to_dict()


def test_a_collection_that_reuses_the_training_file_names_is_not_taken_for_the_training_images(whitened, tmp_path):
    """Training images were matched by relative path alone: another collection whose files happen
    to have the same names (0000.jpg ... as here, numbered photos are common) was taken for the
    head's training images and refused as 'nothing held out'. The head now records a sketch of each
    fitted image's features: a name match with other content is not a training image."""
    _, model, _, _ = whitened
    other, x, lab = _write_db(tmp_path / "other.h5", n_obj=15, seed=7)  # the same 60 names, other photos
    r = evaluate_db(other, model)
    assert r["training_images_in_db"] == 0 and "never saw" in r["split_description"]
    assert r["images"] == 60 and r["raw"] == evaluate_retrieval(x, lab, "euclidean").to_dict()


def test_training_images_copied_into_another_collection_under_new_names_are_recognised(whitened, tmp_path):
    """Training images were recognised by name (and then content): the same photos copied into a
    new collection under other names were scored as held-out queries, a score on the training set."""
    from ris.featuredb import FeatureDB, FeatureWriter
    from ris.modelio import read_meta

    db, model, x, lab = whitened
    fit = read_meta(model)["split"]["fit_images"]
    with FeatureDB(db) as f:
        ids = list(f.image_ids)
    rows = [ids.index(n) for n in fit[:8]]  # eight training images, renamed, beside four new objects
    other, y, lab_y = _write_db(tmp_path / "new.h5", n_obj=4, seed=7, prefix="new/")
    mixed = tmp_path / "mixed.h5"
    w = FeatureWriter(mixed, {"model": "synthetic", "pooling": "gap"}, (x.shape[1],),
                      sorted({f"o{g}" for g in lab_y} | {f"t{g}" for g in lab[rows]}))
    w.add([f"renamed/{i}.jpg" for i in range(8)], x[rows], [f"t{g}" for g in lab[rows]])
    w.add([f"new/{i:04d}.jpg" for i in range(len(y))], y, [f"o{g}" for g in lab_y])
    w.finish({})
    r = evaluate_db(mixed, model)
    assert r["training_images_in_db"] == 8
    assert "8 of them under other names" in r["split_description"]
    assert r["images"] == 16  # only the four new objects are scored as held-out


def _cone_db(path, n_obj: int, seed: int, prefix: str, copies=None):
    """Features like an untrained network's: every image in one narrow cone of positive vectors
    (cosine about 0.97 between any two photos), 4 views per object; ``copies``: (names, features,
    labels) of images written beside them."""
    from ris.featuredb import FeatureWriter

    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).random(128)  # the same cone for every collection
    objects = base + 0.1 * rng.normal(size=(n_obj, 128))
    x = np.abs(np.repeat(objects, 4, 0) + 0.03 * rng.normal(size=(n_obj * 4, 128))).astype(np.float32)
    names, lab = [f"{prefix}{i:04d}.jpg" for i in range(len(x))], [f"o{g}" for g in np.repeat(np.arange(n_obj), 4)]
    if copies is not None:
        names, x, lab = names + copies[0], np.concatenate([x, copies[1]]), lab + copies[2]
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (128,), sorted(set(lab)))
    w.add(names, x, lab)
    w.finish({})
    return path, x


def test_photos_whose_features_hardly_differ_are_not_taken_for_the_heads_training_images(tmp_path):
    """With features that differ little between images (an untrained network's, ris-extract --weights
    none), photos of another collection came within the 128-bit sketch's tolerance of some training
    image, one to one by chance: a 200-image Corel subset was said to hold 8 of a UKBench head's
    training images ('[8 of them under other names (recognised by content)]') and the 5 classes of
    those 8 photos, 100 images, were never scored. The sketch's bits now split the head's own
    fitted images in half (thresholds stored with the head), so look-alikes differ in about half of
    them, and true copies are still found."""
    pytest.importorskip("keras")
    from ris.featuredb import FeatureDB
    from ris.modelio import read_meta
    from ris.train import TrainConfig, train_head

    db, x = _cone_db(tmp_path / "train.h5", 40, seed=1, prefix="uk/")
    model = tmp_path / "w.keras"
    train_head(db, model, TrainConfig(whiten_dim=8), progress=False, log=lambda s: None)
    other, _ = _cone_db(tmp_path / "other.h5", 50, seed=2, prefix="corel/")
    r = evaluate_db(other, model)
    assert r["training_images_in_db"] == 0 and r["images"] == 200, r["split_description"]
    assert "never saw" in r["split_description"]
    fit = read_meta(model)["split"]["fit_images"]
    with FeatureDB(db) as f:
        rows = [list(f.image_ids).index(n) for n in fit[:8]]
    mixed, _ = _cone_db(tmp_path / "mixed.h5", 50, seed=2, prefix="corel/",
                        copies=([f"renamed/{i}.jpg" for i in range(8)], x[rows], ["t"] * 8))
    r = evaluate_db(mixed, model)
    assert r["training_images_in_db"] == 8 and "8 of them under other names" in r["split_description"]


def test_the_training_database_itself_still_holds_the_training_images(whitened):
    db, model, _, lab = whitened
    r = evaluate_db(db, model)
    assert r["training_images_in_db"] > 0 and "never saw" not in r["split_description"]


def test_metadata_without_any_split_treats_the_database_as_new(tmp_path):
    import zipfile

    from ris.featuredb import FeatureDB

    db, _, _ = _write_db(tmp_path / "f.h5")
    with FeatureDB(db) as f:  # made from these very features: only the split is missing
        meta = {"config": {"arch": "mlp"}, "split": {"by": "object"}, "feature_fingerprint": f.fingerprint()}
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ris.json", json.dumps(meta))
    with pytest.raises(ModelError, match="m.keras"):  # scored raw first, then the head cannot be loaded
        evaluate_db(db, path)


def test_folds_score_each_held_out_part_once(tmp_path):
    db, x, lab = _write_db(tmp_path / "f.h5")
    r = evaluate_folds(db, folds=3, seed=1, gallery="split")
    whole = evaluate_folds(db, folds=3, seed=1)  # default: each fold's queries search every image
    assert sum(f["queries"] for f in r["per_fold"]) == 60  # the three test parts partition the images
    for k, (fold, fold_whole) in enumerate(zip(r["per_fold"], whole["per_fold"])):
        rows = make_split(lab, seed=1, fold=k, folds=3)[0]["test"]
        assert fold == evaluate_retrieval(x[rows], lab[rows], "euclidean").to_dict()
        assert fold_whole == evaluate_retrieval(x, lab, "euclidean", query_rows=rows).to_dict()
    assert r["summary"]["map"]["mean"] == round(float(np.mean([f["map"] for f in r["per_fold"]])), 4)


@pytest.fixture(scope="module")
def turned_db(tmp_path_factory):
    """Object x: a photo A and A turned by 90 degrees; object y: A with a blemish and another photo.
    Query x0 (= A): its nearest image upright is y's blemished copy; turned, its own x1."""
    import cv2

    import ris
    from ris.testing import _object_image

    root = tmp_path_factory.mktemp("turned_eval")
    images = root / "images"
    images.mkdir()
    a = _object_image(0, 64, seed=3)
    a[:, :20] = 0
    blemished = a.copy()
    blemished[40:44, 40:44] = 255 - blemished[40:44, 40:44]
    files = {"x0.png": (a, "x"), "x1.png": (np.rot90(a), "x"), "y0.png": (blemished, "y"),
             "y1.png": (_object_image(1, 64, seed=3), "y"), "z0.png": (_object_image(2, 64, seed=3), "z"),
             "z1.png": (_object_image(3, 64, seed=3), "z")}
    for name, (img, _) in files.items():
        cv2.imwrite(str(images / name), np.ascontiguousarray(img))
    (images / "groundtruth.tsv").write_text("file\tlabel\n" + "".join(f"{n}\t{g}\n" for n, (_, g) in files.items()))
    db = root / "feats.h5"
    ris.build_database(images, db, model="vgg16", weights="none", input_size=64, progress=False)
    queries = root / "queries.txt"
    queries.write_text("x0.png\n")
    return db, queries, images


def test_eval_rotations_describe_each_scored_query_from_its_image_turned(turned_db):
    db, queries, _ = turned_db
    plain = evaluate_db(db, split="all", queries=queries)
    turned = evaluate_db(db, split="all", queries=queries, rotations=True)
    assert plain["raw"]["recall_at"]["1"] == 0.0  # y's blemished copy of A comes first
    assert turned["raw"]["recall_at"]["1"] == 1.0 and turned["raw"]["map"] == 1.0
    assert turned["rotations"]["queries_embedded"] == 1
    qe = evaluate_db(db, split="all", queries=queries, rotations=True, rerank="qe")
    assert qe["rerank"] == "qe" and qe["raw"]["map"] > evaluate_db(db, split="all", queries=queries, rerank="qe")["raw"]["map"]


def test_eval_rotations_refuse_what_they_cannot_score(turned_db, tmp_path):
    import shutil

    from ris.errors import DatabaseError, RisError

    db, queries, images = turned_db
    with pytest.raises(RisError, match="--rotations does not work with --rerank diffusion"):
        evaluate_db(db, split="all", queries=queries, rotations=True, rerank="diffusion")
    with pytest.raises(RisError, match="--rotations cannot be combined with --verify"):
        evaluate_db(db, split="all", queries=queries, rotations=True, verify={"k": 5})
    moved = images.with_name("moved")
    shutil.move(images, moved)
    try:
        with pytest.raises(DatabaseError, match="dataset folder .* is not there"):
            evaluate_db(db, split="all", queries=queries, rotations=True)
        assert evaluate_db(db, split="all", queries=queries)["raw"]["recall_at"]["1"] == 0.0  # stored rows: fine
    finally:
        shutil.move(moved, images)


@pytest.mark.parametrize("extra,named", [
    (["--folds", "3", "--queries", "Q"], "--queries"),
    (["--folds", "3", "--model", "M"], "--model"),
    (["--folds", "3", "--verify", "5"], "--verify"),
    (["--folds", "3", "--split", "all"], "--split"),
    (["--queries", "Q", "--gallery", "split"], "--gallery split"),
    (["--queries", "Q", "--split", "test"], "--split test"),
])
def test_ris_eval_refuses_options_it_would_ignore(tmp_path, extra, named):
    """--folds scored the off-the-shelf features whatever --model/--queries/--verify/--split said, and
    --queries searched the whole database whatever --gallery/--split said: now one line, exit 2."""
    from ris.cli.eval import main
    from ris.errors import RisError

    db, _, _ = _write_db(tmp_path / "f.h5")
    q = tmp_path / "q.txt"
    q.write_text("0000.jpg\n")
    extra = [str(q) if a == "Q" else str(tmp_path / "m.keras") if a == "M" else a for a in extra]
    with pytest.raises(RisError, match=named.replace("-", r"\-")):
        main(["--features-db", str(db), *extra])


@pytest.mark.parametrize("rerank", ["none", "dba+qe"])
def test_rows_whose_features_are_not_finite_are_left_out_as_search_leaves_them_out(tmp_path, rerank):
    """A row of NaN (a damaged file, a diverged head's embedding) gave mAP 1.25 and N-S above the
    images there are: NaN compares false, so every positive ranked first. ris-search never returns
    such rows; ris-eval now scores the collection without them and says how many it left out."""
    db, x, lab = _write_db(tmp_path / "f.h5", n_obj=10)
    import h5py

    with h5py.File(db, "a") as f:
        f["features"][0] = np.nan
        f["features"][9] = np.inf
    r = evaluate_db(db, split="all", rerank=rerank)
    keep = np.ones(len(x), bool)
    keep[[0, 9]] = False
    want = evaluate_retrieval(x[keep], lab[keep]).to_dict() if rerank == "none" else None
    assert r["not_finite"] == {"rows": 2, "image_ids": ["0000.jpg", "0009.jpg"]}
    assert r["images"] == r["gallery_images"] == 38
    assert 0.0 <= r["raw"]["map"] <= 1.0 and 1.0 <= r["raw"]["ns_score"] <= 4.0
    if want is not None:
        assert r["raw"]["map"] == pytest.approx(want["map"]) and r["raw"]["ns_score"] == pytest.approx(want["ns_score"])


def test_the_scores_say_the_whole_recipe_they_were_made_with(tmp_path):
    """ris-eval's table and JSON named only the backbone, size and pooling: a --flip, --aspect keep or
    multi-scale database, or other fusion weights, read the same as the plain one it was compared with."""
    from ris.evaluate import format_table
    from ris.featurewriter import FeatureWriter
    from ris.testing import clustered_vectors, make_feature_db

    x = clustered_vectors(40, 8, seed=3)
    attrs = {"model": "synthetic", "pooling": "gem", "input_size": 224, "scales": [1.0, 0.5], "flip": True,
             "aspect": "keep"}
    w = FeatureWriter(tmp_path / "f.h5", attrs, (8,), [f"o{i}" for i in range(10)])
    w.add([f"img{i:03d}.jpg" for i in range(40)], x, [f"o{i // 4}" for i in range(40)])
    w.finish({})
    r = evaluate_db(tmp_path / "f.h5", split="all")
    assert {k: r[k] for k in ("scales", "flip", "aspect", "fusion_weights")} == {
        "scales": [1.0, 0.5], "flip": True, "aspect": "keep", "fusion_weights": None}
    json.dumps(r)
    head = format_table(r).splitlines()[0]
    assert head.endswith("synthetic @ 224 px, scales 1,0.5, pooling gem, --flip, --aspect keep"), head
    folds = evaluate_folds(tmp_path / "f.h5", 2)
    assert folds["flip"] is True and folds["scales"] == [1.0, 0.5]
    plain = make_feature_db(tmp_path / "plain.h5", x, labels=[f"o{i // 4}" for i in range(40)])  # no recipe stored
    r = evaluate_db(plain, split="all")
    assert r["scales"] is None and format_table(r).splitlines()[0].endswith("synthetic @ none px, pooling gap")


def test_the_queries_line_counts_groups_not_objects(tmp_path):
    """A --queries list of Holidays scenes was called 'N objects'; the line says groups, as ris-eval's
    other lines do, and the JSON key stays 'objects'."""
    from ris.evaluate import format_table

    db, _, _ = _write_db(tmp_path / "f.h5", n_obj=5, views=3)
    queries = tmp_path / "q.txt"
    queries.write_text("0000.jpg\n0003.jpg\n")
    r = evaluate_db(db, split="all", queries=queries)
    assert r["objects"] == 2
    line = next(x for x in format_table(r).splitlines() if x.startswith("queries:"))
    assert " - 2 groups, 2 query images" in line and " objects" not in line


def test_one_query_is_counted_in_the_singular(tmp_path):
    """'the 1 queries of q.txt ... - 1 groups, 1 query images': one query, one group, said so."""
    from ris.evaluate import format_table

    db, _, _ = _write_db(tmp_path / "f.h5", n_obj=5, views=3)
    queries = tmp_path / "q.txt"
    queries.write_text("0000.jpg\n")
    line = next(x for x in format_table(evaluate_db(db, split="all", queries=queries)).splitlines()
                if x.startswith("queries:"))
    assert "the 1 query of " in line and " - 1 group, 1 query image," in line, line
