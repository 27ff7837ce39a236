"""Model building: a CNN trunk + pooling at one or more scales -> descriptors, from a recipe.

``ExtractConfig`` is the recipe (backbone, weights, layer, sizes, scales, pooling, precision); it
is written into every feature database (``to_attrs``) and read back (``from_attrs``), so the same
``FeatureExtractor``, rebuilt from a database's attributes, embeds query images in ``ris-search``:
queries and database are always made the same way. The uint8 pixels go to the model as they are:
the backbone's input scaling runs inside the compiled forward pass (on the accelerator, a quarter
of the bytes of float32 to transfer). On JAX the forward pass is dispatched asynchronously
(``embed_async``), so host work overlaps device work.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ris.errors import DatabaseError, RisError

if TYPE_CHECKING:
    from ris.colour import ColourExtractor
    from ris.forward import BuiltForward
    from ris.fusion import FusedExtractor, FusionConfig


@dataclass
class ExtractConfig:
    """What to extract (the recipe every query is described by again); ``ris.build_database``'s arguments."""

    model: str = "vgg16"
    weights: str = "imagenet"  # 'imagenet' | 'none' | path
    layer: str | None = None  # trunk layer; default: the last conv block
    input_size: int | None = None  # None = the backbone's native size
    scales: tuple[float, ...] = (1.0,)
    pooling: str = "gap"
    dtype: str = "float32"  # 'bfloat16' = mixed precision on accelerators
    fold_batchnorm: bool = True  # merge inference BatchNorm into the conv before it (same features, faster)
    flip: bool = False  # also describe the image mirrored left-right and add the two (ris-extract --flip)
    aspect: str = "squash"  # the input's shape: 'squash' to a square or 'keep' its aspect ratio (ris.aspect)

    def resolved_size(self) -> int:
        from ris.backbones import get_backbone
        from ris.colour import COLOUR_DESCRIPTORS

        if self.model in COLOUR_DESCRIPTORS:
            return int(self.input_size or COLOUR_DESCRIPTORS[self.model].input_size)
        return int(self.input_size or get_backbone(self.model).input_size)

    def scale_sizes(self) -> list[int]:
        return _scale_sizes(self.resolved_size(), self.scales)

    def resolved(self) -> "ExtractConfig":
        """This config with the input size filled in (the backbone's native size when None)."""
        return replace(self, input_size=self.resolved_size())

    def to_attrs(self) -> dict[str, Any]:
        """The recipe as database attributes; ``from_attrs`` rebuilds this config from them.

        ``input_size`` is the base size that every scale multiplies (not the first scale's size),
        so a query made from a database's attributes has the database's sizes.
        """
        return {
            "model": self.model,
            "weights_arg": self.weights,
            "layer": self.layer,
            "input_size": self.resolved_size(),
            "scales": [float(s) for s in self.scales],
            "scale_sizes": self.scale_sizes(),
            "pooling": self.pooling,
            "dtype": self.dtype,
            "fold_batchnorm": bool(self.fold_batchnorm),
            "recipe_version": RECIPE_VERSION,
            **({"flip": True} if self.flip else {}),  # absent when off: older databases' recipes still match
            **({"aspect": self.aspect} if self.aspect != "squash" else {}),  # the same
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], source: str = "the database") -> "ExtractConfig | FusionConfig":
        """The config a database's attributes record (also those written before ``recipe_version`` 2);
        a fused database's (a ``fusion`` attribute) is a ``ris.fusion.FusionConfig``.

        Attributes that cannot be read as a recipe (a damaged or hand-made file) are a
        ``DatabaseError`` naming ``source``, not a conversion error from deep inside.
        """
        from ris.aspect import parse_aspect

        if attrs.get("fusion") is not None:
            from ris.fusion import FusionConfig

            return FusionConfig.from_attrs(attrs, source)
        try:
            scales = tuple(float(s) for s in (attrs.get("scales") or [1.0]))
            layer = attrs.get("layer")
            return cls(model=str(attrs["model"]), weights=str(attrs.get("weights_arg", "imagenet")),
                       layer=None if layer in (None, "", "none") else str(layer),
                       input_size=_base_size(attrs, scales, source), scales=scales, pooling=str(attrs["pooling"]),
                       dtype=str(attrs.get("dtype", "float32")),
                       fold_batchnorm=bool(attrs.get("fold_batchnorm", True)), flip=bool(attrs.get("flip", False)),
                       aspect=parse_aspect(attrs.get("aspect", "squash")))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            what = f"missing attribute {exc}" if isinstance(exc, KeyError) else str(exc)
            raise DatabaseError(f"{source}: its attributes do not say how its features were made ({what})") from None


