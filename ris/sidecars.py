"""Every file kept beside a feature database, in one place.

Beside ``feats.h5`` live caches derived from it (head embeddings ``.emb-<model>.h5``, the DBA
database ``.dba-n<n>-a<alpha>.h5``, thumbnails ``.thumbs<size>.h5``, the HNSW index ``.hnsw.json``
(its metadata, the commit point) + the graph it names ``.hnsw.<token>.graph`` (``.hnsw`` before
tokens; ``ris.hnsw_files``), the faiss IVF-PQ index ``.ivfpq`` (its metadata, the commit point) +
the data file it names ``.ivfpq.<token>.faiss``, and the same kinds beside an embedding cache),
the writer's ``.partial``, the remover's ``.rewrite`` and its ``.lock``. Why one module: a cache
is only safe if it is (a) written atomically, (b) keyed on the database's *content* plus its own
parameters, so a re-extracted database of the same size never serves stale vectors, and (c)
cleared, and only it, when the database is replaced.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ris.errors import DatabaseError
from ris.h5write import hdf5_writing

LOCK_SUFFIX = ".lock"
_TMP = r"(?:\.[0-9a-f]{8}\.tmp)?"  # atomic_write's temp names, left behind only by a killed process
_TEMP_NAME = re.compile(r"\.[0-9a-f]{8}\.tmp$")
_DBA = r"dba-n\d+-a[0-9a-z.+-]+\.h5"
_INDEX = r"(?:hnsw(?:\.json|\.[0-9a-f]{8}\.graph)?|ivfpq(?:\.[0-9a-f]{8}\.faiss)?)"
_INDEX_FILE = re.compile(r"\." + _INDEX + r"(?:\.[0-9a-f]{8}\.tmp)?$")
_KINDS = rf"(?:emb-[0-9a-f]+\.h5(?:\.{_INDEX}|\.{_DBA})?|{_DBA}|thumbs\d+\.h5|local-sift\d+-\d+\.h5|{_INDEX})"


# -- atomic writes ------------------------------------------------------------------------------

def fsync_dir(folder: str | Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


SPACE_RESERVE = 16 << 20  # free bytes a writer leaves beyond what it is about to write (HDF5 metadata, heaps)


def ensure_room(folder: str | Path, need: int, doing: str) -> None:
    """Refuse (``OSError`` ENOSPC: one line from the CLIs, "uncached" for caches) before writing
    ``need`` bytes (plus ``SPACE_RESERVE``) where the disk has less: HDF5 that runs out of space
    mid-write cannot close its file, and the process crashes when it ends."""
    import shutil

    from ris.imagefile import human_bytes

    need += SPACE_RESERVE
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough free space {doing} ({human_bytes(free)} free, about "
                      f"{human_bytes(need)} needed)", str(folder))


STALE_TEMP_AGE_S = 60.0  # a temp younger than this may belong to a writer that has not locked it yet


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp name in the same folder; on success it is fsynced and renamed onto ``path``.

    Readers see the old file or the whole new one, never a torn one; on error the temp is removed.
    The temp is created here and ``flock``-ed until the end, so temps that killed writers left of
    the same file (an index save can be 1.3 GB) are told from live ones and removed first.
    ``suffix`` is for writers that insist on an extension (Keras wants ``.keras``).
    """
    path = Path(path)
    remove_abandoned_temps(path, suffix)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    held = None
    try:
        held = create_locked(tmp)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # name the file (a full disk said only
            # "File too large" or "No space left on device"), the one the user asked for, not the temp
        raise
    finally:
        if held is not None:
            os.close(held)
    fsync_dir(path.parent)


def remove_abandoned_temps(path: str | Path, suffix: str = "") -> list[Path]:
    """Delete the temps (``<name>.<8 hex>.tmp<suffix>``) that ``atomic_write``s of ``path`` killed
    mid-way left (``remove_stale_temps``: no writer holds them); returns what was deleted."""
    path = Path(path)
    return remove_stale_temps(path.parent, re.compile(re.escape(path.name) + r"\.[0-9a-f]{8}\.tmp" + re.escape(suffix)))


