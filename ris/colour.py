"""Colour histograms: a hand-made descriptor that a fusion adds beside the CNN descriptors.

Why: ImageNet CNN descriptors pooled globally know shapes and textures well and colour poorly;
near-duplicate and same-object search (UKBench's CD covers, toys, books) leans on colour, and a
colour histogram ignores rotation, scale and crop position. Fused at a small weight
(``--preset fast`` = ``--model mobilenet_v2+hsv_hist --fusion-weights 1+0.35``; ``accurate`` gives
it 0.5 beside two CNNs) it was chosen on UKBench training objects and gained on the held-out
objects and their synthetic hard copies, at 0.35 on Corel's unseen classes too, without losing on
relit copies (bench/quality.md, 2026-12-02); literature agrees (colour histograms in late fusion
on UKBench and Holidays: Zheng et al., CVPR 2015).

The descriptor: the squashed square image (the fusion's input, resized to this part's size) in
OpenCV HSV (hue 0-179, saturation and value 0-255), a joint histogram over ``bins`` equal-width
cells, L1-normalised, square-rooted (Hellinger: the dot product of two descriptors is their
Bhattacharyya coefficient, and the result has unit L2 norm, as every CNN part has).

``COLOUR_DESCRIPTORS`` is the registry: a name usable wherever a backbone name is (``--model``),
with no weights, pooling, layer or scales. ``ColourExtractor`` has ``FeatureExtractor``'s interface.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ris.errors import RisError

if TYPE_CHECKING:
    from ris.extractor import ExtractConfig

POOLING_NAME = "hist"  # what a colour part's recipe records as its pooling


@dataclass(frozen=True)
class ColourDescriptor:
    name: str
    bins: tuple[int, int, int]  # hue, saturation, value cells
    input_size: int  # default square side the histogram is taken at

    @property
    def dims(self) -> int:
        return int(np.prod(self.bins))

    def describe(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) -> (B, dims) float32 Hellinger-normalised histograms."""
        import cv2

        out = np.empty((len(images), self.dims), np.float32)
        for i, rgb in enumerate(images):
            hsv = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)
            counts = cv2.calcHist([hsv], [0, 1, 2], None, list(self.bins), [0, 180, 0, 256, 0, 256]).ravel()
            out[i] = np.sqrt(counts / max(float(counts.sum()), 1.0))
        return out


COLOUR_DESCRIPTORS: dict[str, ColourDescriptor] = {
    # chosen on UKBench training objects (scripts/colour_choose.py): 1,000 floats per image
    "hsv_hist": ColourDescriptor("hsv_hist", (20, 10, 5), 224),
    # within 0.001-0.004 mAP of it there, a quarter of the bytes: for collections where size matters
    "hsv_hist_256": ColourDescriptor("hsv_hist_256", (16, 4, 4), 224),
}


def is_colour(model: str) -> bool:
    return model in COLOUR_DESCRIPTORS


def colour_config(config: "ExtractConfig") -> "ExtractConfig":
    """A colour part's recipe in its one stored form: no weights, layer or scales, pooling 'hist'.

    Refuses settings that would mean something for a CNN and nothing here (a silent no-op would
    let a user believe ``--scales`` or ``--weights`` changed the colour part)."""
    name = config.model
    if tuple(config.scales) != (1.0,):
        raise RisError(f"{name} is a colour histogram: it takes no --scales (give 1 for its part)")
    if config.pooling not in ("gap", POOLING_NAME):
        raise RisError(f"{name} is a colour histogram: it takes no --pool (give gap for its part)")
    if config.layer not in (None, "", "none"):
        raise RisError(f"{name} is a colour histogram: it has no --layer")
    if config.weights not in ("imagenet", "none"):
        raise RisError(f"{name} is a colour histogram: it has no --weights")
    if config.input_size is not None and config.input_size < 8:
        raise RisError(f"{name}: input size must be at least 8 pixels, not {config.input_size}")
    return replace(config, weights="none", layer=None, pooling=POOLING_NAME, dtype="float32",
                   fold_batchnorm=False)


class ColourExtractor:
    """A colour histogram with ``FeatureExtractor``'s interface (``embed``, ``embed_async``,
    ``attrs``, ``recipe``, ``max_size``, ``output_shape``), so fusion, ``--sync``, the Ray engine
    and ``ris-search`` describe images with it as with a CNN."""

    def __init__(self, config: "ExtractConfig"):
        self.descriptor = COLOUR_DESCRIPTORS[config.model]
        self.config = colour_config(config)
        self.layer = None
        self.batchnorm_folded = 0
        self.sizes = [int(self.config.input_size or self.descriptor.input_size)]
        self.output_shape = (self.descriptor.dims,)

    @property
    def max_size(self) -> int:
        return self.sizes[0]

    @property
    def aspect(self) -> str:
        return "squash"

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_async(images)()

    def embed_async(self, images: np.ndarray, pad_to: int | None = None) -> Callable[[], np.ndarray]:
        """Computed at once on the host (milliseconds per image); ``pad_to`` has nothing to pad."""
        from ris.images import resize_square

        size = self.sizes[0]
        if not isinstance(images, np.ndarray):  # images of several shapes (a fusion with --aspect keep)
            images = np.stack([resize_square(np.asarray(im), size) for im in images]) if len(images) else np.asarray(images)
        if images.dtype != np.uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        if len(images) and images.shape[1:3] != (size, size):
            images = np.stack([resize_square(im, size) for im in images])
        out = self.descriptor.describe(images)
        return lambda: out

    @property
    def recipe(self) -> "ExtractConfig":
        return replace(self.config, input_size=self.sizes[0])

    def attrs(self) -> dict[str, Any]:
        import cv2
        import h5py

        from ris.extractor import _ris_version

        h, s, v = self.descriptor.bins
        return {
            **self.recipe.to_attrs(),
            "weights": "none (hand-made descriptor)",
            "normalized": True,
            "preprocessing": f"decode RGB, squash-resize to SxS (INTER_AREA), OpenCV HSV histogram "
                             f"{h}x{s}x{v} bins, L1-normalised, square root (Hellinger)",
            "batchnorm_folded": 0,
            "numpy_version": np.__version__,
            "opencv_version": cv2.__version__,
            "h5py_version": h5py.__version__,
            "ris_version": _ris_version(),
            "python": platform.python_version(),
        }