# 2: ``input_size`` holds the base size. 1 (unmarked): it held the first scale's size, which made
# queries of a multi-scale database whose first scale is not 1 at the wrong sizes.
RECIPE_VERSION = 2


PAD_BUCKETS = 4  # a shape's rows in a mixed batch pad to pad_to, pad_to/2, /4 or /8 rows


def padded_rows(n: int, pad_to: int) -> int:
    """The rows a group of ``n`` images of one shape is padded to, inside a batch of several shapes
    (JAX compiles one program per batch shape): the smallest of ``ceil(pad_to / 2**k)``, k < 4, that
    holds them. Padding every group to ``pad_to`` cost up to one extra full batch per shape; this
    bounds the waste to half of each group (or pad_to/8 rows) for at most 4 programs per shape."""
    fits = [b for b in (-(-pad_to // 2**k) for k in range(PAD_BUCKETS)) if b >= n]
    return min(fits) if fits else n


def _scale_sizes(base: int, scales: Sequence[float]) -> list[int]:
    return [max(32, int(round(base * s))) for s in scales]


def _base_size(attrs: dict[str, Any], scales: tuple[float, ...], source: str = "the database") -> int:
    """The base input size of a database, recovered from ``scale_sizes`` for version-1 databases."""
    size = int(attrs["input_size"])
    stored = [int(s) for s in (attrs.get("scale_sizes") or [])]
    if int(attrs.get("recipe_version", 1)) >= 2 or len(stored) != len(scales) or _scale_sizes(size, scales) == stored:
        return size
    # version 1 stored scale_sizes[0]: the base is the size at scale 1, or the ratio of size to scale
    guesses = [stored[i] for i, s in enumerate(scales) if s == 1.0]
    guesses += [int(round(n / s)) for n, s in zip(stored, scales) if n > 32]
    for guess in guesses:
        for base in (guess, guess - 1, guess + 1, guess - 2, guess + 2):
            if _scale_sizes(base, scales) == stored:
                return base
    raise DatabaseError(f"{source}: cannot tell the input size from its attributes (input_size {size}, "
                   f"scales {list(scales)}, scale_sizes {stored})")


class FeatureExtractor:
    """Backbone + pooling at one or more scales; returns (B, D) descriptors or (B, h, w, C) maps.

    ``trunk`` and the forward passes are shared by the extractors of one recipe in the process
    (``ris.forward.shared_forward``): read them, never change their weights."""

    def __init__(self, config: ExtractConfig):
        import keras

        from ris.backbones import get_backbone
        from ris.forward import shared_forward
        from ris.pooling import NO_POOLING, POOLING

        if config.pooling not in POOLING and config.pooling != NO_POOLING:
            raise RisError(f"unknown pooling {config.pooling!r}; choose one of {', '.join([*POOLING, NO_POOLING])}")
        if config.pooling == "none" and len(config.scales) > 1:
            raise RisError("--pool none stores conv maps and cannot combine several --scales")
        if config.pooling == "none" and config.flip:
            raise RisError("--pool none stores conv maps and cannot add a mirrored image's (--flip)")
        from ris.aspect import ASPECTS

        if config.aspect not in ASPECTS:
            raise RisError(f"unknown aspect {config.aspect!r}; choose one of {', '.join(ASPECTS)}")
        if config.pooling == "none" and config.aspect != "squash":
            raise RisError("--pool none stores conv maps of one shape; it cannot keep each image's aspect ratio")
        if config.dtype not in ("float32", "bfloat16"):
            raise RisError(f"unknown dtype {config.dtype!r}; choose float32 or bfloat16")
        if not config.scales or not all(np.isfinite(s) and s > 0 for s in config.scales):
            raise RisError(f"scales must be one or more numbers > 0, not {list(config.scales)}")
        if config.input_size is not None and config.input_size < 1:
            raise RisError(f"input size must be at least 1 pixel, not {config.input_size}")
        self.config = config
        self.backbone = get_backbone(config.model)
        # one network and forward pass per recipe in the process (ris.forward.shared_forward): an
        # engine opened again does not build, trace or compile again
        built = shared_forward(config, lambda: _build_forward(config, self.backbone))
        self._built = built  # holds it while this extractor lives
        self.trunk, self.layer, self.batchnorm_folded = built.trunk, built.layer, built.batchnorm_folded
        self._affine, self._forward = built.affine, list(built.calls)
        self.sizes = config.scale_sizes()
        self.output_shape = built.output_shape
        self._pad_batches = keras.backend.backend() == "jax"  # jit compiles once per batch shape

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def aspect(self) -> str:
        """The shape images are decoded to for this extractor (``ris.aspect``), at ``max_size``."""
        return self.config.aspect

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) at ``max_size`` (or a list of images of several shapes with
        ``--aspect keep``) -> float32 descriptors, L2-normalised per scale (and per mirrored view with
        ``flip``) and summed."""
        return self.embed_async(images)()

    def embed_async(self, images: "np.ndarray | list[np.ndarray]",
                    pad_to: int | None = None) -> Callable[[], np.ndarray]:
        """Start ``embed``; the returned function waits for the result and returns it.

        On JAX the forward pass runs asynchronously, so the caller can prepare (and dispatch) the
        next batch before collecting this one. ``pad_to``: pad a short batch with zero images to
        this many rows (JAX compiles once per batch shape; the padding rows are dropped). A list of
        images of several shapes (``--aspect keep``) goes through the network one shape at a time,
        each shape's rows padded only to their bucket (``padded_rows``).
        """
        from ris.aspect import group_rows

        groups = group_rows(images)
        if pad_to and len(groups) > 1:  # a batch of several shapes: each group to its own bucket
            started = [(rows, self._dispatch(batch, padded_rows(len(batch), pad_to))) for rows, batch in groups]
        else:
            started = [(rows, self._dispatch(batch, pad_to)) for rows, batch in groups]

        def result() -> np.ndarray:
            if not started:
                return np.zeros((0, *self.output_shape), np.float32)
            if len(started) == 1:
                return self._collect(*started[0][1])
            out = None
            for rows, handles in started:
                part = self._collect(*handles)
                out = np.zeros((sum(len(r) for r, _ in started), *part.shape[1:]), part.dtype) if out is None else out
                out[rows] = part
            return out

        return result

    def _dispatch(self, images: np.ndarray, pad_to: int | None) -> tuple[list, int]:
        """Start the forward passes of one batch of one shape: (handles, rows)."""
        from ris.aspect import input_shape, resize_input

        images = np.asarray(images)
        n = len(images)
        if self._affine is not None and images.dtype != np.uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        if pad_to and self._pad_batches and 0 < n < pad_to:
            images = np.concatenate([images, np.zeros((pad_to - n, *images.shape[1:]), images.dtype)])
        aspect = self.config.aspect
        pending = []
        for size, fwd in zip(self.sizes, self._forward):
            target = input_shape(images.shape[1], images.shape[2], size, aspect)
            batch = images if images.shape[1:3] == target else np.stack([resize_input(im, size, aspect) for im in images])
            # --flip: the mirrored image is one more view, added like another scale
            for view in (batch, np.ascontiguousarray(batch[:, :, ::-1])) if self.config.flip else (batch,):
                pending.append(fwd(view if self._affine is not None else self.backbone.preprocess(view)))
            if self.config.pooling == "none":
                break
        return pending, n

    def _collect(self, pending: list, n: int) -> np.ndarray:
        """Wait for one batch's forward passes: each scale's (and view's) descriptor L2-normalised,
        summed, L2-normalised; conv maps as they are with ``--pool none``."""
        from ris.topk import l2_normalize

        total = None
        for handle in pending:
            out = np.asarray(handle, dtype=np.float32)[:n]
            if self.config.pooling == "none":
                return out
            out = l2_normalize(out)
            total = out if total is None else total + out
        return l2_normalize(total)

    def attrs(self) -> dict[str, Any]:
        import cv2
        import h5py
        import keras

        cfg = self.config
        return {
            **self.recipe.to_attrs(),
            "weights": self.backbone.weights_source(cfg.weights),
            "normalized": cfg.pooling != "none",
            "preprocessing": f"decode RGB, squash-resize to SxS (INTER_AREA), {self.backbone.preprocessing}",
            "batchnorm_folded": int(self.batchnorm_folded),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy_version": np.__version__,
            "opencv_version": cv2.__version__,
            "h5py_version": h5py.__version__,
            "ris_version": _ris_version(),
            "python": platform.python_version(),
        }

    @property
    def recipe(self) -> ExtractConfig:
        """The config with everything resolved (size, layer): what the database records."""
        return replace(self.config.resolved(), layer=self.layer)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], source: str = "the database"
                   ) -> "FeatureExtractor | FusedExtractor | ColourExtractor":
        """The extractor a database's attributes record (a ``FusedExtractor`` for a fused one)."""
        return build_extractor(ExtractConfig.from_attrs(attrs, source))


def _build_forward(config: ExtractConfig, backbone) -> "BuiltForward":
    """Build ``config``'s trunk (BatchNorm folded) and compile its forward pass at every scale."""
    import keras

    from ris.forward import BuiltForward, affine_preprocess, compile_forward
    from ris.layers import GlobalPool

    # The precision policy applies to the layers made here only; the global policy is restored
    # so that a float32 extractor made after a bfloat16 one in the same process is float32.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if config.dtype == "bfloat16" else "float32")
    try:
        trunk = backbone.build(config.weights, config.layer)
        layer = config.layer or trunk.layers[-1].name
        folded = 0
        if config.fold_batchnorm:
            from ris.backbones.fold import fold_batchnorm

            trunk, folded = fold_batchnorm(trunk)
        sizes = config.scale_sizes()
        # input scaling inside the model when it is a per-channel affine map (all backbones here)
        affine = affine_preprocess(backbone.preprocess)
        forward: list[Callable[[np.ndarray], Any]] = []
        for size in sizes:
            shape = (size, size, 3) if config.aspect == "squash" else (None, None, 3)
            if affine is not None:
                perm, scale, offset = affine
                inp = keras.Input(shape, dtype="uint8")
                x = keras.ops.cast(inp, "float32")
                if perm != [0, 1, 2]:
                    x = keras.ops.take(x, perm, axis=-1)
                x = x * scale + offset
            else:
                inp = x = keras.Input(shape)
            out = trunk(x)
            if config.pooling != "none":
                out = GlobalPool(config.pooling)(keras.ops.cast(out, "float32"))
            if not forward:
                static_shape = tuple(out.shape[1:])  # known without running the model
            forward.append(compile_forward(keras.Model(inp, out)))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if keras.backend.backend() != "jax" or any(d is None for d in static_shape):
        # one call with one image: also traces the forward pass (TF: one trace serves every batch
        # size). Skipped on JAX, where it would compile a batch-1 program that extraction never uses.
        probe = np.zeros((1, sizes[0], sizes[0], 3), np.uint8)
        static_shape = np.asarray(forward[0](probe if affine is not None else backbone.preprocess(probe))).shape[1:]
    return BuiltForward(trunk, layer, folded, affine, tuple(forward), tuple(int(d) for d in static_shape))


def build_extractor(config: "ExtractConfig | FusionConfig") -> "FeatureExtractor | FusedExtractor | ColourExtractor":
    """The extractor of a recipe: one backbone, a colour histogram (``ris.colour``), or a fusion
    of several (``ris.fusion``)."""
    if isinstance(config, ExtractConfig):
        from ris.colour import ColourExtractor, is_colour

        return ColourExtractor(config) if is_colour(config.model) else FeatureExtractor(config)
    from ris.fusion import FusedExtractor

    return FusedExtractor(config)


def _ris_version() -> str:
    try:
        from importlib.metadata import version

        return version("ris")
    except Exception:
        return "dev"
