"""Labels of a database's images: UKBench or INRIA Holidays numbering, folder names, or a file<TAB>label TSV.

Why its own module: labels are decided once per extraction from names alone (or a small text
file), apart from decoding pixels (``ris.images``).
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np

from ris.errors import BadImage, RisError
from ris.imagefile import MAX_FILE_BYTES, read_file

__all__ = ["LABEL_MODES", "holidays_note", "make_labels", "read_label_tsv"]

LABEL_MODES = ("auto", "ukbench", "holidays", "folders", "none")
NAME_RULES = ("ukbench", "holidays", "folders", "none")  # every mode but a label file (and auto)

_UKBENCH_NAME = re.compile(r"ukbench(\d+)\.\w+", re.I)
_HOLIDAYS_NAME = re.compile(r"(\d{6})\.\w+")  # 100000.jpg .. 149999.jpg: scene = number // 100


def _ukbench_number(rel_path: str) -> int:
    m = _UKBENCH_NAME.fullmatch(Path(rel_path).name)
    if not m:
        raise RisError(f"{rel_path}: --labels ukbench needs UKBench file names (ukbench00042.jpg: object = "
                       f"number // 4); use --labels folders, a FILE.tsv or none")
    return int(m.group(1))


def _holidays_number(rel_path: str) -> int | None:
    """The photo number of a six-digit name (``<scene><NN>.jpg``), None for other names."""
    m = _HOLIDAYS_NAME.fullmatch(Path(rel_path).name)
    return int(m.group(1)) if m else None


def _holidays_scenes(image_ids: list[str]) -> list[int | None]:
    """INRIA Holidays: ``<scene><NN>.jpg``, the scene's query being its ``..00`` photo. Never guessed
    by auto (digit names are common): asked for with ``--labels holidays``. A photo belongs to a
    scene only when that scene's query ``<scene>00`` is in the collection: any six-digit name was
    taken for one, and a distractor named 123456.jpg became a scene of its own. Other names (Flickr
    distractors beside Holidays, im1.jpg) have no scene: None, extracted unlabelled."""
    numbers = [_holidays_number(i) for i in image_ids]
    queries = {n // 100 for n in numbers if n is not None and n % 100 == 0}
    return [n // 100 if n is not None and n // 100 in queries else None for n in numbers]


def _holidays_labels(image_ids: list[str]) -> list[str]:
    """Each image's scene ('' for a distractor); a folder with no Holidays photo at all is refused."""
    scenes = _holidays_scenes(image_ids)
    if image_ids and all(s is None for s in scenes):
        raise RisError(f"{image_ids[0]}: --labels holidays needs INRIA Holidays file names (100301.jpg: scene = "
                       f"number // 100, six digits, the scene's query 100300.jpg among them) and none of "
                       f"the {len(image_ids)} images is one; use --labels folders, a FILE.tsv or none")
    return ["" if s is None else str(s) for s in scenes]


def holidays_note(image_ids: list[str], labels: np.ndarray) -> str:
    """The one line ris-extract prints when --labels holidays leaves images unlabelled ('' if none)."""
    off = [i for i, l in zip(image_ids, labels) if l < 0]
    if not off:
        return ""
    digits = [i for i in off if _holidays_number(i) is not None]
    others = [i for i in off if _holidays_number(i) is None]
    why = ([f"{len(others)} not named like Holidays photos, e.g. {others[0]!r}"] if others else []) + (
        [f"{len(digits)} six-digit name(s) whose scene has no ..00 query photo, e.g. {digits[0]!r}"] if digits else [])
    return (f"--labels holidays: {len(off)} of {len(image_ids)} images are not Holidays photos ({'; '.join(why)}): "
            f"extracted unlabelled, as distractors (ris-eval --queries searches them, never as a query or a match)")


def read_label_tsv(path: str | Path) -> dict[str, str]:
    """file -> label from a TSV whose first two columns are file and label (header optional).

    A third column, when present, names the label (Corel's ``class_id  class_name``). The file is
    read as the images are (a regular file, size capped first) and must be UTF-8 text.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise RisError(f"{path}: label file not found")
    try:
        data = read_file(path, MAX_FILE_BYTES)
    except BadImage as exc:  # not a regular file, too large, unreadable: the same one line
        raise RisError(str(exc)) from None
    if b"\0" in data:
        raise RisError(f"{path}: not a text file (it holds NUL bytes); a label file is file<TAB>label lines")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RisError(f"{path}: not UTF-8 text (byte {exc.start}); save the label file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    try:
        rows = [r for r in reader if r and not r[0].startswith("#")]
    except csv.Error as exc:
        raise RisError(f"{path}: line {reader.line_num}: {exc}") from None
    if rows and rows[0][0].strip().lower() in ("file", "filename", "path", "image", "image_id"):
        rows = rows[1:]
    mapping: dict[str, str] = {}
    for lineno, row in enumerate(rows, 1):
        if len(row) < 2:
            raise RisError(f"{path}: line {lineno} has {len(row)} column(s), need file<TAB>label")
        label = row[2].strip() if len(row) >= 3 and row[2].strip() else row[1].strip()
        name = row[0].strip()
        if mapping.get(name, label) != label:
            raise RisError(f"{path}: {name} has two labels ({mapping[name]!r} and {label!r}); give each file one")
        mapping[name] = label
    if not mapping:
        raise RisError(f"{path}: no labels in file")
    return mapping


def make_labels(image_ids: list[str], mode: str, dataset: str | Path | None = None) -> tuple[np.ndarray, list[str], str]:
    """Integer labels (-1 = unknown), label names, and the mode actually used."""
    if mode == "auto":
        gt = Path(dataset) / "groundtruth.tsv" if dataset else None
        if gt is not None and gt.is_file():
            mode = str(gt)
        elif image_ids and all(_UKBENCH_NAME.fullmatch(Path(i).name) for i in image_ids):
            mode = "ukbench"
        elif image_ids and all("/" in i for i in image_ids) and len({i.split("/")[0] for i in image_ids}) > 1:
            mode = "folders"  # one folder (Holidays' jpg/) is not one class: every image relevant to every query
        else:
            mode = "none"
    if mode == "none":
        return np.full(len(image_ids), -1, np.int64), [], "none"
    if mode == "ukbench":
        raw = [str(_ukbench_number(i) // 4) for i in image_ids]
    elif mode == "holidays":
        raw = _holidays_labels(image_ids)
    elif mode == "folders":
        raw = [i.split("/")[0] if "/" in i else "" for i in image_ids]
    else:
        table = read_label_tsv(mode)
        raw = [table.get(i, table.get(Path(i).name, "")) for i in image_ids]
    names = sorted({r for r in raw if r}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {n: k for k, n in enumerate(names)}
    labels = np.array([index.get(r, -1) for r in raw], dtype=np.int64)
    return labels, names, mode
