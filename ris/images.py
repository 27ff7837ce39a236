"""Finding and decoding images robustly (labelling them: ``ris.labels``).

Decoding never raises anything but ``BadImage`` with the file and the reason, so a damaged
file is reported and skipped instead of ending a long extraction.
"""
from __future__ import annotations

import io
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

if not os.environ.get("RIS_VERBOSE"):  # OpenCV's own lines ('[ WARN:0@...] grfmt_tiff', '[ERROR:0@...] imdecode_')
    try:  # would come before ris' one line naming the file and the reason; RIS_VERBOSE=1 shows them
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # an OpenCV build without the logging module
        pass

from ris.errors import BadImage, RisError
from ris.jpeg_noise import watched
from ris.imagefile import MAX_FILE_BYTES, is_heic, jpeg_problem, open_head, quick_size, read_file, sniff_format
from ris.labels import LABEL_MODES, make_labels, read_label_tsv  # noqa: F401  (their home is ris.labels)

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "MAX_FILE_BYTES", "DECODE_BYTES_PER_PIXEL", "find_images",
           "scan_folder", "FolderScan", "make_labels", "read_label_tsv", "decode_image", "load_image",
           "load_image_digest", "resize_square", "decode_cost"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# One limit for ris and Pillow: images over 200 megapixels (600 MB as RGB) are refused, by ris from
# the header before decoding. Pillow warns above its MAX_IMAGE_PIXELS and refuses above twice it,
# so with it set here Pillow never refuses an image ris accepts (its default refused ~179 MP).
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Peak bytes one decode holds per decoded pixel: RGB (3) plus the decoder's working copy (Pillow
# keeps 4 bytes a pixel, OpenCV's PNG/EXIF paths a second 3). What the decode budget counts.
DECODE_BYTES_PER_PIXEL = 8
_PIL_WARNINGS = threading.Lock()  # warnings.catch_warnings is not thread-safe


@dataclass
class FolderScan:
    """What a dataset folder holds: images to read, and what is not read (so it can be reported)."""

    images: list[str] = field(default_factory=list)  # relative POSIX paths, sorted
    other: list[str] = field(default_factory=list)  # files whose extension is not an image's
    hidden: list[str] = field(default_factory=list)  # names starting with '.', SYSTEM_FOLDERS; folders end in '/'
    unlisted: dict[str, str] = field(default_factory=dict)  # folder ('x/') -> why it could not be listed


# Folders that NAS systems and Windows keep beside photos, read as hidden ones: Synology's thumbnails
# (@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg) would come back as every photo's nearest neighbours.
SYSTEM_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information"})


