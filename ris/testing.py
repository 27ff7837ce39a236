"""Test fixtures that write files: awkward image inputs and tiny UKBench-style datasets.

Why: the image loader and the CLI must be tested against real files on disk (broken, odd formats,
odd names) and on datasets small enough to index in a second; building them in code keeps the
repository free of binary fixtures. Everything here is deterministic and needs no network.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

__all__ = ["make_bad_images", "make_odd_files", "call_with_fifo_guard", "make_exif_jpeg", "make_large_png",
           "make_tiny_dataset", "make_tiny_folders_dataset", "VALID_BAD_IMAGES", "ODD_REASONS",
           "clustered_vectors", "make_feature_db", "damage_jpeg"]

# Keys of make_bad_images() whose files are valid images (a loader should decode them).
VALID_BAD_IMAGES = frozenset(
    {"gray_png", "rgba_png", "png16", "huge", "non_ascii", "webp", "bmp", "tif", "upper_ext"}
)
# 419 MP: over twice ris.images.MAX_PIXELS, so Pillow refuses it too, whether or not ris.images has
# raised Pillow's limit to MAX_PIXELS in this process (Pillow refuses above 2 x MAX_IMAGE_PIXELS).
HUGE_SIDE = 20480


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A BGR uint8 test picture with gradients and shapes, so JPEG has real content to encode."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1),
                    127 + 127 * np.sin((xx + yy) / 7.0 + seed)], axis=2)
    img = img.astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 4, (0, 0, 255), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w - 5, h - 5), (255, 255, 0), 3)
    return img


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {ext}")
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side x side black pixels: ~50 KB on disk for 20000x20000.

    Built chunk by chunk because encoding it from an array would need the memory it is meant to
    test. Decoded to 8-bit BGR it is side*side*3 bytes (1.2 GB for 20000).
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def make_bad_images(directory: str | Path) -> dict[str, Path]:
    """Write awkward inputs an image loader must survive; return ``{short name: path}``.

    Broken (a loader must skip/report them): ``truncated`` (valid JPEG cut in half), ``corrupt``
    (JPEG header then random bytes), ``zero_byte``, ``text_as_jpg``. Valid (a loader should decode
    them; names listed in ``VALID_BAD_IMAGES``): ``gray_png``, ``rgba_png``, ``png16`` (16-bit RGB),
    ``huge`` (20480x20480 1-bit PNG, ~50 KB: refuse or downscale without decoding 1.26 GB),
    ``non_ascii`` (``café_日本.jpg``), ``webp``, ``bmp``, ``tif``, ``upper_ext`` (``IMG.JPEG``).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    img = _pattern(120, 160)
    jpg = _encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    rng = np.random.default_rng(0)
    rgba = np.dstack([img, np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1))])
    files: dict[str, tuple[str, bytes]] = {
        "truncated": ("truncated.jpg", jpg[: len(jpg) // 2]),
        "corrupt": ("corrupt.jpg", jpg[:20] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()),
        "zero_byte": ("zero_byte.jpg", b""),
        "text_as_jpg": ("text_as_jpg.jpg", b"This is a text file, not a JPEG.\n"),
        "gray_png": ("gray.png", _encode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))),
        "rgba_png": ("rgba.png", _encode(".png", rgba)),
        "png16": ("rgb16.png", _encode(".png", img.astype(np.uint16) * 257)),
        "huge": ("huge.png", _huge_png(HUGE_SIDE)),
        "non_ascii": ("café_日本.jpg", jpg),
        "webp": ("image.webp", _encode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 90])),
        "bmp": ("image.bmp", _encode(".bmp", img)),
        "tif": ("image.tif", _encode(".tif", img)),
        "upper_ext": ("IMG.JPEG", jpg),
    }
    out = {}
    for key, (name, data) in files.items():
        (d / name).write_bytes(data)
        out[key] = d / name
    return out


