"""Descriptor fusion: two or more backbones describe each image, their descriptors joined into one.

A fused recipe is written ``--model mobilenet_v2+efficientnet_lite2``: parts joined by ``+``. Options
that may differ per part take the same form (``--resize 224+384``, ``--pool gap+gem``,
``--scales 1+1,0.707,0.5``, ``--layer``, ``--weights``); a value without ``+`` applies to every part.
Each part's descriptor is L2-normalised (as a single-backbone descriptor is), multiplied by its
weight (``--fusion-weights 1+0.5``, default equal), the parts are concatenated and the result is
L2-normalised again. With equal weights the squared distance of two fused descriptors is the mean
of the parts' squared distances.

No whitening is part of the recipe: per-part PCA-whitening fitted unsupervised on the database
was measured (scripts/fusion_choose.py, bench/quality.md) and left out (see there for why).

``FusionConfig`` is the recipe (``to_attrs``/``from_attrs``; ``ExtractConfig.from_attrs`` hands
a fused database's attributes here), ``FusedExtractor`` runs it with the same interface as
``FeatureExtractor``, so extraction, ``--sync``, the Ray engine and ``ris-search`` embed a query
exactly as the database was made.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ris.colour import colour_config, is_colour
from ris.errors import DatabaseError, RisError
from ris.extractor import RECIPE_VERSION, ExtractConfig, build_extractor

SEP = "+"


@dataclass
class FusionConfig:
    """Several single-backbone recipes whose descriptors are weighted and concatenated."""

    parts: tuple[ExtractConfig, ...]
    weights: tuple[float, ...] = ()  # one per part; empty = all 1

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        self.weights = tuple(float(w) for w in self.weights) or (1.0,) * len(self.parts)

    @property
    def model(self) -> str:
        return SEP.join(p.model for p in self.parts)

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype if self.parts else "float32"

    def check(self) -> None:
        """Refuse a recipe that cannot run, with one line saying why."""
        if len(self.parts) < 2:
            raise RisError(f"a fusion needs two or more parts joined by '{SEP}', not {len(self.parts)}")
        if len(self.weights) != len(self.parts):
            raise RisError(f"--fusion-weights has {len(self.weights)} value(s) for {len(self.parts)} parts")
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise RisError(f"fusion weights must be numbers > 0, not {list(self.weights)}")
        if any(p.pooling == "none" for p in self.parts):
            raise RisError("--pool none stores conv maps and cannot be fused; choose a pooling for every part")

    def resolved(self) -> "FusionConfig":
        return replace(self, parts=tuple(p.resolved() for p in self.parts))

    def to_attrs(self) -> dict[str, Any]:
        """The recipe as database attributes: every part's own recipe (``fusion``, JSON) plus
        summary attributes (``model`` 'a+b', ``input_size`` per part, ``pooling`` 'gap+gem', ...)
        that tables and the feature fingerprint show."""
        parts = [p.to_attrs() for p in self.parts]
        return {
            "model": self.model,
            "weights_arg": SEP.join(p["weights_arg"] for p in parts),
            "layer": SEP.join(str(p["layer"]) for p in parts),
            "input_size": [int(p["input_size"]) for p in parts],
            "scales": [list(p["scales"]) for p in parts],
            "scale_sizes": [int(s) for p in parts for s in p["scale_sizes"]],
            "pooling": SEP.join(p["pooling"] for p in parts),
            "dtype": self.dtype,
            "fold_batchnorm": all(p["fold_batchnorm"] for p in parts),
            "recipe_version": RECIPE_VERSION,
            "fusion": json.dumps({"parts": parts, "weights": list(self.weights)}, sort_keys=True),
            **({"flip": True} if any(p.get("flip") for p in parts) else {}),
            **({"aspect": "keep"} if any(p.get("aspect") == "keep" for p in parts) else {}),
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], source: str = "the database") -> "FusionConfig":
        """The fused recipe a database's ``fusion`` attribute records; a damaged one is a
        ``DatabaseError`` naming ``source``."""
        raw = attrs.get("fusion")
        try:
            spec = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
            parts = tuple(ExtractConfig.from_attrs(p, f"{source} (fusion part {i + 1})")
                          for i, p in enumerate(spec["parts"]))
            config = cls(parts, tuple(float(w) for w in spec["weights"]))
            config.check()
        except DatabaseError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RisError) as exc:
            raise DatabaseError(f"{source}: its fusion recipe cannot be read ({exc})") from None
        return config


class PerPart(tuple):
    """Option values given one per fused part (``--resize 224+384`` parsed: ``PerPart((224, 384))``)."""


def is_fused(model: str) -> bool:
    return SEP in str(model)


def per_part(value: Any, n: int, flag: str) -> list[Any]:
    """``value`` as ``n`` per-part values: a ``PerPart`` or a string split at '+' must have one per
    part; any other value applies to every part."""
    if isinstance(value, PerPart):
        pieces = list(value)
    elif isinstance(value, str) and SEP in value:
        pieces = value.split(SEP)
    else:
        return [value] * n
    if len(pieces) != n:
        raise RisError(f"{flag} {_show(value)!r} has {len(pieces)} parts for {n} models; give one value, or one per model")
    return pieces


def _show(value: Any) -> str:
    """An option value as the user wrote it: '224+384', '1+1,0.707'."""
    if isinstance(value, PerPart):
        return SEP.join(",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _size(value: Any, flag: str = "--resize") -> int | None:
    if value is None or value == "" or value == "native":
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise RisError(f"{flag}: {value!r} is not a size in pixels") from None
    if size < 1:
        raise RisError(f"{flag}: input size must be at least 1 pixel, not {size}")
    return size


def _scales(value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    if not isinstance(value, str):
        return tuple(float(s) for s in value)
    try:
        scales = tuple(float(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise RisError(f"--scales: {value!r} is not a comma-separated list of numbers") from None
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise RisError(f"--scales: every scale must be a number > 0, not {value!r}")
    return scales


def make_config(model: str, weights: str = "imagenet", layer: str | None = None, input_size: Any = None,
                scales: Any = (1.0,), pooling: str = "gap", dtype: str = "float32",
                fusion_weights: str | Sequence[float] | None = None,
                flip: bool = False, aspect: str = "squash") -> ExtractConfig | FusionConfig:
    """The recipe the command-line options describe: an ``ExtractConfig`` for one model, a
    ``FusionConfig`` for models joined by '+' (each option split per part by ``per_part``).
    ``aspect`` applies to every CNN part (a colour histogram does not depend on the image's shape)."""
    from ris.aspect import ASPECTS

    if aspect not in ASPECTS:
        raise RisError(f"--aspect {aspect!r}: choose one of {', '.join(ASPECTS)}")
    from ris.backbones import get_backbone
    from ris.pooling import NO_POOLING, check_pooling

    models = str(model).split(SEP)
    if not is_fused(model):
        if fusion_weights not in (None, ""):
            raise RisError("--fusion-weights needs a fused --model (backbones joined by '+')")
        for value, flag in ((input_size, "--resize"), (scales, "--scales"), (pooling, "--pool"), (layer, "--layer")):
            if isinstance(value, PerPart) or (isinstance(value, str) and SEP in value):
                raise RisError(f"{flag} {_show(value)!r} gives one value per part, but --model {model} is one backbone")
        if flip and is_colour(model):
            raise RisError(f"--flip adds a mirrored image's CNN features; {model} is a colour histogram, the same "
                           f"for a mirrored image")
        if aspect != "squash" and is_colour(model):
            raise RisError(f"--aspect {aspect} shapes a CNN's input; {model} is a colour histogram, which does not "
                           f"depend on the image's shape")
        if not is_colour(model) and pooling not in (None, NO_POOLING):
            check_pooling(pooling)
        single = ExtractConfig(model=model, weights=weights, layer=layer, input_size=_size(input_size),
                               scales=_scales(scales), pooling=pooling, dtype=dtype, flip=bool(flip),
                               aspect=aspect)
        return colour_config(single) if is_colour(model) else single
    for m in models:
        if not is_colour(m):
            get_backbone(m)  # unknown names: one line listing the choices
    n = len(models)
    # a weights path may itself contain '+': it is split only when it has one piece per model
    weights_per_part = isinstance(weights, str) and weights.count(SEP) == n - 1
    weight_args = weights.split(SEP) if weights_per_part else [weights] * n
    layers, sizes = per_part(layer, n, "--layer"), per_part(input_size, n, "--resize")
    scale_args, pools = per_part(scales, n, "--scales"), per_part(pooling, n, "--pool")
    # a colour part (ris.colour) has no weights, layer, scales or pooling: a value given once for
    # every part is a CNN setting and passes it by; one given for it per part is checked there
    for values, given, default in ((weight_args, weights_per_part, "none"), (layers, _per_part_given(layer), None),
                                   (scale_args, _per_part_given(scales), 1.0), (pools, _per_part_given(pooling), "gap")):
        if not given:
            values[:] = [default if is_colour(m) else v for m, v in zip(models, values)]
    for m, p in zip(models, pools):
        if p == "none":
            raise RisError("--pool none stores conv maps and cannot be fused; choose a pooling for every part")
        if not is_colour(m):
            check_pooling(p)
    parts = tuple(_part_config(m, w, l, s, sc, p, dtype, flip, aspect)
                  for m, w, l, s, sc, p in zip(models, weight_args, layers, sizes, scale_args, pools))
    if fusion_weights in (None, ""):
        fw: tuple[float, ...] = ()
    else:
        try:
            pieces = fusion_weights.split(SEP) if isinstance(fusion_weights, str) else list(fusion_weights)
            fw = tuple(float(w) for w in pieces)
        except ValueError:
            raise RisError(f"--fusion-weights {fusion_weights!r}: numbers joined by '+', e.g. 1+0.5") from None
    config = FusionConfig(parts, fw)
    config.check()
    return config


def _per_part_given(value: Any) -> bool:
    return isinstance(value, PerPart) or (isinstance(value, str) and SEP in value)


def _part_config(model: str, weights: str, layer: Any, size: Any, scales: Any, pooling: str,
                 dtype: str, flip: bool = False, aspect: str = "squash") -> ExtractConfig:
    """One part's recipe; ``flip`` and ``aspect`` apply to the CNN parts (a colour histogram is
    mirror-invariant and takes its pixels squashed)."""
    config = ExtractConfig(model=model, weights=weights, layer=None if layer in (None, "", "none") else layer,
                           input_size=_size(size), scales=_scales(scales), pooling=pooling, dtype=dtype,
                           flip=bool(flip) and not is_colour(model),
                           aspect="squash" if is_colour(model) else aspect)
    return colour_config(config) if is_colour(model) else config


class FusedExtractor:
    """One ``FeatureExtractor`` per part on the same images; the interface of ``FeatureExtractor``."""

    def __init__(self, config: FusionConfig):
        config.check()
        self.config = config
        self.parts = [build_extractor(p) for p in config.parts]
        dims = [int(np.prod(p.output_shape)) for p in self.parts]
        self.output_shape = (sum(dims),)
        self.bounds = np.cumsum([0, *dims])  # part i is columns bounds[i]:bounds[i + 1]
        self.sizes = sorted({s for p in self.parts for s in p.sizes})

    @property
    def max_size(self) -> int:
        return max(p.max_size for p in self.parts)

    @property
    def aspect(self) -> str:
        """'keep' when a CNN part keeps the aspect ratio (every CNN part does then; the colour part
        squashes what it is given)."""
        return "keep" if any(p.aspect == "keep" for p in self.parts) else "squash"

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) at ``max_size`` -> fused float32 descriptors (L2-normalised)."""
        return self.embed_async(images)()

    def embed_async(self, images: np.ndarray, pad_to: int | None = None) -> Callable[[], np.ndarray]:
        """Every part's forward pass started before any is collected (see ``FeatureExtractor``)."""
        pending = [p.embed_async(images, pad_to=pad_to) for p in self.parts]
        weights = self.config.weights

        def result() -> np.ndarray:
            return fuse([h() for h in pending], weights)

        return result

    @property
    def recipe(self) -> FusionConfig:
        return replace(self.config, parts=tuple(p.recipe for p in self.parts))

    def attrs(self) -> dict[str, Any]:
        part_attrs = [p.attrs() for p in self.parts]
        return {
            **part_attrs[0],  # library versions
            **self.recipe.to_attrs(),
            "weights": SEP.join(str(a["weights"]) for a in part_attrs),
            "normalized": True,
            "preprocessing": " | ".join(f"{p.config.model}: {a['preprocessing']}"
                                        for p, a in zip(self.parts, part_attrs))
                             + "; each part L2-normalised, weighted, concatenated, L2-normalised",
            "batchnorm_folded": int(sum(int(a["batchnorm_folded"]) for a in part_attrs)),
        }


def fuse(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Each part L2-normalised and weighted, concatenated, L2-normalised: the fused descriptor."""
    from ris.topk import l2_normalize

    return l2_normalize(np.concatenate([float(w) * l2_normalize(np.asarray(p, np.float32))
                                        for p, w in zip(parts, weights)], axis=1)).astype(np.float32)
