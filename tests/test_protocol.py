"""ris.protocol: which rows are scored and which they search (held-out, whole collection, query lists)."""
import numpy as np
import pytest

from ris import protocol
from ris.errors import DatabaseError, RisError

IDS = [f"img{i:02d}.jpg" for i in range(12)]
LABELS = np.repeat(np.arange(3), 4)  # objects 0, 1, 2: four views each


def head_meta(fit, test, by="object"):
    return {"split": {"by": by, "fit_images": list(fit), "test_images": list(test)}, "config": {"seed": 0}}


def test_head_on_a_collection_it_never_saw_scores_every_labelled_image():
    meta = head_meta(["train/a.jpg", "train/b.jpg"], ["train/c.jpg"])
    p = protocol.choose(IDS, LABELS, meta, "test")
    assert p.query_rows.tolist() == list(range(12)) and p.training_in_db == 0
    assert "never saw" in p.description and "none of its 2 training images" in p.description


def test_head_on_its_own_database_scores_only_held_out_objects_against_everything():
    meta = head_meta(IDS[:6], IDS[8:])  # fitted on object 0 and half of object 1
    p = protocol.choose(IDS, LABELS, meta, "test", gallery="all")
    assert p.query_rows.tolist() == list(range(8, 12))  # object 1's other views are training objects too
    assert p.gallery_rows.tolist() == list(range(12)) and p.training_in_db == 6
    assert p.positions().tolist() == list(range(8, 12))
    fold = protocol.choose(IDS, LABELS, meta, "test", gallery="split")
    assert fold.gallery_rows.tolist() == list(range(8, 12))


