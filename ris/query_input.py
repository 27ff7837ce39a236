"""What ``SearchEngine.query``/``search`` take as the query image, decided in one place.

A file name (``str``, ``Path``, ``bytes`` as ``os.listdir(b'.')`` gives it), the encoded file
itself (bytes of a JPEG, a binary file object: what a service holds of an upload), a PIL Image or
a decoded RGB uint8 array. Why: bytes were taken for a file name only ('embedded null byte' for a
JPEG's bytes) and any other object met ``os.fspath``'s TypeError, naming none of these.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from ris import imagefile
from ris.errors import BadImage
from ris.imagefile import human_bytes, sniff_format

QueryImage = Union[str, bytes, Path, BinaryIO, Image.Image, np.ndarray]  # what SearchEngine.query takes

IN_MEMORY = "the query image's bytes"  # what messages and warnings call an image given as its bytes

KINDS = ("a file name (str, Path or bytes), the image file's bytes, a binary file object, "
         "a PIL Image or an RGB uint8 array (height, width, 3)")


def encoded(image: Any) -> bytes | None:
    """The encoded image ``image`` holds (bytes that cannot be a file name: a NUL byte, or an image
    format's magic; a binary file object's remaining contents, up to the file cap), else None (a file name, an array)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data if b"\0" in data or sniff_format(data) else None
    read = getattr(image, "read", None)
    if callable(read) and not isinstance(image, (str, os.PathLike, np.ndarray)):
        limit = imagefile.MAX_FILE_BYTES  # as a file on disk: a stream is not read on past it
        data = read(limit + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise BadImage(f"{IN_MEMORY}: a file object given as the query must be opened in binary mode "
                           f"('rb'), not text mode")
        if len(data) > limit:
            raise BadImage(f"{IN_MEMORY}: file too large (over {human_bytes(limit)}; RIS_MAX_FILE_BYTES raises "
                           "the limit)")
        return bytes(data)
    return None


def pil_pixels(image: Any) -> np.ndarray | None:
    """A PIL Image as the RGB uint8 array ris would decode from its file: EXIF orientation applied,
    alpha dropped, grey and palette images as RGB; None for anything else. Images of 16-bit or
    float samples are refused (no one way to show them as 0-255), as ``checked_rgb`` refuses arrays."""
    if not isinstance(image, Image.Image):
        return None
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise BadImage(f"a query PIL Image must hold 8-bit samples (mode RGB, RGBA, L, P, ...), not mode "
                       f"{image.mode!r}; scale it to 0-255 and convert it to 'RGB'")
    try:  # an Image whose file was closed before its pixels were read: PIL's bare AssertionError
        image = ImageOps.exif_transpose(image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise BadImage(f"the query PIL Image cannot be read ({reason}); was its file closed before its pixels "
                       f"were loaded? call its load() inside the with block") from None


def file_name(image: Any) -> Any:
    """``image`` as a file name, or a ``BadImage`` naming what a query may be."""
    if isinstance(image, (str, bytes, os.PathLike)):
        return os.fsdecode(image) if isinstance(image, bytes) else image  # bytes: as the file system names it
    raise BadImage(f"a query image must be {KINDS}, not {type(image).__name__}")
