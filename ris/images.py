"""Finding, labelling and decoding images robustly.

Decoding never raises anything but ``BadImage`` with the file and the reason, so a damaged
file is reported and skipped instead of ending a long extraction.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import cv2
import numpy as np

from ris.errors import BadImage, RisError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 200_000_000  # refuse decoding bigger images: 200 MP is ~600 MB of RGB
LABEL_MODES = ("auto", "ukbench", "folders", "none")


def find_images(root: str | Path) -> list[str]:
    """Relative POSIX paths of all images under ``root``, recursively, sorted."""
    root = Path(root)
    if not root.exists():
        raise RisError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise RisError(f"{root}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


# --- labels -------------------------------------------------------------------------------

def _ukbench_number(rel_path: str) -> int:
    m = re.search(r"(\d+)(?=\.[^.]+$)", rel_path)
    if not m:
        raise RisError(f"{rel_path}: --labels ukbench needs a number in each file name (ukbench00042.jpg)")
    return int(m.group(1))


def read_label_tsv(path: str | Path) -> dict[str, str]:
    """file -> label from a TSV whose first two columns are file and label (header optional).

    A third column, when present, names the label (Corel's ``class_id  class_name``).
    """
    path = Path(path)
    if not path.is_file():
        raise RisError(f"{path}: label file not found")
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh, delimiter="\t") if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in ("file", "filename", "path", "image", "image_id"):
        rows = rows[1:]
    for lineno, row in enumerate(rows, 1):
        if len(row) < 2:
            raise RisError(f"{path}: line {lineno} has {len(row)} column(s), need file<TAB>label")
        label = row[2].strip() if len(row) >= 3 and row[2].strip() else row[1].strip()
        mapping[row[0].strip()] = label
    if not mapping:
        raise RisError(f"{path}: no labels in file")
    return mapping


def make_labels(image_ids: list[str], mode: str, dataset: str | Path | None = None) -> tuple[np.ndarray, list[str], str]:
    """Integer labels (-1 = unknown), label names, and the mode actually used."""
    if mode == "auto":
        gt = Path(dataset) / "groundtruth.tsv" if dataset else None
        if gt is not None and gt.is_file():
            mode = str(gt)
        elif image_ids and all(re.fullmatch(r"ukbench\d+\.\w+", Path(i).name, re.I) for i in image_ids):
            mode = "ukbench"
        elif image_ids and all("/" in i for i in image_ids):
            mode = "folders"
        else:
            mode = "none"
    if mode == "none":
        return np.full(len(image_ids), -1, np.int64), [], "none"
    if mode == "ukbench":
        raw = [str(_ukbench_number(i) // 4) for i in image_ids]
    elif mode == "folders":
        raw = [i.split("/")[0] if "/" in i else "" for i in image_ids]
    else:
        table = read_label_tsv(mode)
        raw = [table.get(i, table.get(Path(i).name, "")) for i in image_ids]
    names = sorted({r for r in raw if r}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {n: k for k, n in enumerate(names)}
    labels = np.array([index.get(r, -1) for r in raw], dtype=np.int64)
    return labels, names, mode


# --- decoding ----------------------------------------------------------------------------

def _header_size(data: bytes, path: Path) -> tuple[int, int] | None:
    """(width, height) from the header alone, so huge images are refused before decoding."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise BadImage(f"{path}: image too large ({str(exc).split(',')[0].strip()[:100]})") from None
    except Exception:
        return None


def _reduced_flag(width: int, height: int, target: int) -> tuple[int, int]:
    """Largest libjpeg DCT down-scaling that still leaves >= target pixels on the short side."""
    short = min(width, height)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if short // factor >= target:
            return flag, factor
    return cv2.IMREAD_COLOR, 1


def decode_image(path: str | Path, target: int | None = None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3). ``target`` allows reduced-size JPEG decoding."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise BadImage(f"{path}: empty file (0 bytes)")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise BadImage(f"{path}: truncated JPEG (no end-of-image marker)")
    size = _header_size(data, path)
    if size is None and not is_jpeg:
        raise BadImage(f"{path}: not a readable image (unknown or damaged format)")
    flag, factor = cv2.IMREAD_COLOR, 1
    if size is not None:
        w, h = size
        if is_jpeg and target:
            flag, factor = _reduced_flag(w, h, target)
        if (w // factor) * (h // factor) > MAX_PIXELS:
            raise BadImage(f"{path}: image too large ({w}x{h} pixels, limit {MAX_PIXELS:,})")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        raise BadImage(f"{path}: cannot decode ({str(exc).strip().splitlines()[-1][:120]})") from None
    if img is None or img.size == 0:
        raise BadImage(f"{path}: cannot decode (damaged file or unsupported format)")
    if img.dtype != np.uint8:  # 16-bit PNG/TIFF
        img = (img / 257.0).round().astype(np.uint8) if img.dtype == np.uint16 else cv2.convertScaleAbs(img)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Squash to size x size, as Keras' ``load_img(target_size=...)`` does."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_image(path: str | Path, size: int) -> np.ndarray:
    return resize_square(decode_image(path, target=size), size)