def create_locked(tmp: Path) -> int:
    """Create ``tmp`` (it must not exist) and hold an exclusive ``flock`` on it; the OS drops the
    lock when the process dies, even by ``kill -9``, which is how a temp is known abandoned."""
    import fcntl

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no locks on this file system: the temp is never judged abandoned (kept)
        pass
    return fd


def remove_stale_temps(folder: str | Path, pattern: re.Pattern, age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete the temps in ``folder`` whose names match ``pattern`` and whose writer is gone: no
    process holds their lock and they are older than ``age_s``. Returns what was deleted."""
    try:
        entries = [e for e in os.scandir(folder) if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    return [Path(e.path) for e in entries if _remove_if_abandoned(Path(e.path), age_s)]


def _remove_if_abandoned(path: Path, age_s: float) -> bool:
    return remove_unless_held(path, lambda st, held: held and time.time() - st.st_mtime >= age_s)


def remove_unless_held(path: str | Path, may_remove: Callable[[os.stat_result, bool], bool],
                       held_here: bool = False) -> bool:
    """Delete ``path`` unless a live writer holds its ``flock``: opened without following links and
    locked without waiting; ``may_remove(stat, held)`` decides under the lock (``held``: no other
    process can hold it: locked here, or ``held_here`` by the caller itself; False where locks do
    not work), and the name is unlinked only if it still is the file that was judged."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st, held = os.fstat(fd), held_here
        if not held_here:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return False  # a live writer's
        if not may_remove(st, held) or not os.path.samestat(st, os.lstat(path)):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


ORPHAN_AGE_S = 600.0  # where files cannot be locked: an unnamed data file older than this is a killed save's


def drop_unnamed(files: Iterable[str], named: Callable[[], str | None], own: str | None = None) -> list[str]:
    """Delete those of an index's data ``files`` (HNSW graphs, IVF-PQ data) that its metadata does
    not name and no writer holds (``own``: the caller's, held by the caller and done with). Why: a
    writer holds its file's ``flock`` from creation until its metadata is committed, so a save
    killed in between leaves a file no one holds. ``named()`` is read once the file is locked here
    (a file its writer committed is named by then); None (unreadable metadata) drops nothing."""
    def judge(f: str) -> Callable[[os.stat_result, bool], bool]:
        def stale(st: os.stat_result, held: bool) -> bool:
            if not held and time.time() - st.st_mtime < ORPHAN_AGE_S:  # no locks here: judge by age
                return False
            current = named()
            return current is not None and current != f
        return stale

    return [f for f in files if remove_unless_held(f, judge(f), held_here=f == own)]


def write_h5_cache(path: str | Path, key: str, attrs: dict | None = None, **datasets: np.ndarray) -> None:
    """Atomically write an HDF5 cache whose ``cache_key`` attribute says what it was made from."""
    need = sum(np.asarray(d).nbytes for d in datasets.values())
    ensure_room(Path(path).parent, need, f"to write {Path(path).name}")
    with atomic_write(path) as tmp:
        with hdf5_writing(tmp, reserve=need + (1 << 20)) as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data, chunks=True if np.ndim(data) else None)
            f.attrs.update(attrs or {})
            f.attrs["cache_key"] = key


def read_h5_cache(path: str | Path, key: str) -> dict[str, np.ndarray] | None:
    """The cache's datasets if it exists and was made under exactly ``key``, else None (rebuild it)."""
    import h5py

    if not Path(path).is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("cache_key") != key:
                return None
            return {name: f[name][()] for name in f}
    except (OSError, KeyError, ValueError):  # damaged cache: rebuild it
        return None


# -- content keys ------------------------------------------------------------------------------

def new_content_id() -> str:
    return uuid.uuid4().hex


