"""The HDF5 feature database.

Layout (one file):
  image_ids    (N,)  relative paths, UTF-8 (a name that is not valid UTF-8 keeps its raw bytes)
  features     (N, ...) float32, chunked, growable along axis 0
  labels       (N,)  int64, -1 = unknown
  label_names  (L,)  UTF-8
  failed_ids, failed_reasons   images that could not be decoded, and why
  ids          (N,)  int64 stable per-image ids, increasing, never reused (absent in older databases:
               the row numbers); added_at (N,) float64 Unix time each row was written (NaN = unknown);
               file_stamp (N, 2) int64 size and mtime_ns of its file before reading (-1 = unknown);
               file_digest (N,) uint64 digest of its file's bytes before reading (0 = unknown; ris.filestamp)
  removed_ids  (R,)  int64 log of every id removed so far (ris.sync), so indexes can follow removals
  attrs        how the features were made (model, weights, layer, size, preprocessing, pooling, versions),
               rows_done, complete, content_id (redrawn on every change: the key of every cache),
               lineage_id (kept through appends and removals, new for a re-extraction), next_id

``create_layout`` makes a new file's datasets; ``ris.featurewriter.FeatureWriter`` writes it
(atomically, resumably, one writer at a time). ``FeatureDB``
reads it and refuses anything incomplete or inconsistent, in one line naming the file and the fault.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import h5py
import numpy as np

from ris.errors import DatabaseError
from ris.sidecars import stat_key

if TYPE_CHECKING:
    from ris.row_views import RowNames

STR = h5py.string_dtype("utf-8")
FORMAT_VERSION = 1
# attributes that must agree for features to be comparable (query vs database, resume, append)
FINGERPRINT_KEYS = ("model", "weights", "layer", "input_size", "scales", "pooling", "feature_shape")
# in the fingerprint only when present, so heads trained before they existed still match their databases
OPTIONAL_FINGERPRINT_KEYS = ("fusion", "flip", "aspect")  # a fused recipe's parts and weights; --flip; --aspect
REQUIRED_DATASETS = ("features", "image_ids", "labels")
ROW_DATASETS = ("ids", "added_at", "file_stamp", "file_digest")  # optional, one value per row when present
INCOMPLETE = "incomplete: an extraction was interrupted or is still running; re-run ris-extract to finish it"


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + ".partial")


def fingerprint(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes that must agree for features to be comparable (None is stored as 'none')."""
    out = {k: "none" if attrs.get(k) is None else _plain(attrs.get(k)) for k in FINGERPRINT_KEYS}
    for k in ("scales", "feature_shape"):  # stored as JSON text when nested (a fusion's scales per part)
        if isinstance(out[k], str) and out[k].startswith("["):
            try:
                out[k] = json.loads(out[k])
            except ValueError:
                pass
    out.update({k: _plain(attrs[k]) for k in OPTIONAL_FINGERPRINT_KEYS if attrs.get(k) is not None})
    return out


def encode_names(names: Iterable[str]) -> np.ndarray:
    """Names for a UTF-8 string dataset. A file name that is not valid UTF-8 reaches Python with
    its bad bytes as surrogates (surrogateescape); they are stored as those original bytes."""
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=object)


def decode_names(values: Iterable[bytes | str]) -> list[str]:
    """The inverse of ``encode_names``: the same str (and so the same file path) back."""
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values]


def unique_names(values: np.ndarray, path: str | Path) -> list[str]:
    """``decode_names``, refusing a name on two rows (a hand-edited database, or another tool's):
    trusted, it is scored as two queries, removed twice and skipped once by ``--append``."""
    names = decode_names(values)
    if len(set(names)) == len(names):
        return names
    first: dict[str, int] = {}
    repeats = [r for r, n in enumerate(names) if first.setdefault(n, r) != r]
    n = names[repeats[0]]
    raise DatabaseError(f"{path}: damaged: image id {n!r} is on rows {first[n]} and {repeats[0]} ({len(repeats)} "
                        f"id{'s' if len(repeats) > 1 else ''} repeated); a database lists each image once: "
                        "extract it again")


def _plain(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if isinstance(v, (np.ndarray, np.generic)):  # scalars too: a numpy bool (--flip) reached a head's JSON as 'True'
        return v.tolist()
    return v


def _attr_value(v):
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)):
        return json.dumps(v)
    if v is None:
        return "none"
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a folder name that is not UTF-8: keep its bytes
            return np.bytes_(v.encode("utf-8", "surrogateescape"))
    return v


def check_regular(path: str | Path) -> None:
    """Only regular files (or nothing yet) may be a database: not a folder, FIFO or device."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise DatabaseError(f"{path}: is a directory, not a feature database file; give a file name")
    if not stat.S_ISREG(mode):
        raise DatabaseError(f"{path}: not a regular file, cannot be a feature database")


class TargetExists(DatabaseError):
    """The output database exists and neither appending nor replacing was asked; ``path`` lets
    the Python API say it with its own arguments instead of ris-extract's flags."""

    def __init__(self, path: str | Path, message: str | None = None):
        super().__init__(message or f"{path}: already exists; use --append to add new images or --overwrite to replace it")
        self.path = path