def damage_jpeg(path: str | Path) -> Path:
    """Put 90 bytes of junk before the JPEG's end marker: it still decodes, and libjpeg warns
    'Corrupt JPEG data: N extraneous bytes before marker 0xd9' (N as libjpeg counts them)."""
    p = Path(path)
    jpeg = p.read_bytes()
    p.write_bytes(jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:])
    return p


# Keys of make_odd_files() that are not regular files, and the reason a loader must give, unread.
ODD_REASONS = {
    "fifo": "not a regular file (FIFO)",
    "urandom": "not a regular file (character device)",
    "folder_jpg": "not a regular file (folder)",
    "sparse": "file too large",
    "truncated_padded": "truncated",
    "truncated_comment_eoi": "truncated",
    "truncated_png": "cannot decode",
    "bad_filter_png": "cannot decode",
}
SPARSE_BYTES = 40 << 30


def make_exif_jpeg(path: str | Path, width: int, height: int, orientation: int) -> Path:
    """A JPEG stored ``width`` x ``height`` with a red top-left quarter on blue and an EXIF
    orientation tag (6 = shown rotated 90 degrees clockwise: red ends top-right), written by Pillow."""
    from PIL import Image

    a = np.zeros((height, width, 3), np.uint8)
    a[:] = (0, 0, 255)
    a[: height // 4, : width // 4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = Path(path)
    Image.fromarray(a).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def make_large_png(path: str | Path, width: int, height: int) -> Path:
    """A valid 8-bit RGB PNG of any size, written row by row (never the whole image in memory);
    a gradient, so it is small on disk and decodes to width*height*3 bytes."""
    row = np.zeros((width, 3), np.uint8)
    row[:, 0] = np.arange(width) % 256
    comp = zlib.compressobj(1)
    parts = []
    for y in range(height):
        row[:, 1] = y % 256
        parts.append(comp.compress(b"\x00" + row.tobytes()))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
                     + _png_chunk(b"IEND", b""))
    return path


def call_with_fifo_guard(fn: Callable[[], Any], fifo: str | Path | None, timeout: float = 60) -> Any:
    """``fn()`` in this thread (signal handlers need the main one), watched: if it is still running
    after ``timeout`` seconds (blocked opening ``fifo``), a watchdog opens the FIFO's write end so
    that the open returns, and AssertionError is raised once ``fn`` is back."""
    fired = threading.Event()

    def unblock() -> None:
        fired.set()
        if fifo is not None:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO when nobody reads it
            except OSError:
                pass

    watchdog = threading.Timer(timeout, unblock)
    watchdog.daemon = True
    watchdog.start()
    try:
        value = fn()
    finally:
        watchdog.cancel()
    if fired.is_set():
        raise AssertionError(f"still running after {timeout} s: blocked opening a FIFO?")
    return value


