"""Each row's file stamp: the size and mtime (ns) of its file, taken before the file is read.

Why: ``--sync`` judged a file changed only by times newer than its row. A folder renamed over
another, or a folder link pointed elsewhere, brings the same names with other, older files (a
rename changes the folder's ctime, not its files'): their rows were kept. A stamp that differs
from the file now says the file is another one. Size and mtime, as rsync's quick check: inode
numbers are not stable on every filesystem (FAT, some FUSE mounts renumber at each mount), which
would re-extract a whole collection after a remount. Taken before reading, so a file replaced
between the stamp and its decoding differs from its row and is extracted again, never missed.

Each row's file digest: the first 8 bytes of BLAKE2b of its file's bytes (0: unknown), taken by
the decoder from the very bytes it decoded (``ris.images.load_image_digest``, in its worker: each
file is read once, and on slow storage the reads stay parallel). Times and stamps only say a file
may have changed: ``cp -a`` or ``chmod`` gives every file a new ctime (and a copy without -a a new
mtime) with the same bytes. ``--sync`` hashes only the files its times or stamp flag, and a file
whose bytes have its row's digest keeps its row and id. Taken from the decoded bytes, a digest
never vouches for bytes other than the features': a file changed before its decoding is recorded
with its new bytes' digest (and a stamp older than them, so ``--sync`` hashes it once), one
changed after has other bytes, and is extracted again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

UNKNOWN = (-1, -1)  # rows written before stamps existed, or a file that could not be stat'ed
UNKNOWN_DIGEST = 0  # rows written before digests existed, or a file that could not be read


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


def file_digest(path: str | Path) -> int:
    """The first 8 bytes of BLAKE2b of the regular file ``path`` names (through links), as an
    unsigned int; ``UNKNOWN_DIGEST`` for a file that cannot be read or is over the images' size cap."""
    from ris import imagefile
    from ris.errors import BadImage

    cap = imagefile.MAX_FILE_BYTES
    try:
        fd, _ = imagefile._open_regular(Path(path), cap)
    except BadImage:
        return UNKNOWN_DIGEST
    h, total = hashlib.blake2b(digest_size=8), 0
    try:
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            total += len(chunk)
            if total > cap:  # grew past the cap since the stat
                return UNKNOWN_DIGEST
            h.update(chunk)
    except OSError:
        return UNKNOWN_DIGEST
    finally:
        os.close(fd)
    return _as_int(h)


def bytes_digest(data: bytes) -> int:
    """``file_digest`` of a file whose bytes are ``data`` (as the decoder read them)."""
    return _as_int(hashlib.blake2b(data, digest_size=8))


def _as_int(h: hashlib.blake2b) -> int:
    return int.from_bytes(h.digest(), "little") or 1  # 0 means unknown


def same_content(stored: int, path: str | Path) -> bool:
    """Whether the file's bytes are those its row was read from (an unknown digest never is)."""
    return int(stored) != UNKNOWN_DIGEST and file_digest(path) == int(stored)
