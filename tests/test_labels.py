"""Labels from UKBench names, folders or a TSV file (ris.labels)."""
import re

import pytest

from ris.errors import RisError
from ris.images import find_images
from ris.labels import make_labels, read_label_tsv
from ris.testing import make_tiny_folders_dataset


def test_labels_ukbench_folders_tsv(tmp_path):
    ids = [f"ukbench{i:05d}.jpg" for i in range(8)]
    labels, names, mode = make_labels(ids, "auto")
    assert mode == "ukbench" and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and names == ["0", "1"]
    make_tiny_folders_dataset(tmp_path / "f", classes=("cats", "dogs"), per_class=2)
    ids = find_images(tmp_path / "f")
    labels, names, mode = make_labels(ids, "auto", tmp_path / "f")
    assert mode == "folders" and names == ["cats", "dogs"] and labels.tolist() == [0, 0, 1, 1]
    tsv = tmp_path / "gt.tsv"
    tsv.write_text("file\tclass_id\tclass_name\n0.jpg\t0\tafrica\n1.jpg\t1\tbeach\n")
    assert read_label_tsv(tsv) == {"0.jpg": "africa", "1.jpg": "beach"}
    labels, names, _ = make_labels(["sub/1.jpg", "0.jpg", "2.jpg"], str(tsv))
    assert labels.tolist() == [1, 0, -1] and names == ["africa", "beach"]


def test_label_file_errors(tmp_path):
    with pytest.raises(RisError, match="not found"):
        read_label_tsv(tmp_path / "none.tsv")
    (tmp_path / "one.tsv").write_text("onlyonecolumn\n")
    with pytest.raises(RisError, match="column"):
        read_label_tsv(tmp_path / "one.tsv")


def test_a_label_file_that_is_not_text_or_too_big_is_one_error_naming_it(tmp_path, monkeypatch):
    """Bad input, not a bug: a label file in another encoding, with NUL bytes, or over the size cap
    is a RisError naming the file (a UnicodeDecodeError would now be reported as an internal error)."""
    from ris import labels

    latin = tmp_path / "latin.tsv"
    latin.write_bytes("caf\xe9.jpg\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(RisError, match=f"^{re.escape(str(latin))}: not UTF-8 text"):
        read_label_tsv(latin)
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"a.jpg\tx\x00y\n")
    with pytest.raises(RisError, match=f"^{re.escape(str(binary))}: "):
        read_label_tsv(binary)
    big = tmp_path / "big.tsv"
    big.write_text("a.jpg\tx\n" * 200)
    monkeypatch.setattr(labels, "MAX_FILE_BYTES", 1024)
    with pytest.raises(RisError, match=f"^{re.escape(str(big))}: file too large"):
        read_label_tsv(big)


def test_ukbench_labels_need_ukbench_names():
    with pytest.raises(RisError) as exc:
        make_labels(["ukbench00000.jpg", "IMG_1000.jpg", "IMG_1001.jpg"], "ukbench")
    msg = str(exc.value)
    assert "IMG_1000.jpg" in msg and "ukbench" in msg and "\n" not in msg
    labels, _, _ = make_labels(["sub/ukbench00004.JPG", "ukbench00007.jpg"], "ukbench")
    assert labels.tolist() == [0, 0]


def test_a_label_file_that_gives_one_file_two_labels_is_refused(tmp_path):
    """``a.jpg cat`` then ``a.jpg dog``: the last one won, silently."""
    f = tmp_path / "labels.tsv"
    f.write_text("a.jpg\tcat\nb.jpg\tcat\na.jpg\tcat\n")
    assert read_label_tsv(f) == {"a.jpg": "cat", "b.jpg": "cat"}  # the same label twice is fine
    f.write_text("a.jpg\tcat\nb.jpg\tcat\na.jpg\tdog\n")
    with pytest.raises(RisError, match=r"labels\.tsv: a\.jpg has two labels \('cat' and 'dog'\)"):
        read_label_tsv(f)


