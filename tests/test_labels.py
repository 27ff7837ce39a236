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
