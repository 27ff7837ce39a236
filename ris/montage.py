"""A results montage a person can look at: the query first, then hits captioned rank / distance."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ris.errors import BadImage
from ris.sidecars import atomic_write

TILE = 200
CAPTION = 34


def _tile(img_rgb: np.ndarray | None, lines: Sequence[str], border: tuple[int, int, int]) -> np.ndarray:
    tile = np.full((TILE + CAPTION, TILE, 3), 255, np.uint8)
    if img_rgb is not None:
        h, w = img_rgb.shape[:2]
        s = TILE / max(h, w)
        small = cv2.resize(img_rgb, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
        y, x = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
        tile[y : y + small.shape[0], x : x + small.shape[1]] = small
    else:
        cv2.putText(tile, "missing", (60, TILE // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (160, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(tile, (0, 0), (TILE - 1, TILE - 1), border, 4)
    for i, line in enumerate(lines[:2]):
        # Hershey fonts draw ASCII only, and OpenCV crashes on a str holding a non-UTF-8 file name
        line = line.encode("ascii", "backslashreplace").decode("ascii")
        cv2.putText(tile, line[:30], (4, TILE + 14 + 15 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def _read(path: str | Path) -> np.ndarray | None:
    from ris.images import decode_image

    try:
        return decode_image(path, target=TILE)
    except BadImage:
        return None


def make_montage(query_path: str | Path, hits, columns: int = 5, query_label: str = "") -> np.ndarray:
    """RGB montage; ``hits`` are ``ris.search.Hit`` objects. Same-label hits get a green frame."""
    tiles = [_tile(_read(query_path), ["query", Path(query_path).name], (30, 30, 200))]
    for h in hits:
        good = bool(query_label) and h.label == query_label
        tiles.append(_tile(_read(h.path), [f"#{h.rank}  d={h.distance:.3f}", Path(h.image_id).name],
                           (40, 170, 40) if good else (190, 190, 190)))
    rows = math.ceil(len(tiles) / columns)
    pad = 6
    canvas = np.full((rows * (TILE + CAPTION + pad) + pad, columns * (TILE + pad) + pad, 3), 245, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (TILE + CAPTION + pad), pad + c * (TILE + pad)
        canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
    return canvas


PICTURE_FORMATS = {".png": (".png", []), ".jpg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92]),
                   ".jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92]), ".webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 92])}


def picture_format_problem(path: str | Path) -> str | None:
    """Why a montage cannot be written under this name (None if it can): the name says the format."""
    if Path(path).suffix.lower() in PICTURE_FORMATS:
        return None
    return f"{path}: name a picture file ending in {', '.join(PICTURE_FORMATS)} (the name says its format)"


def _text_chunk(keyword: bytes, text: bytes) -> bytes:
    data = keyword + b"\0" + text
    return struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))


# Written right after the IHDR chunk (signature 8 + IHDR 25 bytes) of every PNG montage: how
# ris-search tells a results.png it wrote (replaced freely) from someone's own picture (kept).
_MARK = _text_chunk(b"Software", b"ris-search montage")
_MARK_AT = 33


def is_ris_montage(path: str | Path) -> bool:
    """Whether ``path`` is a PNG montage ris wrote (its mark right after IHDR); False for anything
    else, a missing or unreadable file included. Reads only the first bytes of a regular file."""
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            return fh.read(_MARK_AT + len(_MARK))[_MARK_AT:] == _MARK
    except OSError:
        return False


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Atomic write of the picture (no half-written picture under the final name), encoded as its
    name says: PNG, JPEG or WebP (a viewer or an upload goes by the name); a PNG carries ris' mark."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext, params = PICTURE_FORMATS.get(path.suffix.lower(), PICTURE_FORMATS[".png"])
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"{path}: {ext[1:].upper()} encoding failed")
    data = buf.tobytes()
    if ext == ".png":
        data = data[:_MARK_AT] + _MARK + data[_MARK_AT:]
    with atomic_write(path) as tmp:  # a failed write leaves nothing, and names the file
        tmp.write_bytes(data)
    return path
