"""Reading image files safely, and what their first bytes say, before any decoder sees them.

Why: a dataset folder can hold a FIFO named ``.jpg`` (opening it blocks forever, and SIGTERM
cannot end a thread stuck there), a ``.jpg`` symlink to ``/dev/urandom`` (reading never ends) or
a sparse 40 GB file (reading it ends in a MemoryError). Only regular files are opened, their size
is checked from ``os.stat`` before reading, and at most the cap (+1 byte) is ever read.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ris.errors import BadImage, RisError

_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
# O_NONBLOCK: a path swapped for a FIFO between stat() and open() still cannot block the open;
# O_NOCTTY: a terminal device is never made the controlling terminal. Both harmless on files.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def parse_bytes(text: str | int, what: str = "size") -> int:
    """'256M', '1.5G', '4096' -> bytes (binary units: K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise RisError(f"{what} must be a number of bytes, optionally with K, M or G (e.g. 512M), not {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def human_bytes(n: int) -> str:
    """40 << 30 -> '40 GiB', 5003 -> '4.9 KiB'."""
    for unit, size in _UNITS:
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


MAX_FILE_BYTES = parse_bytes(os.environ.get("RIS_MAX_FILE_BYTES") or 256 << 20, "RIS_MAX_FILE_BYTES")


def file_kind(mode: int) -> str:
    """'regular file', 'folder', 'FIFO', 'character device', ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"{path}: not a regular file ({file_kind(st.st_mode)})")


def _check_size(path: Path, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadImage(f"{path}: file too large ({human_bytes(size)}, limit {human_bytes(max_bytes)}; "
                       f"RIS_MAX_FILE_BYTES raises it)")


def _open_regular(path: Path, max_bytes: int) -> tuple[int, int]:
    """(file descriptor, size) of a regular file no bigger than ``max_bytes``; BadImage otherwise."""
    try:
        st = os.stat(path)  # follows symlinks: a link to /dev/urandom is a character device
        _check_regular(path, st)
        _check_size(path, st.st_size, max_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)  # what was opened, in case the path changed since the stat
        _check_regular(path, st)
        _check_size(path, st.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (default ``MAX_FILE_BYTES``)."""
    path = Path(path)
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    fd, size = _open_regular(path, limit)
    parts: list[bytes] = []
    total = 0
    try:
        while True:  # the stat size first; a file still growing is read on, never past the cap
            chunk = os.read(fd, min(limit + 1 - total, max(size + 1 - total, 1 << 20)))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise BadImage(f"{path}: file too large (over {human_bytes(limit)} while reading; "
                               f"RIS_MAX_FILE_BYTES raises the limit)")
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def open_head(path: str | Path, max_bytes: int | None = None):
    """A binary file object on a regular file within the cap (for reading headers only)."""
    fd, _ = _open_regular(Path(path), MAX_FILE_BYTES if max_bytes is None else max_bytes)
    return os.fdopen(fd, "rb")


# --- what the bytes are ------------------------------------------------------------------

def sniff_format(head: bytes) -> str | None:
    """The container format from the magic bytes, named as Pillow names it (None = not one these
    functions know). TIFF, WebP and BMP too: one cut short in its header is still known for what it
    is (a damaged TIFF, not 'not an image')."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"  # 'BM' and a DIB header size: a text file starting 'BMW' is no BMP
    return None


_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})


def is_heic(head: bytes) -> bool:
    """Whether the first bytes are a HEIC (HEIF) photo's, iPhones' default, which neither decoder
    here reads: said by name, so a user converts it instead of taking it for a damaged file."""
    return head[4:8] == b"ftyp" and head[8:12] in _HEIC_BRANDS


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_layout(data: bytes) -> tuple[tuple[int, int] | None, int | None]:
    """((width, height) from the frame header, offset where the first scan's data starts).

    Walks the marker segments by their lengths, so the end marker of a thumbnail inside an EXIF
    or comment segment is never mistaken for the image's own. None where the data ends first.
    """
    i, n, size = 2, len(data), None
    while i < n:
        if data[i] != 0xFF:  # stray bytes between segments: libjpeg skips to the next marker too
            i = data.find(b"\xff", i)
            if i < 0:
                break
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker == 0xD9 or i + 2 > n:  # end of image before any scan, or cut in a segment
            break
        length = int.from_bytes(data[i : i + 2], "big")
        if marker in _SOF and i + 7 <= n:
            size = (int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 3 : i + 5], "big"))
        if marker == 0xDA:
            return size, i + length
        i += max(length, 2)
    return size, None


def jpeg_problem(data: bytes) -> str | None:
    """Why this JPEG cannot be whole, or None. Bytes after the end marker are fine (cameras and
    editors append previews and trailers); a missing end marker after the image data is not."""
    _, scan = jpeg_layout(data)
    if scan is None:
        return "truncated or damaged JPEG (no image data)"
    if data.find(b"\xff\xd9", scan) < 0:  # 0xFF in entropy-coded data is always stuffed (FF00)
        return "truncated JPEG (no end-of-image marker after the image data)"
    return None


def quick_size(head: bytes, fmt: str | None) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a JPEG, PNG or GIF, without a decoder."""
    if fmt == "PNG" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if fmt == "GIF" and len(head) >= 10:
        return gif_size(head)
    if fmt == "JPEG":
        return jpeg_layout(head)[0]
    return None


def gif_size(data: bytes) -> tuple[int, int] | None:
    """A GIF's size as Pillow makes it: its screen, grown to where the first frame reaches (a 10x10
    screen may hold a 15000x15000 frame). None when ``data`` ends before that frame's descriptor
    and there is more to read; the screen alone when the file holds no frame."""
    w, h = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    i = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)
    while i < len(data):
        if data[i] == 0x2C:  # the first image descriptor: left, top, width, height
            if i + 9 > len(data):
                return None
            x0, y0, fw, fh = (int.from_bytes(data[i + k : i + k + 2], "little") for k in (1, 3, 5, 7))
            return max(w, x0 + fw), max(h, y0 + fh)
        if data[i] != 0x21 or i + 2 >= len(data):  # the trailer, or not an extension: no frame
            break
        i += 2  # extension introducer and label, then sub-blocks up to an empty one
        while i < len(data) and data[i]:
            i += data[i] + 1
        i += 1
    return None if i >= len(data) else (w, h)
