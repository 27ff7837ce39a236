"""What the service reads: uploaded bytes (checked before decoding) and database rows' files.

Safety rules, each one tested in tests/test_serve.py:
* no path from a request is ever opened: files are found by image id (the database's stable id) only;
* an image's file must resolve (symlinks followed) inside the dataset root, be a regular file with
  an image extension and be under a size cap, else it is refused; it is then opened one folder at a
  time from the root without following a link, so a folder swapped for a link after the check is
  refused, not followed;
* an upload's format and pixel count come from its header (Pillow reads only the header) and
  are checked before any decoding, so a decompression bomb never reaches the decoder.
"""
from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from ris.errors import RisError
from ris.imagefile import MAX_FILE_BYTES, file_kind, human_bytes  # the cap every image read honours

# what the page calls each format the database's decoder reads (ris.images)
UPLOAD_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "GIF": "GIF", "BMP": "BMP", "WEBP": "WebP",
                  "TIFF": "TIFF"}
ACCEPTED = "a JPEG, PNG, GIF, BMP, WebP or TIFF file"
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".bmp": "image/bmp", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class ServeError(RisError):
    """A request that cannot be served; ``status`` is the HTTP status, the message one sentence;
    ``retry_after``: seconds after which the same request may succeed (a 503's Retry-After)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def display_name(name: str | None, default: str = "the upload") -> str:
    """A client-supplied file name made safe to quote in a message: base name, printable, short."""
    name = re.sub(r"[^\w .,()+@-]", "_", PurePosixPath(str(name or "").replace("\\", "/")).name)[:80]
    return name or default


def _pillow_format(data: bytes, who: str, max_pixels: int) -> tuple[str | None, int, int] | None:
    """(Pillow's format name, width, height) from the header alone; None if Pillow cannot tell."""
    from PIL import Image

    from ris.images import _PIL_WARNINGS  # warnings.catch_warnings is not thread-safe: the uploads' threads share it

    try:
        with _PIL_WARNINGS, warnings.catch_warnings():
            # the pixel count is the service's to judge; a damaged header's own warnings ('TiffImagePlugin.py:982:
            # UserWarning: Corrupt EXIF data', two lines) would fill the server's log
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format, *im.size
    except Image.DecompressionBombError as exc:  # over Pillow's own limit: named by its size all the same
        with _PIL_WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = _bomb_size(data)
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = (f"{size[0]} x {size[1]}" if size else f"{int(m.group(1)):,}" if m
                  else f"over {Image.MAX_IMAGE_PIXELS * 2:,}")
        raise ServeError(413, f"{who} is {pixels} pixels, over the limit of {max_pixels:,} pixels.") from None
    except Exception:
        return None


def _bomb_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image Pillow refuses to open for its pixel count: ris' own header
    parser (JPEG, PNG, GIF), else the format plugin Pillow would use, without its size check."""
    from PIL import Image

    from ris.imagefile import quick_size, sniff_format

    size = quick_size(data[:1 << 16], sniff_format(data))
    if size is not None:
        return size
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            ok = not accept or accept(data[:16])
            if ok and not isinstance(ok, str):
                return factory(io.BytesIO(data), "").size
        except Exception:  # not this format, or a header it cannot parse
            continue
    return None


def decode_upload(data: bytes, target: int, max_pixels: int, name: str | None = None) -> tuple[np.ndarray, dict]:
    """Uploaded bytes -> RGB uint8 (H, W, 3) and facts about it; ``ServeError`` (400/413/415) if unfit.

    The pixels are those ``ris.images.decode_image`` gives for the same bytes in a file (the same
    decoders, EXIF orientation, 16-bit handling and reduced-size JPEG decoding down to ``target``),
    so an uploaded copy of a database image is found at distance ~0. Format and size come from the
    header before any decoding; the facts' width and height are the image's as shown (EXIF orientation
    applied). libjpeg's warnings (a JPEG with junk inside that still decodes) are
    caught and phrased as ris-extract says them: the facts' ``warnings``, present only then.
    """
    import cv2

    from ris.errors import BadImage
    from ris.images import _opencv_decode, _pillow_decode, _reduced_flag, _to_rgb  # the database's decoding
    from ris.imagefile import is_heic, jpeg_problem, sniff_format
    from ris.jpeg_noise import decoded_noting

    who = display_name(name)
    if not data:
        raise ServeError(400, f"{who} is empty (0 bytes).")
    header = _pillow_format(data, who, max_pixels)
    fmt = sniff_format(data) or (header[0] if header else None)
    if fmt not in UPLOAD_FORMATS:
        if fmt is None and is_heic(data):
            fmt = "HEIC"
        kind = f"{'an' if fmt[0] in 'AEIOU' else 'a'} {fmt} image" if fmt else "not an image"
        raise ServeError(415, f"{who} is {kind}; send {ACCEPTED}.")
    if fmt == "JPEG":
        problem = jpeg_problem(data)
        if problem:
            raise ServeError(400, f"{who} is a {problem}.")
    if header is None:
        raise ServeError(400, f"{who} is a damaged {UPLOAD_FORMATS[fmt]} file (its header cannot be read).")
    _, width, height = header
    if width * height > max_pixels:
        raise ServeError(413, f"{who} is {width} x {height} pixels, over the limit of {max_pixels:,} pixels.")
    path = Path(who)  # only named in messages
    warned: list[str] = []
    try:
        if fmt in ("PNG", "GIF"):
            img, order = _pillow_decode(data, fmt, path)
        elif fmt == "JPEG":  # libjpeg prints its warnings to the server's stderr, unnamed: caught
            flag = _reduced_flag(width, height, target)[0] if target else cv2.IMREAD_COLOR
            (img, order), warned = decoded_noting(lambda: _opencv_decode(data, path, flag))
        else:
            img, order = _opencv_decode(data, path, cv2.IMREAD_COLOR)
    except BadImage as exc:
        raise ServeError(400, f"{exc}.") from None
    except MemoryError:
        raise ServeError(413, f"{who}: not enough memory to decode {width} x {height} pixels.") from None
    rgb = _to_rgb(img, order)
    (h, w), shown = rgb.shape[:2], (width, height)
    if w != h and (w > h) != (width > height):  # EXIF orientation 5..8 turned it upright: as it is shown
        shown = (height, width)
    return rgb, {"format": UPLOAD_FORMATS[fmt], "width": shown[0], "height": shown[1], "bytes": len(data),
                 **({"warnings": warned} if warned else {})}


def row_file(root: Path, rel: str, image_id: int) -> Path:
    """The file of image ``image_id`` (relative path ``rel``), if it may be read; else ServeError.

    Refused (403): absolute or ``..`` paths in the database, files that resolve outside ``root``
    (a symlink out of the collection), anything but a regular file with an image extension. A
    backslash is refused only where it separates folders (Windows): in a POSIX name it is a
    character like any other, and ris-extract reads such files.
    """
    separator = os.sep == "\\" or os.altsep == "\\"
    if (not rel or rel.startswith("/") or "\x00" in rel or ".." in PurePosixPath(rel).parts
            or separator and "\\" in rel):
        raise ServeError(403, f"image {image_id}: its path is not inside the collection; refused.")
    try:
        base = root.resolve(strict=True)
        path = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ServeError(404, f"image {image_id}: its image {rel} is not on disk.") from None
    if not path.is_relative_to(base):
        raise ServeError(403, f"image {image_id}: its image {rel} resolves outside the collection; refused.")
    if path.suffix.lower() not in MEDIA_TYPES:
        raise ServeError(403, f"image {image_id}: {rel} has no image extension; refused.")
    return path


def _open_beneath(root: Path, path: Path, flags: int) -> int:
    """``os.open(path, flags)`` one component at a time from ``root``, following no symlink.

    Why: ``path`` was resolved and checked inside ``root`` (``row_file``); opened by its name, any
    folder on the way that was swapped for a link since (a race run request after request by
    whoever can write to the collection) would be followed out of it. From ``root``'s descriptor,
    each folder is opened with ``O_NOFOLLOW``, so such a link fails (ELOOP/ENOTDIR) instead."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if os.open not in os.supports_dir_fd or not nofollow:  # no openat (Windows): the name as checked
        return os.open(path, flags | nofollow)
    base = root.resolve(strict=True)
    parts = path.relative_to(base).parts  # ValueError: the root moved since the check
    if not parts:
        raise IsADirectoryError(str(path))
    folder = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow
    fd = os.open(base, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for name in parts[:-1]:
            inner = os.open(name, folder, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], flags | nofollow, dir_fd=fd)
    finally:
        os.close(fd)


def open_regular(root: Path, path: Path, rel: str, image_id: int) -> tuple[int, int]:
    """(fd, size) of a regular file no bigger than ``MAX_FILE_BYTES``, opened from ``root``
    without following any symlink (the path is already resolved: a swap after the check is refused)
    and without blocking (a FIFO named ``.jpg`` is refused, never waited on)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = _open_beneath(root, path, flags)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) or exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ServeError(403, f"image {image_id}: its image {rel} changed on disk as it was opened (a link "
                                  "in its path now); refused.") from None
        raise ServeError(404, f"image {image_id}: its image {rel} cannot be opened.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        why = f"a {file_kind(st.st_mode)}" if not stat.S_ISREG(st.st_mode) else f"over {human_bytes(MAX_FILE_BYTES)}"
        raise ServeError(403, f"image {image_id}: its image {rel} is {why}; refused.")
    os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
    return fd, st.st_size


def thumbnail_jpeg(data: bytes, size: int, rel: str, image_id: int) -> bytes:
    """A JPEG no larger than ``size`` on its long side (aspect kept) of a database image's bytes."""
    import cv2

    from ris.images import MAX_PIXELS  # what ris-extract decodes: its images all have thumbnails

    try:
        rgb, _ = decode_upload(data, size, max_pixels=MAX_PIXELS, name=rel)
    except ServeError as exc:  # the upload's reason, without its advice to send another file
        reason = str(exc).split("; send ")[0].rstrip(".")
        raise ServeError(422, f"image {image_id}: the stored file no longer decodes ({reason}).") from None
    h, w = rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ServeError(500, f"image {image_id}: thumbnail could not be encoded.")
    return buf.tobytes()


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