def test_holidays_names_label_their_scene():
    """INRIA Holidays names its photos <scene><NN>.jpg (100000.jpg, 100001.jpg, 100100.jpg): scene =
    number // 100. There was no name rule for it: auto labelled such a folder none, and ris-eval
    refused it with 'no labels'."""
    ids = ["100000.jpg", "100001.JPG", "jpg/100100.jpg", "100101.jpg", "149900.jpg", "149901.jpg"]
    labels, names, mode = make_labels(ids, "holidays")
    assert mode == "holidays" and names == ["1000", "1001", "1499"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # a file not named like a Holidays photo (a Flickr distractor) is unlabelled, as folders and a
    # FILE.tsv leave the files they do not name
    assert make_labels(["100000.jpg", "im1000.jpg"], "holidays")[0].tolist() == [0, -1]
    with pytest.raises(RisError) as exc:  # none at all: not a Holidays folder
        make_labels(["IMG_1000.jpg", "im1.jpg"], "holidays")
    msg = str(exc.value)
    assert "IMG_1000.jpg" in msg and "number // 100" in msg and "\n" not in msg
    # never guessed: digit names are common (Corel's 0.jpg .. 999.jpg)
    assert make_labels(["100000.jpg", "100001.jpg"], "auto")[2] == "none"


def test_a_six_digit_distractor_without_its_scenes_query_is_not_a_scene():
    """Any six-digit name was taken for a Holidays photo: a distractor named 123456.jpg became scene
    1234 of its own, and with the *00 listing a photo 1234NN of no query was a group in --split all.
    A Holidays scene has its query photo <scene>00 in the collection; a six-digit name without it is
    a distractor, unlabelled and counted in the one line."""
    from ris.labels import holidays_note

    ids = ["jpg/100000.jpg", "jpg/100001.jpg", "jpg/100100.jpg", "jpg/100101.jpg",
           "flickr/123456.jpg", "flickr/123457.jpg", "im1.jpg", "654301.jpg", "flickr/100102.jpg"]
    labels, names, _ = make_labels(ids, "holidays")
    assert names == ["1000", "1001"]
    assert labels.tolist() == [0, 0, 1, 1, -1, -1, -1, -1, 1]  # 100102: scene 1001, whose query is there
    note = holidays_note(ids, labels)
    assert "4 of 9 images" in note and "3 six-digit" in note and "flickr/123456.jpg" in note and "\n" not in note
    with pytest.raises(RisError) as exc:  # six digits, but no scene has its query: not a Holidays folder
        make_labels(["123456.jpg", "123457.jpg"], "holidays")
    assert "123456.jpg" in str(exc.value) and "00" in str(exc.value)


def test_auto_labels_do_not_take_a_single_folder_for_a_class():
    """Holidays unpacks to jpg/100000.jpg ...: with every image under one folder, auto labelled them
    all 'jpg', one class, and ris-eval scored every image relevant to every query (mAP 1.0)."""
    ids = ["jpg/100000.jpg", "jpg/100001.jpg", "jpg/100100.jpg"]
    labels, names, mode = make_labels(ids, "auto")
    assert mode == "none" and names == [] and labels.tolist() == [-1, -1, -1]
    assert make_labels(ids, "holidays")[0].tolist() == [0, 0, 1]
    assert make_labels(["a/1.jpg", "b/2.jpg"], "auto")[2] == "folders"
    assert make_labels(ids, "folders")[2] == "folders"  # asked for: as asked


def test_a_holidays_folder_is_labelled_extracted_and_scored_as_the_readme_says(tmp_path, capsys):
    """The README's Holidays commands end to end on Holidays-named files: --labels holidays at
    extraction, the *00 photos as --queries, --sync keeping the rule."""
    from ris.cli import eval as eval_cli
    from ris.cli import extract as extract_cli
    from ris.cli.common import run
    from ris.featuredb import FeatureDB
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "jpg", n_objects=3, views=3, size=64)
    (data / "groundtruth.tsv").unlink()
    for k, f in enumerate(sorted(data.glob("*.jpg"))):  # scene 1000 + object, photo number within it
        f.rename(data / f"{(1000 + k // 3) * 100 + k % 3}.jpg")
    db = tmp_path / "holidays.h5"
    recipe = ["--model", "vgg16", "--weights", "none", "--resize", "32", "--no-progress"]
    assert run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(db), *recipe,
                                                 "--labels", "holidays"]) == 0
    with FeatureDB(db) as fdb:
        assert fdb.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{f.name}\n" for f in sorted(data.glob("*00.jpg"))))
    capsys.readouterr()
    assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--queries", str(queries), "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 3 and r["objects"] == 3 and r["gallery_images"] == 9
    (data / "100201.jpg").rename(data / "100203.jpg")  # a changed collection: --sync labels by the same rule
    assert run("ris-extract", extract_cli.main, ["--sync", "--features-db", str(db), "--no-progress"]) == 0
    with FeatureDB(db) as fdb:
        assert dict(zip(fdb.image_ids, fdb.labels.tolist()))["100203.jpg"] == 2