def test_image_split_head_keeps_the_other_images_of_training_classes():
    meta = head_meta(IDS[:2] + IDS[4:6], IDS[2:4] + IDS[6:8], by="image")
    p = protocol.choose(IDS, LABELS, meta, "test")
    assert p.query_rows.tolist() == [2, 3, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("by,says", [("object", "of other objects, are distractors"),
                                     ("image", "of the query's own class count as relevant")])
def test_the_whole_collection_line_says_what_the_training_images_are_to_a_query(by, says):
    """It said nothing, and the README said training images stay in the gallery "as distractors",
    which is not so with an image split: they include the query's own class, relevant items."""
    meta = head_meta(IDS[:2] + IDS[4:6], IDS[2:4] + IDS[6:8], by=by)
    assert says in protocol.choose(IDS, LABELS, meta, "test").description
    assert says not in protocol.choose(IDS, LABELS, meta, "test", gallery="split").description
    never_saw = head_meta(["train/a.jpg"], ["train/c.jpg"], by=by)  # none of its training images is here
    assert "training images, " not in protocol.choose(IDS, LABELS, never_saw, "test").description
    assert "count as relevant" not in protocol.choose(IDS, LABELS, never_saw, "test").description


def test_head_fitted_on_everything_refuses_its_own_database_but_not_another():
    meta = head_meta(IDS, [])  # --test-fraction 0
    with pytest.raises(DatabaseError, match="nothing held out"):
        protocol.choose(IDS, LABELS, meta, "test")
    other = [f"new/{i}" for i in IDS]
    assert len(protocol.choose(other, LABELS, meta, "test").query_rows) == 12


def test_split_all_says_truthfully_whether_training_images_are_in_the_database():
    meta = head_meta(IDS[:4], IDS[4:])
    assert "includes 4 of the head's 4 training images" in protocol.choose(IDS, LABELS, meta, "all").description
    other = [f"new/{i}" for i in IDS]
    d = protocol.choose(other, LABELS, meta, "all").description
    assert "includes" not in d and "none of the head's 4 training images" in d


def test_old_model_without_fit_list_treats_every_non_held_out_image_as_training():
    meta = {"split": {"by": "object", "test_images": IDS[8:]}, "config": {"seed": 0}}
    p = protocol.choose(IDS, LABELS, meta, "test")
    assert p.query_rows.tolist() == list(range(8, 12)) and "does not list" in p.description
    p = protocol.choose([f"new/{i}" for i in IDS], LABELS, meta, "test")
    assert len(p.query_rows) == 12 and "never saw" in p.description


def test_query_list_searches_everything_else_with_unlabelled_rows_as_distractors(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("# Holidays-style\nimg00.jpg\n\nimg04.jpg\n")
    labels = LABELS.copy()
    labels[11] = -1
    p = protocol.choose(IDS, labels, None, queries=protocol.read_query_ids(f), queries_file=str(f))
    assert p.query_rows.tolist() == [0, 4] and p.gallery_rows.tolist() == list(range(12))
    g = protocol.gallery_labels(labels)
    assert (g >= 0).all() and (g[11] != g[:11]).all()
    assert "1 unlabelled: distractors" in p.description


def test_query_list_errors_name_the_file(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("nope.jpg\n")
    with pytest.raises(DatabaseError, match=r"q\.txt: 1 query id\(s\) are not in the database"):
        protocol.choose(IDS, LABELS, None, queries=protocol.read_query_ids(f), queries_file=str(f))
    f.write_text("img00.jpg\n")
    with pytest.raises(DatabaseError, match="one of the head's training images"):
        protocol.choose(IDS, LABELS, head_meta(IDS[:4], IDS[4:]), queries=["img00.jpg"], queries_file=str(f))
    f.write_text("\n# nothing\n")
    with pytest.raises(RisError, match="no image ids"):
        protocol.read_query_ids(f)


def test_a_query_list_that_repeats_an_id_is_refused_naming_the_lines(tmp_path, capsys):
    """A repeated id was merged silently: the list scored fewer queries than it held. Refused in one
    line naming the file, the lines and the id ('./x' and 'x' are the same id)."""
    f = tmp_path / "q.txt"
    f.write_text("img00.jpg\nimg04.jpg\n# note\n./img00.jpg\nimg04.jpg\n")
    with pytest.raises(RisError, match=r"q\.txt: line 4 repeats 'img00\.jpg' of line 1 \(2 repeated lines"):
        protocol.read_query_ids(f)
    from ris.cli import eval as eval_cli
    from ris.cli.common import run
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(12, 8), IDS, [f"o{o}" for o in LABELS])
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--queries", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ris-eval: error: ") and str(f) in err and "line 4 repeats" in err and "\n" not in err
    f.write_text("img00.jpg\nimg04.jpg\n")
    assert protocol.read_query_ids(f) == ["img00.jpg", "img04.jpg"]
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--queries", str(f), "--json"]) == 0


def test_whole_collection_scores_lower_than_fold_with_distractors():
    """The fold gallery hides distractors: a held-out query whose nearest image is a training image
    is perfect in the fold protocol and not in the whole-collection one."""
    from ris.metrics import evaluate_retrieval

    x = np.array([[1, 0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.97, 0.03], [0.05, 0.95]], np.float32)
    lab = np.array([0, 0, 1, 1, 2, 3])
    ids = [str(i) for i in range(6)]
    meta = head_meta(["4", "5"], ids[:4])
    for gallery, expect in (("split", 1.0), ("all", None)):
        p = protocol.choose(ids, lab, meta, "test", gallery=gallery)
        s = evaluate_retrieval(x[p.gallery_rows], lab[p.gallery_rows], query_rows=p.positions())
        if expect:
            assert s.map == expect
        else:
            assert s.map < 1.0


def _tiny_db(tmp_path, name, first, seed):
    """A tiny UKBench-style database whose file names start at ``first`` (a different collection)."""
    from ris.cli import extract as extract_cli
    from ris.cli.common import run
    from ris.testing import make_tiny_dataset

    d = make_tiny_dataset(tmp_path / name, n_objects=5, views=4, size=96, seed=seed)
    if first:
        for p in sorted(d.glob("ukbench*.jpg"), reverse=True):
            p.rename(d / f"ukbench{int(p.stem[7:]) + first:05d}.jpg")
        (d / "groundtruth.tsv").unlink()
    db = tmp_path / f"{name}.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(d), "--features-db", str(db), "--labels", "ukbench",
                                                 "--model", "vgg16", "--weights", "none", "--resize", "64",
                                                 "--no-progress"]) == 0
    return d, db