def stat_key(path: str | Path) -> str:
    """Key for a file with no content id (databases made before content ids, plain arrays)."""
    st = os.stat(path)
    return f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def file_hash(path: str | Path) -> str:
    """SHA-1 of a file's bytes, read in blocks (model files can be large)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_crc32(path: str | Path) -> int:
    """CRC-32 of a file, read in 16 MiB blocks (about 1 s per GB): what ties an index's data file
    to the metadata that names it, so bytes damaged in place are never served (or crash a reader)."""
    import zlib

    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


# -- where each cache lives ------------------------------------------------------------------------

def embeddings_path(features_db: str | Path, model_hash: str) -> Path:
    return Path(f"{features_db}.emb-{model_hash[:12]}.h5")


def dba_path(vectors_path: str | Path, n: int, alpha: float) -> Path:
    return Path(f"{vectors_path}.dba-n{int(n)}-a{float(alpha):g}.h5")


def thumbs_path(features_db: str | Path, size: int) -> Path:
    return Path(f"{features_db}.thumbs{int(size)}.h5")


def hnsw_path(vectors_path: str | Path) -> str:
    """The HNSW index's name: its metadata is ``<this>.json``, naming its graph ``<this>.<token>.graph``
    (an index saved before tokens: the graph is this file itself; see ``ris.hnsw_files``)."""
    return f"{vectors_path}.hnsw"


def ivfpq_path(vectors_path: str | Path) -> str:
    """The IVF-PQ index's metadata (JSON); it names its data file ``<this>.<token>.faiss``."""
    return f"{vectors_path}.ivfpq"


def ivfpq_data_path(vectors_path: str | Path, token: str) -> str:
    return f"{ivfpq_path(vectors_path)}.{token}.faiss"


def rewrite_path(features_db: str | Path) -> Path:
    """Where a removal writes the new database before renaming it into place (under the lock)."""
    return Path(f"{features_db}.rewrite")


def sidecar_files(features_db: str | Path) -> list[Path]:
    """Every cache file (regular files only) kept beside ``features_db``; never the database, its
    ``.partial`` or its ``.lock``, and nothing that merely starts with the same name."""
    db = Path(features_db)
    pattern = re.compile(re.escape(db.name) + r"\." + _KINDS + _TMP)
    try:
        entries = list(os.scandir(db.parent))
    except FileNotFoundError:
        return []
    return sorted(Path(e.path) for e in entries
                  if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False))


def clear_sidecars(features_db: str | Path, keep_indexes: bool = False) -> list[Path]:
    """Delete the caches beside ``features_db``; return what was deleted.

    ``keep_indexes``: keep the HNSW and IVF-PQ indexes (after an append or a removal: they know
    which content they were built from and follow the new content incrementally).
    """
    removed = []
    for p in sidecar_files(features_db):
        if keep_indexes and _INDEX_FILE.search(p.name):
            continue
        if _TEMP_NAME.search(p.name):  # a temp: only if its writer is gone (a live one holds its lock)
            if _remove_if_abandoned(p, age_s=0.0):
                removed.append(p)
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def database_file(path: str | Path) -> Path:
    """The file a database name stands for: a symlink's target. Writers replace that file and lock
    it, so the link keeps pointing at the database that changed, and every name shares one lock."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


# -- the writer's lock ---------------------------------------------------------------------------

class DatabaseLocked(DatabaseError):
    """Another process is writing this database."""


class WriterLock:
    """Exclusive, non-blocking ``flock`` on ``<db>.lock`` for one writer's whole run.

    The OS drops the lock when its holder dies (even by ``kill -9``), so a leftover file is never a
    stale lock. The file holds the holder's pid and host for the refusal message. It is removed by
    its holder before release; a process that locked a file already unlinked retries on the new one.
    """

    def __init__(self, features_db: str | Path):
        self.db = database_file(features_db)
        self.path = Path(f"{self.db}{LOCK_SUFFIX}")
        self._fh = None

    def acquire(self) -> "WriterLock":
        import fcntl

        for _ in range(20):
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    fh.close()
                    raise
                fh.seek(0)
                holder = fh.read(200).strip() or "another process"
                fh.close()
                raise DatabaseLocked(f"{self.db}: being written by {holder}; wait for it to finish "
                                     f"(or stop it) and run again") from None
            try:
                same = os.path.samestat(os.fstat(fh.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                fh.seek(0)
                fh.truncate()
                fh.write(f"ris-extract pid {os.getpid()} on {socket.gethostname()} "
                         f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                fh.flush()
                self._fh = fh
                return self
            fh.close()  # the holder removed this file while we waited on it: lock the new one
        raise DatabaseError(f"{self.path}: could not take the writer lock")

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._fh.close()  # closing drops the flock
        self._fh = None

    def __enter__(self) -> "WriterLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()
