"""Random rows of a stored feature matrix, read straight from the HDF5 file: what exact re-ranking
of an approximate index's shortlist reads (``ris.faiss_index``), a few hundred rows per query."""
from __future__ import annotations

import os

import numpy as np


def _open_file_descriptor(data) -> int:
    """A descriptor of the very file h5py has open (a duplicate of its own), not of whatever file
    now has its name: a database replaced under its name (``--sync``, ``ris-index remove``, a
    copy) would otherwise be read at the old file's chunk offsets, silently wrong rows."""
    handle = data.file.id.get_vfd_handle()
    if not isinstance(handle, int) or handle < 0:
        raise ValueError("no file descriptor behind this HDF5 file")
    return os.dup(handle)


class StoredRows:
    """Random rows of the feature matrix, for exact re-ranking of a shortlist.

    An h5py dataset written by ``FeatureWriter`` is chunked by whole rows and uncompressed, so a
    row's bytes sit at (its chunk's file offset + its place in the chunk): the chunk offsets are
    listed once and every row is then read with one ``pread`` of its own file (the version that
    was open when the index was opened, even if the database has been replaced since), instead
    of h5py selecting and caching whole 1 MB chunks. Anything else (a NumPy array, a compressed
    or differently chunked dataset) is read through h5py.
    """

    def __init__(self, data):
        self.data = data
        self._fd = None
        try:
            if (data.compression is None and data.dtype == np.dtype("<f4") and data.ndim == 2
                    and data.chunks is not None and data.chunks[1:] == data.shape[1:]):
                self._rows_per_chunk, self._row_bytes = int(data.chunks[0]), int(data.shape[1]) * 4
                self._offsets = self._chunk_offsets(data)
                self._fd = _open_file_descriptor(data)
        except (AttributeError, TypeError, ValueError, OSError, RuntimeError):
            self._fd = None

    def _chunk_offsets(self, data) -> np.ndarray:
        n_chunks = -(-int(data.shape[0]) // self._rows_per_chunk)
        offsets = np.full(n_chunks, -1, np.int64)

        def visit(info) -> None:
            offsets[info.chunk_offset[0] // self._rows_per_chunk] = info.byte_offset

        try:
            data.id.chunk_iter(visit)  # one pass over the chunk index (HDF5 >= 1.14)
        except AttributeError:
            for c in range(n_chunks):
                offsets[c] = data.id.get_chunk_info_by_coord((c * self._rows_per_chunk, 0)).byte_offset
        if (offsets < 0).any():
            raise ValueError("unallocated chunks")
        return offsets

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self._fd is None:
            uniq, inv = np.unique(rows, return_inverse=True)
            return np.asarray(self.data[uniq], np.float32)[inv]
        chunk, within = np.divmod(rows, self._rows_per_chunk)
        offsets = self._offsets[chunk] + within * self._row_bytes
        rb = self._row_bytes
        data = b"".join(os.pread(self._fd, rb, int(o)) for o in offsets)
        if len(data) != rb * len(rows):
            raise OSError(f"{self.data.file.filename}: rows end before their chunks (file truncated?)")
        return np.frombuffer(data, np.float32).reshape(len(rows), -1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()