def make_odd_files(directory: str | Path) -> dict[str, Path]:
    """Write the odd entries a dataset folder can hold; return ``{short name: path}``.

    Not regular files (a loader must refuse them from ``os.stat``, without opening them): ``fifo``
    (a FIFO named .jpg: reading it blocks forever), ``urandom`` (a .jpg symlink to /dev/urandom:
    endless), ``folder_jpg`` (a folder named .jpg). Too big to read: ``sparse`` (a 40 GiB sparse
    .jpg; it uses no disk on file systems with sparse files). Keys are left out where the system
    lacks the feature (no mkfifo, no /dev/urandom, no symlinks).
    Valid, must decode: ``trailing_jpg`` (a JPEG with bytes after its end marker, as cameras and
    editors write), ``gif`` (two frames, the first red). Broken, must be reported:
    ``truncated_padded`` (JPEG cut, then zeros), ``truncated_comment_eoi`` (JPEG cut mid-scan whose
    comment segment holds an end marker), ``truncated_png`` and ``bad_filter_png`` (libpng errors).
    Not read but counted: ``svg``, ``heic``, ``txt`` (other extensions), ``hidden``
    (``.hidden.jpg``) and ``hidden_folder`` (``.cache/``, with an image inside).
    ``ODD_REASONS`` holds the reason a loader gives for each broken or special one.
    """
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    img = _pattern(120, 160)
    jpg = _encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    png = _encode(".png", img)
    cut = len(jpg) * 2 // 3
    note = b"an \xff\xd9 in a comment"
    comment = b"\xff\xfe" + struct.pack(">H", 2 + len(note)) + note
    app0_end = 4 + struct.unpack(">H", jpg[4:6])[0]  # SOI, then the JFIF segment
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    bad_filter = bytearray(png)
    bad_filter[png.index(b"IDAT") + 8 : png.index(b"IDAT") + 40] = bytes(32)  # garbage in the zlib stream
    bad_filter_idat = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[bad_filter_idat : bad_filter_idat + 4])[0]
    body = bytes(bad_filter[bad_filter_idat + 4 : bad_filter_idat + 8 + length])
    bad_filter[bad_filter_idat + 8 + length : bad_filter_idat + 12 + length] = struct.pack(">I", zlib.crc32(body))
    files: dict[str, tuple[str, bytes]] = {
        "trailing_jpg": ("trailing.jpg", jpg + b"\x00" * 64 + b"camera trailer: not image data\n" * 8),
        "gif": ("anim.gif", gif.getvalue()),
        "truncated_padded": ("truncated_padded.jpg", jpg[:cut] + bytes(4096)),
        "truncated_comment_eoi": ("truncated_comment.jpg", jpg[:app0_end] + comment + jpg[app0_end:cut]),
        "truncated_png": ("truncated.png", png[: len(png) // 2]),
        "bad_filter_png": ("bad_filter.png", bytes(bad_filter)),
        "svg": ("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\n'),
        "heic": ("photo.heic", b"\x00\x00\x00\x18ftypheic" + bytes(16)),
        "txt": ("notes.txt", b"not an image\n"),
        "hidden": (".hidden.jpg", jpg),
    }
    out = {}
    for key, (name, data) in files.items():
        (d / name).write_bytes(data)
        out[key] = d / name
    (d / ".cache").mkdir(exist_ok=True)
    (d / ".cache" / "thumb.jpg").write_bytes(jpg)
    out["hidden_folder"] = d / ".cache"
    (d / "folder.jpg").mkdir(exist_ok=True)
    out["folder_jpg"] = d / "folder.jpg"
    with open(d / "sparse.jpg", "wb") as fh:
        fh.truncate(SPARSE_BYTES)
    out["sparse"] = d / "sparse.jpg"
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "fifo.jpg")
        out["fifo"] = d / "fifo.jpg"
    if os.path.exists("/dev/urandom"):
        try:
            os.symlink("/dev/urandom", d / "urandom.jpg")
            out["urandom"] = d / "urandom.jpg"
        except OSError:
            pass
    return out


def _object_image(obj: int, size: int, seed: int) -> np.ndarray:
    """A distinct synthetic BGR 'object': its own background hue, texture and coloured shapes."""
    rng = np.random.default_rng([seed, obj])
    hue = int(180 * ((obj * 0.618034) % 1.0))  # golden-ratio spacing keeps hues apart
    hsv = np.full((size, size, 3), (hue, 120, 200), np.uint8)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size)).astype(np.float32), (0, 0), 2)
    img = np.clip(img + noise[:, :, None], 0, 255).astype(np.uint8)
    for _ in range(4):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(size // 8, size - size // 8, 2))
        r = int(rng.integers(size // 10, size // 4))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x - r, y - r), (x + r, y + r), colour, -1)
    return img


def _jitter(img: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """View k of an object: view 0 unchanged, others shifted a few pixels with colour jitter."""
    if k == 0:
        return img
    dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    out = cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REFLECT_101)
    gain = rng.uniform(0.9, 1.1, 3)
    return np.clip(out * gain + rng.uniform(-10, 10), 0, 255).astype(np.uint8)


def make_tiny_dataset(
    directory: str | Path, n_objects: int = 3, views: int = 4, size: int = 96, seed: int = 0
) -> Path:
    """Write ``n_objects * views`` square JPEGs ``ukbench00000.jpg`` ... plus ``groundtruth.tsv``.

    Views of one object are consecutive (object_id = index // views), as in UKBench, so CLI tests
    can index and score a set in well under a second.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = ["file\tobject_id"]
    for obj in range(n_objects):
        base = _object_image(obj, size, seed)
        rng = np.random.default_rng([seed, obj, 1])
        for k in range(views):
            name = f"ukbench{obj * views + k:05d}.jpg"
            (d / name).write_bytes(_encode(".jpg", _jitter(base, rng, k),
                                           [cv2.IMWRITE_JPEG_QUALITY, 95]))
            lines.append(f"{name}\t{obj}")
    (d / "groundtruth.tsv").write_text("\n".join(lines) + "\n")
    return d


def make_mixed_orientation_dataset(directory: str | Path, n_objects: int = 3, views: int = 3) -> Path:
    """``make_tiny_dataset`` whose views are landscape 3:2, portrait 2:3 and square in turn (144 x 96,
    96 x 144, 96 x 96): images of several input shapes for ``--aspect keep``."""
    data = make_tiny_dataset(directory, n_objects=n_objects, views=views, size=96)
    for k, path in enumerate(sorted(data.glob("*.jpg"))):
        w, h = [(144, 96), (96, 144), (96, 96)][k % 3]
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (w, h)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return data


def make_tiny_folders_dataset(
    directory: str | Path,
    classes: tuple[str, ...] = ("a", "b"),
    per_class: int = 4,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write ``directory/<class>/<class>_NN.jpg`` (class = label from the folder name)."""
    d = Path(directory)
    for obj, cls in enumerate(classes):
        sub = d / cls
        sub.mkdir(parents=True, exist_ok=True)
        base = _object_image(obj, size, seed)
        rng = np.random.default_rng([seed, obj, 1])
        for k in range(per_class):
            (sub / f"{cls}_{k:02d}.jpg").write_bytes(_encode(".jpg", _jitter(base, rng, k),
                                                             [cv2.IMWRITE_JPEG_QUALITY, 95]))
    return d


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 50, spread: float = 0.5) -> np.ndarray:
    """L2-normalised Gaussian-mixture vectors: like pooled CNN features, friendly to ANN indexes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_feature_db(path: str | Path, vectors: np.ndarray, names: list[str] | None = None,
                    labels: list[str] | None = None, batch: int = 1000) -> Path:
    """Write ``vectors`` as a finished feature database with ``FeatureWriter`` (ids, content keys and
    all), without a CNN: for index and sync tests."""
    from ris.featurewriter import FeatureWriter

    names = names or [f"img{i:06d}.jpg" for i in range(len(vectors))]
    labels = labels or [""] * len(vectors)
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (vectors.shape[1],),
                      sorted({l for l in labels if l}))
    for s in range(0, len(vectors), batch):
        w.add(names[s : s + batch], vectors[s : s + batch], labels[s : s + batch])
    w.finish({})
    return Path(path)


def committed_rows(features_db: str | Path) -> int:
    """``rows_done`` of the ``.partial`` a running writer of ``features_db`` holds open: a peek for
    timing a kill in fault tests only (0 while there is none or it cannot be read)."""
    import h5py

    partial = Path(f"{features_db}.partial")
    if not partial.exists():
        return 0
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs.get("rows_done", 0))
    except Exception:
        return 0


def attrs_through_hdf5(directory: str | Path, attrs: dict) -> dict:
    """``attrs`` as a reader sees them after a writer stored them in a one-row database (types change
    on the way: tuples become arrays, nested values text)."""
    from ris.featuredb import FeatureDB
    from ris.featurewriter import FeatureWriter

    path = Path(directory) / "attrs-roundtrip.h5"
    w = FeatureWriter(path, attrs, (4,), ["a"])
    w.add(["x.jpg"], np.ones((1, 4), np.float32), ["a"])
    w.finish({})
    with FeatureDB(path) as db:
        return dict(db.attrs)

