"""The HDF5 feature database.

Layout (one file):
  image_ids    (N,)  UTF-8 relative paths
  features     (N, ...) float32, chunked, growable along axis 0
  labels       (N,)  int64, -1 = unknown
  label_names  (L,)  UTF-8
  failed_ids, failed_reasons   images that could not be decoded, and why
  attrs        how the features were made (model, weights, layer, size, preprocessing, pooling, versions)

Writing goes to ``<name>.partial`` and becomes ``<name>`` by an atomic rename only when complete,
so a database under its final name is never half-written. ``rows_done`` is bumped only after a
batch is flushed, which makes an interrupted run resumable from the last good batch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from ris.errors import DatabaseError

STR = h5py.string_dtype("utf-8")
FORMAT_VERSION = 1
# attributes that must agree for features to be comparable (query vs database, resume, append)
FINGERPRINT_KEYS = ("model", "weights", "layer", "input_size", "scales", "pooling", "feature_shape")


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + ".partial")


def fingerprint(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(attrs.get(k)) for k in FINGERPRINT_KEYS}


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.decode()
    return v


class FeatureWriter:
    """Appends batches to ``<path>.partial``; ``finish()`` renames it into place."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], feature_shape: tuple[int, ...],
                 label_names: list[str], base: str | Path | None = None, resume: bool = True):
        self.path = Path(path)
        self.tmp = partial_path(path)
        self.attrs = dict(attrs, feature_shape=list(feature_shape))
        self.resumed_rows = 0
        if base is not None:  # --append: continue from a copy of the finished database
            shutil.copyfile(base, self.tmp)
            self._open_existing(check_attrs=True)
        elif resume and self.tmp.exists():
            try:
                self._open_existing(check_attrs=True)
            except (OSError, KeyError) as exc:  # killed mid-write: HDF5 metadata may be damaged
                self.tmp.unlink()
                self.damaged_partial = str(exc)
                self._create(feature_shape, label_names)
        else:
            self.tmp.unlink(missing_ok=True)
            self._create(feature_shape, label_names)
        self._set_label_names(label_names)

    # -- setup ---------------------------------------------------------------------------
    def _create(self, feature_shape: tuple[int, ...], label_names: list[str]) -> None:
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.tmp, "w")
        row_bytes = int(np.prod(feature_shape)) * 4
        chunk_rows = int(max(1, min(1024, (1 << 20) // max(row_bytes, 1))))
        f.create_dataset("features", shape=(0, *feature_shape), maxshape=(None, *feature_shape),
                         dtype="float32", chunks=(chunk_rows, *feature_shape))
        f.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(4096,))
        f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        f.create_dataset("failed_ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
        f.create_dataset("failed_reasons", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
        for k, v in self.attrs.items():
            f.attrs[k] = _attr_value(v)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["rows_done"] = 0
        f.attrs["complete"] = False
        self.f = f

    def _open_existing(self, check_attrs: bool) -> None:
        f = h5py.File(self.tmp, "r+")
        try:
            old = fingerprint(dict(f.attrs))
            new = fingerprint(self.attrs)
            if check_attrs and old != new:
                diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
                raise DatabaseError(f"{self.path}: existing features were made differently {diff}; "
                                    f"use a new --features-db or delete the old file")
            rows = int(f.attrs.get("rows_done", 0))
            for name in ("features", "image_ids", "labels"):
                f[name].resize(rows, axis=0)
            nfail = int(f.attrs.get("failed_done", 0))
            for name in ("failed_ids", "failed_reasons"):
                f[name].resize(nfail, axis=0)
        except Exception:
            f.close()
            raise
        f.attrs["complete"] = False
        for k, v in self.attrs.items():
            if k not in FINGERPRINT_KEYS:
                f.attrs[k] = _attr_value(v)
        self.f = f
        self.resumed_rows = rows

    def _set_label_names(self, names: list[str]) -> None:
        old = [s.decode() if isinstance(s, bytes) else s for s in self.f["label_names"][:]] if "label_names" in self.f else []
        merged = old + [n for n in names if n not in set(old)]
        if "label_names" in self.f:
            del self.f["label_names"]
        self.f.create_dataset("label_names", data=np.array(merged, dtype=object), dtype=STR)
        self.label_index = {n: i for i, n in enumerate(merged)}

    # -- writing -------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        ids = [s.decode() for s in self.f["image_ids"][:]]
        failed = [s.decode() for s in self.f["failed_ids"][:]]
        return set(ids) | set(failed)

    def add(self, ids: list[str], features: np.ndarray, label_names: list[str]) -> None:
        """Append one batch and flush; ``label_names`` per row ('' = unknown)."""
        n = len(ids)
        if n == 0:
            return
        rows = int(self.f.attrs["rows_done"])
        for name in ("features", "image_ids", "labels"):
            self.f[name].resize(rows + n, axis=0)
        self.f["features"][rows:] = features.astype(np.float32, copy=False)
        self.f["image_ids"][rows:] = np.array(ids, dtype=object)
        self.f["labels"][rows:] = np.array([self.label_index.get(l, -1) for l in label_names], dtype=np.int64)
        self.f.flush()
        self.f.attrs["rows_done"] = rows + n
        self.f.flush()

    def add_failures(self, failures: Iterable[tuple[str, str]]) -> None:
        failures = list(failures)
        if not failures:
            return
        n = int(self.f.attrs.get("failed_done", 0))
        for name in ("failed_ids", "failed_reasons"):
            self.f[name].resize(n + len(failures), axis=0)
        self.f["failed_ids"][n:] = np.array([i for i, _ in failures], dtype=object)
        self.f["failed_reasons"][n:] = np.array([r for _, r in failures], dtype=object)
        self.f.flush()
        self.f.attrs["failed_done"] = n + len(failures)
        self.f.flush()

    @property
    def rows(self) -> int:
        return int(self.f.attrs["rows_done"])

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        for k, v in (extra_attrs or {}).items():
            self.f.attrs[k] = _attr_value(v)
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Leave the partial file for a later resume."""
        try:
            self.f.close()
        except Exception:
            pass


def _attr_value(v):
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)):
        return json.dumps(v)
    if v is None:
        return "none"
    return v


class FeatureDB:
    """Read access to a finished database; features stay on disk and are read in blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished extraction is at .partial: re-run ris-extract to resume)" if partial_path(path).exists() else ""
            raise DatabaseError(f"{self.path}: feature database not found{hint}")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatabaseError(f"{self.path}: not a readable HDF5 feature database ({exc})") from None
        if "features" not in self.f or "image_ids" not in self.f:
            raise DatabaseError(f"{self.path}: not a ris feature database (no 'features'/'image_ids')")
        self.attrs = {k: _plain(v) for k, v in self.f.attrs.items()}
        for k in ("scales", "feature_shape"):
            if isinstance(self.attrs.get(k), str):
                self.attrs[k] = json.loads(self.attrs[k])

    def __len__(self) -> int:
        return int(self.f["features"].shape[0])

    @property
    def features(self) -> h5py.Dataset:
        return self.f["features"]

    @property
    def image_ids(self) -> list[str]:
        return [s.decode() for s in self.f["image_ids"][:]]

    @property
    def labels(self) -> np.ndarray:
        return self.f["labels"][:]

    @property
    def label_names(self) -> list[str]:
        return [s.decode() for s in self.f["label_names"][:]] if "label_names" in self.f else []

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(i.decode(), r.decode()) for i, r in zip(self.f["failed_ids"][:], self.f["failed_reasons"][:])]

    @property
    def dataset_root(self) -> str | None:
        return self.attrs.get("dataset_root")

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.attrs)

    def read_rows(self, rows: np.ndarray, block: int = 8192) -> np.ndarray:
        """Features of the given (any order) rows, read in sorted blocks."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.features.shape[1:]), dtype=np.float32)
        srt = rows[order]
        for s in range(0, len(srt), block):
            idx = srt[s : s + block]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo <= max(4 * len(idx), 4096):  # dense: one contiguous read
                out[order[s : s + block]] = self.features[lo:hi][idx - lo]
            else:  # sparse: h5py point selection (needs increasing, unique indices)
                uniq, inv = np.unique(idx, return_inverse=True)
                out[order[s : s + block]] = self.features[uniq][inv]
        return out

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
