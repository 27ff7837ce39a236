"""What a query image may be (ris.query_input): a file object is read only up to the file cap."""
from __future__ import annotations

import io

import pytest

from ris import imagefile
from ris.errors import BadImage
from ris.query_input import encoded


class _Endless(io.RawIOBase):
    """A stream that never ends (a socket, a pipe): read() with no size would never return."""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        buf[:] = b"\xff" * len(buf)
        return len(buf)


def test_a_file_object_is_read_only_up_to_the_file_cap(monkeypatch):
    """engine.query(file_object) read the whole stream, whatever its size (an endless one: forever),
    where files on disk are refused past RIS_MAX_FILE_BYTES before they are read whole."""
    monkeypatch.setattr(imagefile, "MAX_FILE_BYTES", 1000)
    with pytest.raises(BadImage, match=r"the query image's bytes: file too large \(over 1000 bytes"):
        encoded(io.BufferedReader(_Endless()))
    assert encoded(io.BytesIO(b"\xff" * 1000)) == b"\xff" * 1000  # at the cap: read whole