def test_holidays_with_flickr_distractors_extracts_them_unlabelled_and_scores_them_as_negatives(tmp_path, capsys):
    """Holidays + MIRFLICKR-style distractors (im1.jpg ...), the standard protocol, was refused whole by
    --labels holidays. The distractors are extracted unlabelled, with one line counting them; under
    --queries they are gallery only: never a query, never a positive, and one that ranks above a true
    match lowers mAP."""
    import json
    import shutil

    from ris.cli import eval as eval_cli
    from ris.cli import extract as extract_cli
    from ris.cli.common import run
    from ris.featuredb import FeatureDB
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "jpg", n_objects=3, views=3, size=64)
    (data / "groundtruth.tsv").unlink()
    for k, f in enumerate(sorted(data.glob("*.jpg"))):
        f.rename(data / f"{(1000 + k // 3) * 100 + k % 3}.jpg")
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{f.name}\n" for f in sorted(data.glob("*00.jpg"))))
    recipe = ["--model", "vgg16", "--weights", "none", "--resize", "32", "--no-progress"]

    def extract_and_score(db):
        assert run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(db), *recipe,
                                                     "--labels", "holidays"]) == 0
        err = capsys.readouterr().err
        assert run("ris-eval", eval_cli.main, ["--features-db", str(db), "--queries", str(queries), "--json"]) == 0
        return err, json.loads(capsys.readouterr().out)

    _, clean = extract_and_score(tmp_path / "clean.h5")
    shutil.copy(data / "100000.jpg", data / "im100.jpg")  # a copy of query 100000: ranks above its true matches
    (data / "im2.jpg").write_bytes((data / "100101.jpg").read_bytes())
    err, mixed = extract_and_score(tmp_path / "mixed.h5")
    line = [x for x in err.splitlines() if "not named like" in x]
    assert len(line) == 1 and "2 of 11 images" in line[0] and "unlabelled" in line[0], err
    with FeatureDB(tmp_path / "mixed.h5") as fdb:
        got = dict(zip(fdb.image_ids, fdb.labels.tolist()))
    assert got["im100.jpg"] == got["im2.jpg"] == -1 and sorted(v for v in got.values() if v >= 0) == [0] * 3 + [1] * 3 + [2] * 3
    assert (mixed["images"], mixed["gallery_images"]) == (3, 11) and "2 unlabelled: distractors" in mixed["split_description"]
    # never a positive: a positive would raise the query's AP; ranked first, it lowers it
    assert mixed["raw"]["map"] < clean["raw"]["map"]
    queries.write_text("im100.jpg\n")  # never a query: it has nothing to be scored against
    assert run("ris-eval", eval_cli.main, ["--features-db", str(tmp_path / "mixed.h5"), "--queries", str(queries)]) == 2
    assert "im100.jpg" in capsys.readouterr().err
