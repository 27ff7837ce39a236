"""The file an interrupted extraction leaves (``<db>.partial``): batch checksums, and the copy a
resume makes of its committed rows.

HDF5 writes metadata whenever its cache evicts it, so after a kill a partial's committed rows read
back intact but its free-space and heap bookkeeping may be a mix of two moments: extending such a
file corrupted the finished database in 7 of 20 kill-and-resume cycles. A resume therefore only
reads it: the committed rows (those whose batch checksum matches what reads back) are copied into a
new file, which replaces it atomically and which the run continues. A file that cannot be read is
damaged (the writer discards it and starts over); a copy that cannot be written (a full disk) keeps it.
"""
from __future__ import annotations

import contextlib
import glob
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from ris.errors import DatabaseError
from ris.featuredb import ROW_DATASETS, fingerprint
from ris.recipe_diff import recipe_refusal
from ris.h5write import hdf5_writing
from ris.sidecars import atomic_write, ensure_room

COMMITS = "commit_crc"  # (first row, end row, crc32) per committed batch, while the file is a partial
FAILURE_DATASETS = ("failed_ids", "failed_reasons")
ROW_NAMES = ("features", "image_ids", "labels", *ROW_DATASETS)  # one value per row: cut at the verified rows


class Damaged(Exception):
    """Reading the interrupted run's file failed: it is damaged (a failure to write the copy is not)."""


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    try:
        yield
    except (Damaged, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise Damaged(str(exc)) from exc


def create_commits(f: h5py.File) -> None:
    f.create_dataset(COMMITS, shape=(0, 3), maxshape=(None, 3), dtype="int64", chunks=(1024, 3))


def batch_crc(features: np.ndarray, image_ids: np.ndarray, labels: np.ndarray) -> int:
    """A batch's checksum as stored (computed from what the file returns, at writing and at resume)."""
    crc = zlib.crc32(np.ascontiguousarray(features, np.float32).tobytes())
    crc = zlib.crc32(b"\0".join(bytes(i) for i in image_ids), crc)
    return zlib.crc32(np.ascontiguousarray(labels, np.int64).tobytes(), crc)


def copy_committed(partial: Path, attrs_wanted: dict[str, Any], base: Path, base_rows: int,
                   log: Callable[[str], None], progress: bool = False) -> None:
    """Replace ``partial`` by a new file holding only its committed, checksum-verified content.

    Raises ``Damaged`` when it cannot be read (or an --append's copy of ``base``, its first
    ``base_rows`` rows, reads back different), the recipe refusal when it was made differently, and
    whatever writing the copy raised otherwise (``partial`` then stays as it was)."""
    for stale in partial.parent.glob(f"{glob.escape(partial.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # a copy a killed resume left (the caller holds the lock)
    with _reading(), h5py.File(partial, "r") as src:
        attrs = dict(src.attrs.items())
    old, new = fingerprint(attrs), fingerprint(attrs_wanted)
    if old != new:  # refused before anything is copied
        raise recipe_refusal(partial, old, new)
    rows, failed = int(attrs.get("rows_done", 0)), int(attrs.get("failed_done", 0))
    try:  # checked first: HDF5 that runs out of space mid-write cannot close its file
        ensure_room(partial.parent, partial.stat().st_size, "to copy its committed rows into a new file to resume")
    except OSError as exc:
        raise DatabaseError(f"{partial}: {exc.strerror}; it is kept: free space and run the same command again") from None
    log(f"resuming: copying the {rows} committed images of {partial.name} into a new file "
        "(an interrupted HDF5 file is read, never extended)")
    with _reading():
        src = h5py.File(partial, "r")
    with src:
        with _reading(), _bar(rows, "resume: check", progress) as bar:
            verified, commits = verified_rows(src, rows, advance=bar.update)
            datasets = [(name, item) for name, item in src.items() if isinstance(item, h5py.Dataset)]
        if verified < base_rows:  # an --append's copy of its base is not ours to cut: start again
            raise Damaged(f"the rows of {base} it copied read back different (checksums)")
        if verified < rows:
            log(f"warning: {rows - verified} committed images of {partial.name} read back different "
                "from what was written (checksums); they are extracted again")
        with (atomic_write(partial) as fresh, hdf5_writing(fresh, reserve=partial.stat().st_size) as dst,
              _bar(verified, "resume: copy", progress) as bar):
            for name, item in datasets:
                n = (commits if name == COMMITS else failed if name in FAILURE_DATASETS
                     else verified if name in ROW_NAMES else len(item))  # removed_ids: a log, copied whole
                _copy_rows(item, dst, name, n, advance=bar.update if name == "features" else None)
            for k, v in attrs.items():
                dst.attrs[k] = v
            dst.attrs["rows_done"] = verified


def verified_rows(src: h5py.File, rows: int, block_bytes: int = 64 << 20,
                  advance: Callable[[int], Any] | None = None) -> tuple[int, int]:
    """(rows, checksum entries) that read back as written: up to the first batch that does not, or
    whose entry is missing or out of sequence. Rows before the first entry (an --append's copy of
    its finished base) and partials made before checksums are taken as they are."""
    if COMMITS not in src:
        return rows, 0
    commits = src[COMMITS][:]
    if not len(commits):
        return rows, 0
    end = int(commits[0, 0])
    row_bytes = 4 * int(np.prod(src["features"].shape[1:], dtype=np.int64))
    i = 0
    while i < len(commits) and end < rows:
        group = i  # read whole blocks of batches, then check each batch in memory
        while group < len(commits) and commits[group, 1] <= rows and (commits[group, 1] - end) * row_bytes <= block_bytes:
            group += 1
        group = max(group, i + 1)
        first, last = end, int(min(rows, commits[group - 1, 1]))
        feats, names, labels = (src[n][first:last] for n in ("features", "image_ids", "labels"))
        for start, stop, crc in commits[i:group]:
            if start != end or not start < stop <= last or batch_crc(
                    feats[start - first : stop - first], names[start - first : stop - first],
                    labels[start - first : stop - first]) != crc:
                return end, i
            end, i = int(stop), i + 1
        if advance is not None:
            advance(last - first)
    return min(end, rows), i


def _copy_rows(src: h5py.Dataset, dst: h5py.File, name: str, n: int, block_bytes: int = 64 << 20,
               advance: Callable[[int], Any] | None = None) -> None:
    """The first ``n`` rows of ``src`` into a new dataset of the same type and layout, in blocks."""
    if src.maxshape[:1] == (None,):  # a row dataset: resizable, chunked like the original
        out = dst.create_dataset(name, shape=(n, *src.shape[1:]), maxshape=src.maxshape, dtype=src.dtype,
                                 chunks=src.chunks)
    else:  # fixed (label names): its own layout; an empty one's chunks would be larger than itself
        out = dst.create_dataset(name, shape=(n, *src.shape[1:]), dtype=src.dtype)
    step = max(1, block_bytes // max(1, src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64))))
    for start in range(0, n, step):
        with _reading():
            block = src[start : min(n, start + step)]
        out[start : start + step] = block
        if advance is not None:
            advance(len(block))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    """A progress bar over rows (minutes of copying at 10M rows), silent when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, leave=False)
