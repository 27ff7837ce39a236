"""The few ImageNet-1k class indices the offline-weights tests check (no network, no full list).

Why: a genuine ImageNet model must put skimage's ``chelsea`` (a tabby cat) among the cats and
``coffee`` (a cup of coffee) among espresso/cup/mug; a wrong port or random weights will not.
"""
from __future__ import annotations

import numpy as np

CLASS_NAMES: dict[int, str] = {
    281: "tabby cat",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    504: "coffee mug",
    967: "espresso",
    968: "cup",
}
CAT_CLASSES: frozenset[int] = frozenset({281, 282, 283, 284, 285})
COFFEE_CLASSES: frozenset[int] = frozenset({504, 967, 968})


def reference_photos(size: int) -> dict[str, np.ndarray]:
    """skimage's ``chelsea`` and ``coffee`` as uint8 RGB (size, size, 3).

    The whole photo is resized (no crop, aspect ratio not kept) with cv2.INTER_AREA; the stored
    reference logits (tests/fixtures/port_reference_logits.npz) were made from exactly these arrays.
    """
    import cv2
    import skimage.data

    return {name: cv2.resize(getattr(skimage.data, name)(), (size, size), interpolation=cv2.INTER_AREA)
            for name in ("chelsea", "coffee")}
