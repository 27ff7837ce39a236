"""Saved heads: metadata inside the .keras zip, the NumPy whitening head, and one clear error per bad file."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from ris.errors import DatabaseError, ModelError
from ris.modelio import META_NAME, check_compatible, load_model, read_meta, save_model
from ris.testing import call_with_fifo_guard
from ris.whiten import WhiteningHead, learned_whitening

META = {"config": {"arch": "whiten", "l2_normalize": True}, "split": {"by": "object", "test_images": []},
        "feature_fingerprint": {"model": "synthetic"}}


def _fit(dim: int = 16, out: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, dim)).astype(np.float32)
    mean, proj = learned_whitening(x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(12), 4), out)
    return x, mean, proj


@pytest.mark.parametrize("l2", [True, False])
def test_a_whitening_head_loads_as_numpy_and_ranks_as_its_keras_model(tmp_path, l2):
    keras = pytest.importorskip("keras")
    from ris.whiten import build_whitening_head

    x, mean, proj = _fit()
    path = save_model(build_whitening_head(mean, proj, l2), tmp_path / "w.keras",
                      {**META, "config": {"arch": "whiten", "l2_normalize": l2}})
    head, meta = load_model(path)
    assert isinstance(head, WhiteningHead) and head.l2_normalize is l2
    assert meta["format"] == "ris-head/1" and meta["feature_fingerprint"] == {"model": "synthetic"}
    model, _ = load_model(path, keras=True)
    assert isinstance(model, keras.Model)
    np.testing.assert_allclose(head(x), keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    np.testing.assert_allclose(head(x), WhiteningHead.from_fit(mean, proj, l2)(x), atol=1e-6)


def test_a_model_tagged_whiten_but_built_otherwise_is_loaded_by_keras(tmp_path):
    """The NumPy reader trusts the weights only when the saved layers are exactly the whitening head's."""
    keras = pytest.importorskip("keras")
    from ris.head import build_embedding_head

    other = build_embedding_head((16,), hidden=(8,), out_dim=6, arch="mlp")
    head, _ = load_model(save_model(other, tmp_path / "m.keras", META))
    assert isinstance(head, keras.Model) and head.count_params() == other.count_params()


def test_metadata_is_read_without_loading_the_head(tmp_path):
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(META_NAME, json.dumps({**META, "format": "ris-head/1"}))
    assert read_meta(path)["split"]["by"] == "object"


def _zip(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "model file not found"),
    (lambda p: (p.mkdir(), p)[1], "not a regular file (folder)"),
    (lambda p: (p.write_bytes(b"\x89HDF not a zip"), p)[1], "not a .keras model file"),
    (lambda p: _zip(p, {"config.json": "{}"}), "not a ris model (no ris.json metadata)"),
    (lambda p: _zip(p, {META_NAME: "{not json"}), "damaged ris.json (not JSON)"),
    (lambda p: _zip(p, {META_NAME: "[1, 2]"}), "ris.json is not ris head metadata"),
    (lambda p: _zip(p, {META_NAME: json.dumps({"config": {}})}), "ris.json lacks split, feature_fingerprint"),
])
def test_a_bad_model_file_is_one_model_error_naming_it(tmp_path, make, needle):
    path = make(tmp_path / "m.keras")
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_fifo_named_keras_is_refused_unread(tmp_path):
    fifo = tmp_path / "m.keras"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="not a regular file \\(FIFO\\)"):
        call_with_fifo_guard(lambda: load_model(fifo), fifo, timeout=20)


def test_damaged_keras_weights_are_a_model_error(tmp_path):
    pytest.importorskip("keras")
    from ris.head import build_embedding_head

    good = save_model(build_embedding_head((16,), hidden=(8,), out_dim=6, arch="mlp"), tmp_path / "g.keras",
                      {**META, "config": {"arch": "mlp"}})
    bad = tmp_path / "b.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 3] if info.filename == "model.weights.h5" else data)
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(bad)


def test_features_made_differently_are_refused():
    meta = {"feature_fingerprint": {"model": "vgg16", "input_size": 224}}
    check_compatible(meta, {"model": "vgg16", "input_size": 224}, "f.h5")
    with pytest.raises(DatabaseError, match=r"f.h5: features were made differently .*--resize 224 for the model, 96 in the database"):
        check_compatible(meta, {"model": "vgg16", "input_size": 96}, "f.h5")


@pytest.mark.parametrize("key, value, shown", [("flip", True, "--flip on for the model, off in the database"),
                                               ("aspect", "keep", "--aspect keep for the model, squash in the database")])
def test_a_head_trained_with_an_optional_recipe_setting_is_refused_on_a_database_without_it(key, value, shown):
    # the database's fingerprint leaves flip/aspect out when off: a head trained with them on was accepted
    plain = {"model": "mobilenet_v2", "input_size": 224}
    check_compatible({"feature_fingerprint": plain}, plain, "f.h5")
    with pytest.raises(DatabaseError, match=rf"f.h5: features were made differently .*\({shown}\)"):
        check_compatible({"feature_fingerprint": {**plain, key: value}}, plain, "f.h5")


def test_a_head_trained_on_a_flip_database_is_accepted_on_it_after_saving(tmp_path):
    # HDF5 gives --flip back as numpy.bool_, which the head's JSON wrote as the string 'True': every head
    # trained on a --flip database (every --preset accurate one) was refused on its own database
    import h5py

    pytest.importorskip("keras")
    from ris.featuredb import fingerprint
    from ris.whiten import build_whitening_head

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.attrs.update(model="mobilenet_v2", input_size=224, pooling="gap", flip=True)
        db = fingerprint(dict(f.attrs))
    x, mean, proj = _fit()
    path = save_model(build_whitening_head(mean, proj, True), tmp_path / "w.keras", {**META, "feature_fingerprint": db})
    check_compatible(read_meta(path), db, "f.h5")
    stored = dict(read_meta(path)["feature_fingerprint"], flip="True")  # as heads saved before this fix hold it
    check_compatible({"feature_fingerprint": stored}, db, "f.h5")
