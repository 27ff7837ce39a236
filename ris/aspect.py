"""The network input's shape: every image squashed to a square (``squash``, the blog's and Keras'
``load_img`` way, ris's default) or its aspect ratio kept (``keep``, ``ris-extract --aspect keep``).

Why keep: squashing stretches a portrait photo one way and a landscape photo of the same scene the
other; the field's retrieval networks (cirtorch, DELG) take images at their own aspect ratio. With
``keep`` an image of aspect ratio r goes in at about ``size x size`` pixels, ``size * sqrt(r)`` wide
and ``size / sqrt(r)`` high, each side rounded to a multiple of ``STEP`` (the networks' stride), so a
collection's images fall into a few shapes (4:3 at 224: 256 x 192; 3:2: 288 x 192) and each shape
goes through the network in batches of its own (``group_rows``). Measured in bench/quality.md
(2026-12-02, fourth round).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ASPECTS = {
    "squash": "every image resized to size x size (the default; the blog's way)",
    "keep": "the aspect ratio kept at about size x size pixels, sides multiples of 32",
}
STEP = 32  # sides are multiples of the networks' stride: few distinct shapes, no ragged last row of cells
MAX_RATIO = 4.0  # panoramas beyond 4:1 go in at 4:1 (slightly squashed), so no side falls below ~size / 2


def parse_aspect(value: object) -> str:
    """A recipe's stored aspect (str or bytes) checked; ``ValueError`` for one ris does not know."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    if text not in ASPECTS:
        raise ValueError(f"unknown aspect {text!r}")
    return text


def input_shape(height: int, width: int, size: int, aspect: str = "squash") -> tuple[int, int]:
    """(height, width) of the network input for an image of this shape."""
    if aspect == "squash":
        return size, size
    if aspect != "keep":
        raise ValueError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
    ratio = min(max(width / max(height, 1), 1 / MAX_RATIO), MAX_RATIO)
    root = math.sqrt(ratio)
    side = lambda x: max(STEP, int(round(x / STEP)) * STEP)  # noqa: E731
    return side(size / root), side(size * root)


def resize_input(img: np.ndarray, size: int, aspect: str = "squash") -> np.ndarray:
    """``img`` (H, W[, C]) resized to its network input shape (area interpolation when shrinking)."""
    import cv2

    h, w = input_shape(img.shape[0], img.shape[1], size, aspect)
    if img.shape[0] == h and img.shape[1] == w:
        return img
    shrink = img.shape[0] > h or img.shape[1] > w
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def stack_images(images: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One (B, H, W, 3) array when every image has one shape (always with ``squash``), else the list
    as it is: extractors take either (``group_rows``)."""
    if len(images) and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return list(images)


def group_rows(images: np.ndarray | Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row indices, stacked images) per input shape, in order of first appearance."""
    if isinstance(images, np.ndarray):
        return [(np.arange(len(images)), images)]
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    return [(np.array(rows), np.stack([images[i] for i in rows])) for rows in groups.values()]