@pytest.mark.slow
def test_cli_head_on_a_new_collection_and_query_list(tmp_path, capsys):
    import json

    from ris.cli import eval as eval_cli
    from ris.cli import train as train_cli
    from ris.cli.common import run

    _, own = _tiny_db(tmp_path, "own", 0, 0)
    _, other = _tiny_db(tmp_path, "other", 1000, 3)
    head = tmp_path / "all.keras"
    assert run("ris-train", train_cli.main, ["--features-db", str(own), "--output", str(head), "--test-fraction", "0",
                                             "--quiet"]) == 0
    capsys.readouterr()
    assert run("ris-eval", eval_cli.main, ["--features-db", str(other), "--model", str(head), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 20 and r["training_images_in_db"] == 0 and "never saw" in r["split_description"]
    assert 1.0 <= r["head"]["ns_score"] <= 4.0
    assert run("ris-eval", eval_cli.main, ["--features-db", str(other), "--model", str(head), "--split", "all",
                                           "--json"]) == 0
    assert "includes" not in json.loads(capsys.readouterr().out)["split_description"]
    assert run("ris-eval", eval_cli.main, ["--features-db", str(own), "--model", str(head)]) == 2
    assert "nothing held out" in capsys.readouterr().err
    q = tmp_path / "q.txt"
    q.write_text("ukbench01000.jpg\nukbench01004.jpg\n")
    assert run("ris-eval", eval_cli.main, ["--features-db", str(other), "--queries", str(q), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 2 and r["gallery_images"] == 20 and r["raw"]["queries"] == 2


def test_a_held_out_split_with_nothing_held_out_is_refused_not_scored_as_zero():
    """--split test --test-fraction 0 held out no object and printed N-S 0.000 with exit 0."""
    with pytest.raises(RisError, match="holds out no object.*--split all"):
        protocol.choose(IDS, LABELS, None, "test", test_fraction=0.0)
    assert len(protocol.choose(IDS, LABELS, None, "all", test_fraction=0.0).query_rows) == 12


def test_content_sketches_match_the_same_features_through_float_noise_and_not_other_images():
    from ris.protocol import SKETCH_TOLERANCE, _same_content, content_sketch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 1280)).astype(np.float32)
    noisy = x + 1e-5 * rng.normal(size=x.shape).astype(np.float32)  # another machine's rounding
    a, b, other = content_sketch(x), content_sketch(noisy), content_sketch(rng.normal(size=(200, 1280)))
    assert all(_same_content(p, q) for p, q in zip(a, b))
    assert not any(_same_content(p, q) for p, q in zip(a, other))
    near = x + 0.3 * rng.normal(size=x.shape).astype(np.float32) * np.abs(x).mean()  # another view, cos ~0.95
    assert sum(_same_content(p, q) for p, q in zip(a, content_sketch(near))) < 20
    assert SKETCH_TOLERANCE < 8


def test_content_matches_find_exactly_what_a_bit_by_bit_comparison_finds():
    from ris.protocol import _same_content, content_matches, content_sketch

    rng = np.random.default_rng(3)
    train = rng.normal(size=(40, 64)).astype(np.float32)
    db = np.concatenate([rng.normal(size=(300, 64)), train[:10] + 0.02 * rng.normal(size=(10, 64)),
                         train[10:20] + 0.08 * rng.normal(size=(10, 64))]).astype(np.float32)
    sketches, here = content_sketch(train), content_sketch(db)
    brute = sorted((r, i) for r, h in enumerate(here) for i, sk in enumerate(sketches) if _same_content(sk, h))
    found = content_matches(sketches, lambda rows: db[rows], len(db), block=64)
    assert sorted(found) == brute and len(brute) >= 10  # the close copies at least, some of the farther ones


def test_renamed_copies_count_only_when_they_match_one_to_one():
    from ris.protocol import content_sketch

    rng = np.random.default_rng(4)
    feats = rng.normal(size=(12, 32)).astype(np.float32)
    meta = head_meta(["train/a.jpg", "train/b.jpg"], [])
    meta["split"]["fit_sketches"] = content_sketch(feats[:2])
    renamed = [f"new/{i}" for i in IDS]  # rows 0 and 1 are those two images, renamed
    fit, note = protocol.fitted_ids(meta, renamed, lambda rows: feats[rows])
    assert fit == {"new/img00.jpg", "new/img01.jpg"} and "2 of them under other names" in note
    same = np.repeat(feats[:1], 12, 0) + 1e-6 * rng.normal(size=(12, 32)).astype(np.float32)  # indistinguishable
    meta["split"]["fit_sketches"] = content_sketch(same[:2])
    assert protocol.fitted_ids(meta, renamed, lambda rows: same[rows]) == (set(), "")


def test_copies_found_by_a_head_saved_before_sketch_thresholds_say_they_may_be_look_alikes():
    """A head saved before its sketch's bits were cut at its own images' medians can take photos whose
    features hardly differ (an untrained network's) for renamed copies of its training images; the
    note said 'recognised by content' as if it were sure. It says so, and how to be sure."""
    from ris.protocol import content_sketch, sketch_thresholds

    rng = np.random.default_rng(4)
    feats = rng.normal(size=(12, 32)).astype(np.float32)
    meta = head_meta(["train/a.jpg", "train/b.jpg"], [])
    meta["split"]["fit_sketches"] = content_sketch(feats[:2])  # the old sketch: no thresholds stored
    renamed = [f"new/{i}" for i in IDS]
    fit, note = protocol.fitted_ids(meta, renamed, lambda rows: feats[rows])
    assert fit == {"new/img00.jpg", "new/img01.jpg"}
    assert note.startswith("2 of them under other names (recognised by content") and "train it again" in note
    cuts = sketch_thresholds(feats[:2])
    meta["split"].update(fit_sketches=content_sketch(feats[:2], cuts), fit_sketch_thresholds=cuts)
    assert protocol.fitted_ids(meta, renamed, lambda rows: feats[rows]) == (
        {"new/img00.jpg", "new/img01.jpg"}, "2 of them under other names (recognised by content)")


def test_query_lists_saved_by_editors_and_shells_read_as_written(tmp_path):
    """A byte-order mark (Windows editors) or ``./`` (``find . -name ...``) made the first or every id
    "not in the database"; a list that is not UTF-8 said only "UnicodeDecodeError"."""
    f = tmp_path / "q.txt"
    f.write_bytes("\ufeffimg00.jpg\r\n./img04.jpg\n".encode("utf-8"))
    assert protocol.read_query_ids(f) == ["img00.jpg", "img04.jpg"]
    f.write_bytes(b"img00.jpg\n\xffimg04.jpg\n")
    with pytest.raises(RisError, match=r"q\.txt: not UTF-8 text \(byte 10\)"):
        protocol.read_query_ids(f)


def test_a_query_list_saved_as_utf16_with_its_mark_is_read(tmp_path):
    """Windows PowerShell's `ls ... > queries.txt` and Notepad's 'Unicode' save UTF-16 with a
    byte-order mark: ris-eval --queries refused it ('not UTF-8 text (byte 0)') where ris-index
    remove --from-file reads it. Read by its mark now; one without a mark is still refused."""
    f = tmp_path / "q.txt"
    for codec in ("utf-16-le", "utf-16-be"):
        mark = "\ufeff".encode(codec)
        f.write_bytes(mark + "img00.jpg\r\n\r\n./img04.jpg\r\n".encode(codec))
        assert protocol.read_query_ids(f) == ["img00.jpg", "img04.jpg"], codec
    f.write_bytes("img00.jpg\n".encode("utf-16-le"))  # no mark: NUL bytes, in no file name
    with pytest.raises(RisError, match=r"q\.txt: holds NUL bytes"):
        protocol.read_query_ids(f)


def test_a_database_without_labels_says_which_labels_ris_extract_can_give(tmp_path):
    """'no labels to evaluate against; extract with --labels' left a Holidays user guessing which:
    the line names the rules (holidays among them) and the label file's format."""
    from types import SimpleNamespace

    db = SimpleNamespace(labels=np.full(4, -1, np.int64), image_ids=["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg"])
    with pytest.raises(DatabaseError) as exc:
        protocol.for_database(db, "hol.h5", None, "all", "all", 0, 0.2, 0.1, None)
    msg = str(exc.value)
    assert msg.startswith("hol.h5: no labels") and "--labels holidays" in msg and "FILE.tsv" in msg and "\n" not in msg


def test_a_database_whose_images_all_share_one_label_is_refused_not_scored_perfect():
    """Holidays unpacked to jpg/ and labelled by folder: one label for all, every image relevant
    to every query, and ris-eval printed N-S 4.000 and mAP 1.000."""
    from types import SimpleNamespace

    db = SimpleNamespace(labels=np.array([0, 0, 0, -1], np.int64), label_names=["jpg"],
                         image_ids=["jpg/100000.jpg", "jpg/100001.jpg", "jpg/100100.jpg", "jpg/x.jpg"])
    with pytest.raises(DatabaseError) as exc:
        protocol.for_database(db, "hol.h5", None, "all", "all", 0, 0.2, 0.1, None)
    msg = str(exc.value)
    assert msg.startswith("hol.h5: every labelled image has the same label ('jpg')") and "\n" not in msg
    assert "--labels" in msg


def test_a_query_list_scored_with_a_head_says_whether_its_training_images_are_there():
    """ris-eval --model head.keras --queries q.txt on a collection the head never saw said nothing
    about the head's training images (without --queries it says 'a collection the head never saw')."""
    never = protocol.choose(IDS, LABELS, head_meta(["train/a.jpg", "train/b.jpg"], ["train/c.jpg"]),
                            queries=["img00.jpg", "img04.jpg"], queries_file="q.txt")
    assert never.training_in_db == 0
    assert "none of the head's 2 training images is in this database" in never.description
    seen = protocol.choose(IDS, LABELS, head_meta(IDS[8:], IDS[:8]), queries=["img00.jpg"], queries_file="q.txt")
    assert "4 of the head's training images are in the gallery" in seen.description
    assert "training images" not in protocol.choose(IDS, LABELS, None, queries=["img00.jpg"], queries_file="q.txt").description


def test_one_labelled_group_among_distractors_is_scored_with_a_query_list(tmp_path):
    """One Holidays scene among Flickr distractors, ``ris-eval --queries q.txt``: the distractors are
    searched, so a distractor ranked above a true match lowers mAP; ris-eval refused it as 'every
    score would read perfect'. Scored with --queries; refused where only labelled images are searched
    (--split all), and that line points to --queries."""
    from types import SimpleNamespace

    ids = ["jpg/100000.jpg", "jpg/100001.jpg", "jpg/100002.jpg", "flickr/im1.jpg", "flickr/im2.jpg"]
    db = SimpleNamespace(labels=np.array([0, 0, 0, -1, -1], np.int64), label_names=["1000"], image_ids=ids,
                         read_rows=None)
    q = tmp_path / "q.txt"
    q.write_text("jpg/100000.jpg\n")
    plan, _, _ = protocol.for_database(db, "one.h5", None, "test", "all", 0, 0.2, 0.1, q)
    assert plan.query_rows.tolist() == [0] and plan.gallery_rows.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DatabaseError) as exc:
        protocol.for_database(db, "one.h5", None, "all", "all", 0, 0.2, 0.1, None)
    msg = str(exc.value)
    assert msg.startswith("one.h5: every labelled image has the same label ('1000')") and "\n" not in msg
    assert "2 unlabelled images" in msg and "--queries" in msg
