"""Each row's file stamp: the size and mtime (ns) of its file, taken before the file is read.

Why: ``--sync`` judged a file changed only by times newer than its row. A folder renamed over
another, or a folder link pointed elsewhere, brings the same names with other, older files (a
rename changes the folder's ctime, not its files'): their rows were kept. A stamp that differs
from the file now says the file is another one. Size and mtime, as rsync's quick check: inode
numbers are not stable on every filesystem (FAT, some FUSE mounts renumber at each mount), which
would re-extract a whole collection after a remount. Taken before reading, so a file replaced
between the stamp and its decoding differs from its row and is extracted again, never missed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

UNKNOWN = (-1, -1)  # rows written before stamps existed, or a file that could not be stat'ed


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of the file ``path`` names (through links), ``UNKNOWN`` if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return UNKNOWN
    return st.st_size, st.st_mtime_ns


def file_stamps(root: Path, names: Sequence[str]) -> np.ndarray:
    """(len(names), 2) int64 stamps of ``root / name``."""
    out = np.empty((len(names), 2), np.int64)
    for i, name in enumerate(names):
        out[i] = file_stamp(root / name)
    return out


def differs(stored: Sequence[int], path: str | Path) -> bool:
    """Whether the file now is not the one a row stamped ``stored`` was read from (an unknown
    stamp never differs: such rows are judged by their times alone)."""
    if int(stored[0]) < 0:
        return False
    return tuple(int(v) for v in stored) != file_stamp(path)
