"""Saved heads: the ``.keras`` file with ris' metadata inside, read back without Keras where it can be.

A model file is Keras' zip (``config.json``, ``model.weights.h5``) plus ``ris.json``: the
training split, config and the fingerprint of the features it was trained on. ``load_model``
returns a learned-whitening head as a NumPy ``WhiteningHead`` read from that zip with h5py (same
arithmetic, no TensorFlow start-up), and any other head as a Keras model.
"""
from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ris.errors import BadImage, ModelError

META_NAME = "ris.json"  # stored inside the .keras zip next to Keras' own files
META_FORMAT = "ris-head/1"
MAX_MEMBER_BYTES = 256 << 20  # ris.json / config.json / a whitening head's weights: far below this
_REQUIRED = ("config", "split", "feature_fingerprint")


def save_model(model, path: str | Path, meta: dict[str, Any]) -> Path:
    """Keras ``.keras`` file with our metadata inside; written atomically."""
    from ris.sidecars import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": META_FORMAT, **meta}, indent=1, default=_json_default)
    with atomic_write(path, suffix=".keras") as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(META_NAME, text)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved head, without loading the head."""
    with _open_zip(Path(path)) as zf:
        return _meta(zf, Path(path))


def load_model(path: str | Path, keras: bool = False):
    """(head, metadata) of a saved head; one clear ``ModelError`` for a missing, foreign or damaged file.

    The head is a ``ris.whiten.WhiteningHead`` (NumPy) for learned whitening, unless ``keras`` asks
    for the Keras model; a Keras model for every other head. Run either with ``ris.embed.embed_features``.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        meta = _meta(zf, path)
        if not keras and meta["config"].get("arch") == "whiten":
            head = _whitening_head(zf)
            if head is not None:
                return head, meta
    return _load_keras(path), meta


def check_compatible(meta: dict[str, Any], db_fingerprint: dict[str, Any], db_path: str) -> None:
    """Refuse a head trained on features made differently from this database's (``HeadRefused``, a
    ``DatabaseError``: ris-extract's flags; the facade words it in its arguments)."""
    from ris.recipe_diff import HeadRefused

    trained = meta.get("feature_fingerprint", {})
    # both sides' keys: --flip and --aspect keep are in a fingerprint only when on, so a head trained
    # with them on must be compared on keys the database's fingerprint lacks; absent means off. Heads
    # saved before numpy booleans were made plain hold --flip as the string 'True'
    off = {"flip": False, "aspect": "squash"}

    def setting(fp: dict[str, Any], k: str) -> Any:
        v = fp.get(k, off.get(k))
        return v in (True, "True") if k == "flip" else v

    if any(setting(trained, k) != setting(db_fingerprint, k) for k in {*trained, *db_fingerprint}):
        raise HeadRefused(db_path, trained, db_fingerprint)


# --- reading the zip ---------------------------------------------------------------------------

@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """The model file as a zip: only a regular file within the size cap is opened."""
    from ris.imagefile import open_head

    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    try:
        fh = open_head(path)  # regular files only, RIS_MAX_FILE_BYTES
    except BadImage as exc:
        raise ModelError(str(exc)) from None
    with fh:
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError):
            raise ModelError(f"{path}: not a .keras model file") from None
        with zf:
            yield zf


def _member(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > MAX_MEMBER_BYTES:
        raise ModelError(f"{path}: {name} is {info.file_size} bytes, more than a ris model holds")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(f"{path}: damaged ({name}: {exc})") from None


def _meta(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    if META_NAME not in zf.namelist():
        raise ModelError(f"{path}: not a ris model (no {META_NAME} metadata); train it with ris-train")
    try:
        meta = json.loads(_member(zf, META_NAME, path))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: damaged {META_NAME} (not JSON)") from None
    if not isinstance(meta, dict) or not str(meta.get("format", META_FORMAT)).startswith("ris-head/"):
        raise ModelError(f"{path}: {META_NAME} is not ris head metadata")
    missing = [k for k in _REQUIRED if not isinstance(meta.get(k), dict)]
    if missing:
        raise ModelError(f"{path}: {META_NAME} lacks {', '.join(missing)}; train the model again with ris-train")
    return meta


def _whitening_head(zf: zipfile.ZipFile):
    """The whitening head's kernel and bias from ``model.weights.h5``, if the saved model is exactly
    what ``build_whitening_head`` makes (input, L2, Dense, optional L2); else None (Keras loads it)."""
    import h5py

    from ris.whiten import WhiteningHead

    names = set(zf.namelist())
    if not {"config.json", "model.weights.h5"} <= names:
        return None
    try:
        config = json.loads(_member(zf, "config.json", Path("config.json")))
        layers = config["config"]["layers"]
        kinds = [(layer["class_name"], layer.get("registered_name")) for layer in layers]
        dense = layers[2]["config"]
    except (ModelError, ValueError, KeyError, IndexError, TypeError):
        return None
    l2 = ("L2Normalize", "ris>L2Normalize")
    if kinds[:3] != [("InputLayer", None), l2, ("Dense", None)] or kinds[3:] not in ([], [l2]) \
            or dense.get("activation") != "linear" or not dense.get("use_bias"):
        return None
    arrays: list[np.ndarray] = []
    try:
        with h5py.File(io.BytesIO(_member(zf, "model.weights.h5", Path("model.weights.h5"))), "r") as f:
            f.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    except (ModelError, OSError):
        return None
    kernels = [a for a in arrays if a.ndim == 2]
    biases = [a for a in arrays if a.ndim == 1]
    if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1 or kernels[0].shape[1] != biases[0].shape[0]:
        return None
    return WhiteningHead(kernels[0].astype(np.float32), biases[0].astype(np.float32), l2_normalize=len(kinds) == 4)


def _load_keras(path: Path):
    import keras

    import ris.layers  # noqa: F401  (registers custom layers)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises anything from ValueError to OSError for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{path}: cannot load model ({first[:160]})") from None


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)
