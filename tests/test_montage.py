"""The montage's PNG: written whole or not at all, and a failure names the file."""
import errno
import os

import numpy as np
import pytest

from ris.montage import write_png


def test_a_png_that_cannot_be_written_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    """On a full disk ris-search said only "File too large" and left "m.png.partial" behind."""
    real = type(tmp_path).write_bytes

    def full(self, data):
        real(self, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    with pytest.raises(OSError) as caught:
        write_png(tmp_path / "m.png", np.zeros((8, 8, 3), np.uint8))
    assert caught.value.filename == str(tmp_path / "m.png") and caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert write_png(tmp_path / "m.png", np.zeros((8, 8, 3), np.uint8)).read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == ["m.png"]


def test_the_picture_is_encoded_as_its_name_says():
    """--output res.jpg wrote PNG bytes under a .jpg name (viewers and uploads go by the name)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        rgb = np.zeros((8, 8, 3), np.uint8)
        assert write_png(Path(d) / "r.jpg", rgb).read_bytes()[:3] == b"\xff\xd8\xff"
        assert write_png(Path(d) / "r.JPEG", rgb).read_bytes()[:3] == b"\xff\xd8\xff"
        assert write_png(Path(d) / "r.webp", rgb).read_bytes()[8:12] == b"WEBP"
        assert write_png(Path(d) / "r.png", rgb).read_bytes()[:4] == b"\x89PNG"


def test_a_png_montage_says_ris_wrote_it(tmp_path):
    """The default results.png replaced a user's own results.png silently: ris' PNG montages carry a
    text chunk (Software: ris-search montage) so ris-search can tell its own file from another."""
    from PIL import Image

    from ris.montage import is_ris_montage

    path = write_png(tmp_path / "results.png", np.zeros((8, 8, 3), np.uint8))
    with Image.open(path) as im:
        assert im.info.get("Software") == "ris-search montage" and im.size == (8, 8)
        im.load()
    assert is_ris_montage(path)
    Image.new("RGB", (8, 8)).save(tmp_path / "own.png")
    assert not is_ris_montage(tmp_path / "own.png") and not is_ris_montage(tmp_path / "missing.png")
    (tmp_path / "short.png").write_bytes(b"\x89PNG")
    assert not is_ris_montage(tmp_path / "short.png")