def check_target(path: str | Path, append: bool = False, overwrite: bool = False) -> None:
    """Refuse an output path that cannot be written as asked (before any slow work starts)."""
    check_regular(path)
    check_regular(partial_path(path))
    if Path(path).exists() and not (append or overwrite):
        raise TargetExists(path)


def create_layout(f: h5py.File, feature_shape: tuple[int, ...]) -> None:
    """The empty datasets of a new database (the layout above), each growable along its rows."""
    chunk_rows = int(max(1, min(1024, (1 << 20) // max(int(np.prod(feature_shape)) * 4, 1))))
    f.create_dataset("features", shape=(0, *feature_shape), maxshape=(None, *feature_shape),
                     dtype="float32", chunks=(chunk_rows, *feature_shape))
    f.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(4096,))
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
    f.create_dataset("failed_ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
    f.create_dataset("failed_reasons", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
    create_row_datasets(f, 0)


def create_row_datasets(f: h5py.File, rows: int) -> None:
    """The per-row datasets ``f`` lacks, for its first ``rows`` rows: ``ids`` (their row numbers),
    ``added_at`` (NaN), ``file_stamp`` (-1), ``file_digest`` (0): unknown for rows written before them."""
    made = {"ids": lambda: np.arange(rows, dtype=np.int64), "added_at": lambda: np.full(rows, np.nan),
            "file_stamp": lambda: np.full((rows, 2), -1, np.int64), "file_digest": lambda: np.zeros(rows, np.uint64)}
    for name, data in made.items():
        if name not in f:
            d = data()
            f.create_dataset(name, data=d, maxshape=(None, *d.shape[1:]), chunks=(4096, *d.shape[1:]))
    f.attrs["next_id"] = max(int(f.attrs.get("next_id", 0)), rows)


def _check_database(f: h5py.File, path: Path) -> None:
    """One line naming the file and what is missing or inconsistent."""
    missing = [n for n in REQUIRED_DATASETS if n not in f]
    if missing:
        raise DatabaseError(f"{path}: not a ris feature database (missing dataset(s) {', '.join(missing)})")
    missing = [k for k in (*FINGERPRINT_KEYS, "rows_done", "complete") if k not in f.attrs]
    if missing:
        raise DatabaseError(f"{path}: not a complete ris feature database (missing attribute(s) {', '.join(missing)})")
    rows = int(f.attrs["rows_done"])
    nfail = [f[n].shape[0] for n in ("failed_ids", "failed_reasons") if n in f]
    if (not bool(f.attrs["complete"]) or any(f[n].shape[0] != rows for n in REQUIRED_DATASETS + ROW_DATASETS
                                             if n in f)
            or int(f.attrs.get("failed_done", nfail[0] if nfail else 0)) != (nfail[0] if nfail else 0)
            or len(set(nfail)) > 1):
        raise DatabaseError(f"{path}: {INCOMPLETE}")


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise DatabaseError(f"{path}: not a readable HDF5 feature database: damaged, truncated or another "
                            f"kind of file ({exc})") from None


class FeatureDB:
    """Read access to a finished database; features stay on disk and are read in blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished extraction is at .partial: re-run ris-extract to resume)" if partial_path(path).exists() else ""
            raise DatabaseError(f"{self.path}: feature database not found{hint}")
        check_regular(self.path)
        self.f = _open_h5(self.path, "r")
        try:
            _check_database(self.f, self.path)
            self.attrs = {k: _plain(v) for k, v in self.f.attrs.items()}
        except DatabaseError:
            self.f.close()
            raise
        except Exception as exc:  # the file opens but its metadata cannot be read
            self.f.close()
            raise DatabaseError(f"{self.path}: damaged feature database ({exc})") from None
        for k in ("scales", "feature_shape"):
            v = self.attrs.get(k)
            if isinstance(v, str) and v != "none":
                try:
                    self.attrs[k] = json.loads(v)
                except ValueError:
                    self.f.close()
                    raise DatabaseError(f"{self.path}: damaged feature database (attribute {k}={v[:40]!r})") from None

    def __len__(self) -> int:
        return int(self.f["features"].shape[0])

    @property
    def content_id(self) -> str:
        """Redrawn by the writer on every change (a database made before content ids: its size,
        mtime and inode)."""
        return str(self.attrs.get("content_id") or stat_key(self.path))

    @property
    def content_key(self) -> str:
        """What every cache beside the database is keyed on (plus its own parameters)."""
        return f"{self.content_id}:{len(self)}"

    @property
    def content_history(self) -> list[str]:
        """Content ids of the earlier versions this one was made from by appends and removals (the
        last 200): an index built from one of them can catch up with this one."""
        try:
            return list(json.loads(self.attrs.get("content_history", "[]")))
        except (TypeError, ValueError):
            return []

    @property
    def lineage(self) -> str:
        """Same for every version made by appends and removals from one extraction (indexes follow
        them incrementally); new for a re-extraction. Older databases: their first content id."""
        history = self.content_history
        return str(self.attrs.get("lineage_id") or (history[0] if history else self.content_id))

    @property
    def row_ids(self) -> np.ndarray:
        """Stable per-image ids (increasing, never reused, kept through removals); row numbers in
        databases made before ids existed."""
        if "ids" in self.f:
            ids = self.f["ids"][:].astype(np.int64, copy=False)
            if len(ids) > 1 and not (np.diff(ids) > 0).all():
                raise DatabaseError(f"{self.path}: damaged: its image ids are not increasing (two rows share an id, "
                                    "or they are out of order)")
            return ids
        return np.arange(len(self), dtype=np.int64)

    @property
    def next_id(self) -> int:
        """The id the next added image gets: every id below it was assigned once."""
        ids = self.f["ids"] if "ids" in self.f else None
        last = int(ids[-1]) + 1 if ids is not None and ids.shape[0] else len(self) if ids is None else 0
        return max(int(self.attrs.get("next_id", 0) or 0), last)

    @property
    def removed_ids(self) -> np.ndarray:
        """Every id removed so far, in removal order (indexes replay the part they have not seen)."""
        if "removed_ids" not in self.f:
            return np.zeros(0, np.int64)
        return self.f["removed_ids"][:].astype(np.int64, copy=False)

    @property
    def added_at(self) -> np.ndarray:
        """Unix time each row was written (NaN where unknown: rows of databases made before it)."""
        return self.f["added_at"][:] if "added_at" in self.f else np.full(len(self), np.nan)

    @property
    def file_stamps(self) -> np.ndarray:
        """(N, 2) size and mtime_ns of each row's file as read (``ris.filestamp``; -1: unknown)."""
        return self.f["file_stamp"][:] if "file_stamp" in self.f else np.full((len(self), 2), -1, np.int64)

    @property
    def file_digests(self) -> np.ndarray:
        """(N,) uint64 digest of each row's file as read (``ris.filestamp``; 0: unknown)."""
        return self.f["file_digest"][:] if "file_digest" in self.f else np.zeros(len(self), np.uint64)

    @property
    def features(self) -> h5py.Dataset:
        return self.f["features"]

    @property
    def image_ids(self) -> list[str]:
        """Every row's name, checked once each (``unique_names``); a search reads ``row_names``."""
        return unique_names(self.f["image_ids"][:], self.path)

    def row_names(self) -> RowNames:
        """The image ids read on demand (a search shows a handful; all of them, as Python strings,
        are about 1 GB at 10M rows)."""
        from ris.row_views import RowNames

        return RowNames(self.f["image_ids"])

    @property
    def labels(self) -> np.ndarray:
        """Label number per row (-1: none); a number without a name means a damaged database."""
        labels = self.f["labels"][:]
        if len(labels):
            names = self.f["label_names"].shape[0] if "label_names" in self.f else 0
            low, high = int(labels.min()), int(labels.max())
            if low < -1 or high >= names:
                raise DatabaseError(f"{self.path}: damaged: a row has label {high if high >= names else low}, "
                                    f"and the database has {names} label names")
        return labels

    @property
    def label_names(self) -> list[str]:
        return decode_names(self.f["label_names"][:]) if "label_names" in self.f else []

    @property
    def failures(self) -> list[tuple[str, str]]:
        if "failed_ids" not in self.f:
            return []
        return list(zip(decode_names(self.f["failed_ids"][:]), decode_names(self.f["failed_reasons"][:])))

    @property
    def dataset_root(self) -> str | None:
        return self.attrs.get("dataset_root")

    def images_folder(self, needed_for: str) -> Path:
        """The folder the database was extracted from, for work that reads its images again; a
        ``DatabaseError`` saying what needed it when it is not recorded or not there."""
        root = self.dataset_root
        if not root or not Path(root).is_dir():
            raise DatabaseError(f"{self.path}: {needed_for} needs the database's images, and its dataset "
                                f"folder {root or '(not recorded)'} is not there")
        return Path(root)

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


def __getattr__(name: str):
    """``FeatureWriter`` lives in ris.featurewriter, ``RowNames`` and ``RowLabels`` in ris.row_views
    (both import this module); importable from here too."""
    if name == "FeatureWriter":
        from ris.featurewriter import FeatureWriter

        return FeatureWriter
    if name in ("RowNames", "RowLabels"):
        from ris import row_views

        return getattr(row_views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
