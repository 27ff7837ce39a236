"""What the service reads: uploaded bytes (checked before decoding) and database rows' files.

Safety rules, each one tested in tests/test_serve.py:
* no path from a request is ever opened: files are found by database row only;
* a row's file must resolve (symlinks followed) inside the dataset root, be a regular file with
  an image extension and be under a size cap, else it is refused;
* an upload's format and pixel count come from its header (Pillow reads only the header) and
  are checked before any decoding, so a decompression bomb never reaches the decoder.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from ris.errors import RisError

# Pillow format name -> what the page says; all of them decode with OpenCV as the database did
UPLOAD_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "WEBP": "WebP", "TIFF": "TIFF"}
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
MAX_FILE_BYTES = 256 << 20  # a database image over this is not served (nor thumbnailed)


class ServeError(RisError):
    """A request that cannot be served; ``status`` is the HTTP status, the message one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def display_name(name: str | None, default: str = "the upload") -> str:
    """A client-supplied file name made safe to quote in a message: base name, printable, short."""
    name = re.sub(r"[^\w .,()+@-]", "_", PurePosixPath(str(name or "").replace("\\", "/")).name)[:80]
    return name or default


def _magic(data: bytes) -> str | None:
    """The image format a file's first bytes claim, to tell a damaged image from a non-image."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "BMP" if data[:2] == b"BM" else None


def _reduced_jpeg(width: int, height: int, target: int) -> tuple[int, int]:
    from ris.images import _reduced_flag  # the database was decoded this way: queries must match

    return _reduced_flag(width, height, target)


def decode_upload(data: bytes, target: int, max_pixels: int, name: str | None = None) -> tuple[np.ndarray, dict]:
    """Uploaded bytes -> RGB uint8 (H, W, 3) and facts about it; ``ServeError`` (400/413/415) if unfit.

    ``target``: the side the engine needs, so big JPEGs are DCT-downscaled while decoding (as
    ``ris.images.decode_image`` does for the database), which also bounds memory.
    """
    import cv2
    from PIL import Image

    who = display_name(name)
    if not data:
        raise ServeError(400, f"{who} is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError:
        raise ServeError(413, f"{who} is too large to decode (over {Image.MAX_IMAGE_PIXELS * 2:,} pixels).") from None
    except Exception:
        kind = _magic(data)
        if kind:
            raise ServeError(400, f"{who} is a damaged {kind} file (its header cannot be read).") from None
        raise ServeError(415, f"{who} is not an image (send a JPEG, PNG, BMP, WebP or TIFF file).") from None
    if fmt not in UPLOAD_FORMATS:
        raise ServeError(415, f"{who} is a {fmt} image; send a JPEG, PNG, BMP, WebP or TIFF file.")
    if width * height > max_pixels:
        raise ServeError(413, f"{who} is {width} x {height} pixels, over the limit of {max_pixels:,} pixels.")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise ServeError(400, f"{who} is a truncated JPEG (no end-of-image marker).")
    flag, factor = _reduced_jpeg(width, height, target) if is_jpeg else (cv2.IMREAD_COLOR, 1)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise ServeError(400, f"{who} cannot be decoded (damaged {UPLOAD_FORMATS[fmt]} file).")
    if img.dtype != np.uint8:
        img = (img / 257.0).round().astype(np.uint8) if img.dtype == np.uint16 else cv2.convertScaleAbs(img)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return rgb, {"format": UPLOAD_FORMATS[fmt], "width": width, "height": height, "bytes": len(data)}


def row_file(root: Path, rel: str, row: int) -> Path:
    """The file of database row ``row`` (relative path ``rel``), if it may be read; else ServeError.

    Refused (403): absolute or ``..`` paths in the database, files that resolve outside ``root``
    (a symlink out of the collection), anything but a regular file with an image extension.
    """
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or ".." in PurePosixPath(rel).parts:
        raise ServeError(403, f"row {row}: its path is not inside the collection; refused.")
    try:
        base = root.resolve(strict=True)
        path = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ServeError(404, f"row {row}: its image {rel} is not on disk.") from None
    if not path.is_relative_to(base):
        raise ServeError(403, f"row {row}: its image {rel} resolves outside the collection; refused.")
    if path.suffix.lower() not in MEDIA_TYPES:
        raise ServeError(403, f"row {row}: {rel} has no image extension; refused.")
    return path


def open_regular(path: Path, rel: str, row: int) -> tuple[int, int]:
    """(fd, size) of a regular file no bigger than MAX_FILE_BYTES, opened without following a
    final symlink (the path is already resolved: a swap after the check is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise ServeError(404, f"row {row}: its image {rel} cannot be opened.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"over {MAX_FILE_BYTES >> 20} MB"
        raise ServeError(403, f"row {row}: its image {rel} is {why}; refused.")
    return fd, st.st_size


def read_regular(path: Path, rel: str, row: int) -> bytes:
    fd, _ = open_regular(path, rel, row)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(MAX_FILE_BYTES)


def thumbnail_jpeg(data: bytes, size: int, rel: str, row: int) -> bytes:
    """A JPEG no larger than ``size`` on its long side (aspect kept) of a database image's bytes."""
    import cv2

    try:
        rgb, _ = decode_upload(data, size, max_pixels=200_000_000, name=rel)
    except ServeError as exc:
        raise ServeError(422, f"row {row}: {exc}") from None
    h, w = rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ServeError(500, f"row {row}: thumbnail could not be encoded.")
    return buf.tobytes()


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
