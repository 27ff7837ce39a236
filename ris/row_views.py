"""A database's columns read on demand: image names and label names per row.

Why a module of its own: a search engine over millions of rows needs a few names per query, and
the whole columns as Python lists of strings cost about 100 bytes per row; these views decode
only what is asked for. ``FeatureDB.row_names()`` returns a ``RowNames``.
"""
from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np

from ris.featuredb import decode_names


class RowNames(Sequence):
    """``FeatureDB.image_ids`` as a sequence that decodes only the rows asked for. Why: a search
    engine needs a few names per query, and the whole column costs ~100 bytes per row as Python
    strings. Reads go through the open file (h5py serialises them across threads)."""

    def __init__(self, dataset: h5py.Dataset):
        self._ds = dataset
        self._n = int(dataset.shape[0])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return decode_names(self._ds[start:stop]) if stop > start else []
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} is not in the database (0..{self._n - 1})")
        return decode_names(self._ds[i : i + 1])[0]

    def many(self, rows) -> list[str]:
        """The names of ``rows`` (any order, repeats allowed) in one HDF5 read."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows):
            return []
        if rows.min() < 0 or rows.max() >= self._n:
            raise IndexError(f"a row is not in the database (0..{self._n - 1})")
        unique, back = np.unique(rows, return_inverse=True)
        names = decode_names(self._ds[unique])
        return [names[j] for j in back.reshape(-1)]

    def __iter__(self):
        for start in range(0, self._n, 65536):  # in blocks: one HDF5 read per 64k names
            yield from self[start : start + 65536]


class RowLabels(Sequence):
    """Each row's label name ('' for unlabelled) from the int label column and the names: 4 bytes
    per row instead of a Python list of strings."""

    def __init__(self, labels: np.ndarray, names: list[str]):
        self._labels = np.asarray(labels, np.int32)
        self._names = list(names)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        label = int(self._labels[i])
        return self._names[label] if 0 <= label < len(self._names) else ""

    def any(self) -> bool:
        """Whether any row has a label (without building the names)."""
        return bool(((self._labels >= 0) & (self._labels < len(self._names))).any())