def _hidden_folder(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_FOLDERS


def scan_folder(root: str | Path) -> FolderScan:
    """Every entry under ``root``, recursively, sorted into images, other files and hidden ones.

    Lists directory entries only (never opens a file): a FIFO named .jpg is listed here and
    refused, with its reason, when decoding.
    """
    root = Path(root)
    if not root.exists():
        raise RisError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise RisError(f"{root}: not a folder")
    scan = FolderScan()
    real = {_dir_key(p) for p, _, _ in os.walk(root)}  # folders inside the tree, reached without links
    visited: set = set()

    def unlisted(exc: OSError) -> None:
        """A folder that cannot be listed (permissions, an I/O error) is named, not passed over: its
        images are missing from this listing, not deleted."""
        rel = os.path.relpath(exc.filename, root) if exc.filename else "."
        rel = Path(rel).as_posix()
        if rel == ".":
            raise RisError(f"{root}: cannot list this folder ({exc.strerror or exc})")
        scan.unlisted[rel + "/"] = exc.strerror or str(exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        scan.hidden.extend((rel_dir / d).as_posix() + "/" for d in dirnames if _hidden_folder(d))
        dirnames[:] = [d for d in sorted(dirnames) if not _hidden_folder(d)
                       and _enter(os.path.join(dirpath, d), real, visited, scan.other, (rel_dir / d).as_posix())]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.startswith("."):
                scan.hidden.append(rel)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                scan.images.append(rel)
            else:
                scan.other.append(rel)
    for names in (scan.images, scan.other, scan.hidden):
        names.sort()
    return scan


def in_unlisted(name: str, unlisted: dict[str, str]) -> bool:
    """Whether ``name`` lies in a folder that could not be listed (``FolderScan.unlisted``): unknown, not gone."""
    return any(name.startswith(folder) for folder in unlisted)


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _enter(path: str, real: set, visited: set, not_read: list[str], rel: str) -> bool:
    """Whether the walk enters this folder. Folder links are followed (like file links), once: a
    link to a folder of the tree (a loop, or a second name) or to one already read is listed as
    not read ('rel/'), so no image is read twice and no loop runs forever."""
    try:
        key = _dir_key(path)
    except OSError:
        not_read.append(rel + "/")
        return False
    if key in visited or (os.path.islink(path) and key in real):
        not_read.append(rel + "/")
        return False
    visited.add(key)
    return True


def find_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of all images under ``root``, recursively, sorted."""
    return scan_folder(root).images


# --- decoding ----------------------------------------------------------------------------

def _header(data: bytes, path: Path) -> tuple[str | None, int, int] | None:
    """(format, width, height) from the header alone, so huge images are refused before decoding."""
    fmt = sniff_format(data)
    size = quick_size(data, fmt)
    if size is None:
        size = _pillow_size(io.BytesIO(data), path)
    return None if size is None else (fmt, *size)


def _pillow_size(fh, path: Path) -> tuple[int, int] | None:
    """(width, height) from Pillow's header parsing (formats ``quick_size`` does not know)."""
    try:
        with _PIL_WARNINGS, warnings.catch_warnings():  # the pixel count is ris' to judge, and a damaged
            warnings.simplefilter("ignore")  # header's 'UserWarning: Corrupt EXIF data' would precede ris' line
            with Image.open(fh) as im:
                return im.size
    except Image.DecompressionBombError as exc:  # over 2 x MAX_PIXELS: Pillow gives no size
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(m.group(1)):,} pixels" if m else "pixels"
        raise BadImage(f"{path}: image too large ({pixels}, limit {MAX_PIXELS:,})") from None
    except Exception:
        return None


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise BadImage(f"{path}: image too large ({width}x{height} pixels, limit {MAX_PIXELS:,})")


def _reduced_flag(width: int, height: int, target: int) -> tuple[int, int]:
    """Largest libjpeg DCT down-scaling that still leaves >= target pixels on the short side."""
    short = min(width, height)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if short // factor >= target:
            return flag, factor
    return cv2.IMREAD_COLOR, 1


def decode_cost(path: str | Path, target: int | None = None) -> int:
    """Bytes decoding this file is expected to hold at its peak, from its header alone (cheap).

    ``DECODE_BYTES_PER_PIXEL`` per decoded pixel (at the reduced JPEG size where ``target`` allows
    it). 0 for files that will be refused without decoding (special, too big, unreadable header).
    """
    path = Path(path)
    try:
        with open_head(path) as fh:
            head = fh.read(1 << 16)
            fmt = sniff_format(head)
            size = quick_size(head, fmt)
            if size is None:
                fh.seek(0)
                size = _pillow_size(fh, path)
    except (BadImage, OSError):
        return 0
    if size is None or size[0] * size[1] > MAX_PIXELS:
        return 0
    w, h = size
    factor = _reduced_flag(w, h, target)[1] if fmt == "JPEG" and target else 1
    return (w // factor) * (h // factor) * DECODE_BYTES_PER_PIXEL


def _decode_native(path: Path, target: int | None, max_bytes: int | None,
                   data: bytes | None = None) -> tuple[np.ndarray, str]:
    """(uint8 pixels, 'BGR' | 'RGB' | 'GRAY') at full or reduced size, EXIF orientation applied;
    from ``data`` when the file's bytes were read already."""
    data = read_file(path, max_bytes) if data is None else data
    if not data:
        raise BadImage(f"{path}: empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt == "JPEG":
        problem = jpeg_problem(data)
        if problem:
            raise BadImage(f"{path}: {problem}")
    header = _header(data, path)
    if header is None:
        if fmt is None and is_heic(data):
            raise BadImage(f"{path}: a HEIC image (HEIF), which ris cannot decode; convert it to JPEG")
        if fmt is None:
            raise BadImage(f"{path}: not a readable image (unknown or damaged format)")
        if fmt != "JPEG":
            raise BadImage(f"{path}: damaged {fmt} file (its header cannot be read)")
        w = h = 0
    else:
        _, w, h = header
        _check_pixels(path, w, h)
    try:
        if fmt in ("PNG", "GIF"):
            return _pillow_decode(data, fmt, path)
        reduced = fmt == "JPEG" and target and w
        flag = _reduced_flag(w, h, target)[0] if reduced else cv2.IMREAD_COLOR
        if fmt == "JPEG":  # libjpeg's warnings, named by file during an extraction
            return watched(path, lambda: _opencv_decode(data, path, flag))
        return _opencv_decode(data, path, flag)
    except MemoryError:
        raise BadImage(f"{path}: not enough memory to decode ({w}x{h} pixels)") from None


def _opencv_decode(data: bytes, path: Path, flag: int) -> tuple[np.ndarray, str]:
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)  # applies EXIF orientation
    except cv2.error as exc:
        raise BadImage(f"{path}: cannot decode ({str(exc).strip().splitlines()[-1][:120]})") from None
    if img is None or img.size == 0:
        raise BadImage(f"{path}: {_tiff_problem(data) or 'cannot decode (damaged file or unsupported format)'}")
    if img.dtype != np.uint8:  # 16-bit: x / 257 rounded, without a float copy of the image
        img = cv2.convertScaleAbs(img, alpha=1 / 257.0 if img.dtype == np.uint16 else 1.0)
    return img, "GRAY" if img.ndim == 2 else "BGR"


_TIFF_SAMPLES = {1: "unsigned integer", 2: "signed integer", 3: "float"}


def _tiff_problem(data: bytes) -> str | None:
    """Why OpenCV decoded no pixels from a TIFF whose samples it does not take (32-bit integers,
    floats), read from its header; None for anything else. Such data (scientific, HDR) has no one
    way to be shown (0-1, 0-65535, any range): refused, named, rather than guessed."""
    if data[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return None
    try:
        with _PIL_WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                bits, kind = (im.tag_v2.get(258, 1), im.tag_v2.get(339, 1))
    except Exception:  # a header Pillow cannot read: the generic reason stands
        return None
    bits, kind = (v[0] if isinstance(v, tuple) and v else v for v in (bits, kind))
    if not isinstance(bits, int) or (bits <= 16 and kind != 3):
        return None
    return f"a {bits}-bit {_TIFF_SAMPLES.get(kind, 'sample')} TIFF, which ris cannot decode; convert it to 8-bit"


def _pillow_decode(data: bytes, fmt: str, path: Path) -> tuple[np.ndarray, str]:
    """PNG and GIF (first frame) through Pillow: libpng's errors become exceptions here, where
    through OpenCV they are printed on stderr (through the progress bar). The pixels are those
    OpenCV gives: alpha dropped, 16 bits to their high byte, PNG EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            orientation = _exif_orientation(im.info.get("exif")) if fmt == "PNG" else 1
            if im.mode in ("1", "LA", "La"):
                im = im.convert("L")
            elif im.mode not in ("L", "RGB", "I", "I;16", "I;16B", "I;16L"):
                im = im.convert("RGB")
            arr = _pillow_array(im)
    except (BadImage, MemoryError):
        raise
    except Exception as exc:
        # Pillow names the buffer it read ('cannot identify image file <_io.BytesIO object at 0x7f...>')
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", " ".join(str(exc).split()))[:120] or type(exc).__name__
        raise BadImage(f"{path}: cannot decode {fmt} ({reason})") from None
    if arr.dtype != np.uint8:
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
    return _orient(arr, orientation), "GRAY" if arr.ndim == 2 else "RGB"


def _pillow_array(im: Image.Image) -> np.ndarray:
    """The pixels as an array, copied in strips: ``np.asarray(im)`` would hold two whole-image
    copies at once (Pillow's ``tobytes`` joins its chunks), on top of Pillow's own buffer."""
    w, h = im.size
    first = np.asarray(im.crop((0, 0, w, min(h, 1))))
    out = np.empty((h, *first.shape[1:]), first.dtype)
    step = max(1, (8 << 20) // max(1, first.nbytes))
    for y in range(0, h, step):
        out[y : y + step] = np.asarray(im.crop((0, y, w, min(h, y + step))))
    return out


def _exif_orientation(raw: bytes | None) -> int:
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:
        return 1


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 2..8 applied as OpenCV's decoder does for the formats it reads."""
    if orientation in (2, 3, 4):
        return cv2.flip(img, {2: 1, 3: -1, 4: 0}[orientation])
    if orientation in (5, 6, 7, 8):
        t = cv2.transpose(img)
        return t if orientation == 5 else cv2.flip(t, {6: 1, 7: -1, 8: 0}[orientation])
    return img


def _to_rgb(img: np.ndarray, order: str) -> np.ndarray:
    if order == "BGR":
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if order == "GRAY":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return img


def _named(path: str | Path) -> Path:
    """``path`` as a Path; an empty name is refused (``Path('')`` is the current folder)."""
    if isinstance(path, str) and not path:
        raise BadImage("'': an empty file name; name an image file")
    return Path(path)


def decode_image(path: str | Path, target: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3). ``target`` allows reduced-size JPEG decoding.

    Only regular files of at most ``max_bytes`` (default ``MAX_FILE_BYTES``) are read; any failure
    is a ``BadImage`` naming the file and the reason.
    """
    return _to_rgb(*_decode_native(_named(path), target, max_bytes))


def checked_rgb(rgb) -> np.ndarray:
    """An already decoded image as ris takes it, (height, width, 3) uint8; ``BadImage`` otherwise
    (a float image in 0-1 cast to uint8 would be searched as black)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise BadImage(f"a query array must be an RGB image, (height, width, 3) uint8 values 0-255, not "
                       f"{rgb.shape} {rgb.dtype} (floats in 0-1: (x * 255).round().astype(np.uint8))")
    return rgb


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Squash to size x size, as Keras' ``load_img(target_size=...)`` does."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_image(path: str | Path, size: int, aspect: str = "squash", data: bytes | None = None) -> np.ndarray:
    """RGB uint8 network input: (size, size, 3), or with ``aspect`` 'keep' its aspect ratio kept
    (``ris.aspect``). Resized before the colour conversion: the same pixels as
    ``resize_input(decode_image(...))`` (both are per channel), without a full-size copy.
    ``data``: the file's bytes, already in memory (an upload), decoded instead; ``path`` names them."""
    from ris.aspect import resize_input

    img, order = _decode_native(_named(path), size, None, data)
    return _to_rgb(resize_input(img, size, aspect), order)


def load_image_digest(path: str | Path, size: int, aspect: str = "squash") -> tuple[np.ndarray, int]:
    """``load_image`` and the digest (``ris.filestamp``) of the very bytes decoded: an extraction
    reads each file once, and a row's digest never names other bytes than its features'."""
    from ris.aspect import resize_input
    from ris.filestamp import bytes_digest

    path = _named(path)
    data = read_file(path)
    img, order = _decode_native(path, size, None, data)
    return _to_rgb(resize_input(img, size, aspect), order), bytes_digest(data)
