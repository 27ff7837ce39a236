"""HDF5 writes that may fail midway (a full disk, a quota, a file size limit, an I/O error).

HDF5 that fails inside a write leaves its file unusable in this process: closing it retries the
failed write and crashes (status 139, even once the disk has room again), and so does the
interpreter's exit; h5py meanwhile prints a cascade of ``__dealloc__`` tracebacks. So a writer
reserves the room of each write on disk before HDF5 starts it (``reserved_room``: a full disk fails
there, cleanly, and the file stays closable), silences those tracebacks while writing
(``quiet_hdf5_failures``; the caller reports the failure in one line), and a file whose write failed
anyway is left open and never touched again (``abandon_hdf5``); the CLI then ends its process
without HDF5's shutdown (``ris.cli.common``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

HDF5_UNCLOSED: list[tuple[Path, Any]] = []  # files left open after a failed write


def abandon_hdf5(f: Any, path: str | Path) -> None:
    """Leave an HDF5 file whose write failed open, and never touch it again (closing it crashes).
    From then on h5py's dealloc failures, all consequences of this one, stay silenced."""
    HDF5_UNCLOSED.append((Path(path), f))
    global _hooks_depth, _sticky
    with _hooks_lock:
        if not _sticky:
            _install_filters()
            _hooks_depth += 1  # never released (but by release_abandoned): they stay for the process
            _sticky = True


def release_abandoned() -> None:
    """For tests, where the disk is not full: close the abandoned files and lift the filters."""
    global _hooks_depth, _sticky
    while HDF5_UNCLOSED:
        _, f = HDF5_UNCLOSED.pop()
        with contextlib.suppress(Exception):
            f.close()
    with _hooks_lock:
        if _sticky:
            _sticky = False
            _hooks_depth -= 1
            _restore_if_idle()


@contextlib.contextmanager
def hdf5_writing(path: str | Path, reserve: int = 0) -> Iterator[Any]:
    """``h5py.File(path, "w")`` with ``reserve`` bytes reserved on disk first (``reserved_room``: an
    ``OSError`` there leaves nothing written), abandoned (``abandon_hdf5``) if the writing fails."""
    import h5py

    f = h5py.File(path, "w", locking=False)  # a temp or a rewrite: its writer's own lock guards it
    with contextlib.ExitStack() as room:
        try:
            room.enter_context(reserved_room(f, reserve) if reserve > 0 else contextlib.nullcontext())
        except BaseException:
            try:
                f.close()  # nothing was written yet: the file should close whole
            except Exception:
                abandon_hdf5(f, path)
            raise
        try:
            with quiet_hdf5_failures():
                yield f
                f.flush()  # before the unused room is given back
        except BaseException:
            abandon_hdf5(f, path)
            raise
    f.close()


def close_hdf5(f: Any, path: str | Path, room: int = 1 << 20) -> None:
    """Close an HDF5 file that its last flush left whole on disk, without risking it on a full disk.

    A close that cannot write (a writer stopped for lack of room) left a partial that could no
    longer be read ("addr overflow"), so where ``room`` bytes are not free the file is detached from
    the disk first (its descriptor pointed at /dev/null) and closed without writing: the file on
    disk stays as its last flush left it, which is what a resume reads."""
    import shutil

    fd = _descriptor(f)
    if fd is not None:
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError:
            free = 0
        if free < room:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
    try:
        with quiet_hdf5_failures():
            f.close()
    except Exception:
        abandon_hdf5(f, path)


def _descriptor(f: Any) -> int | None:
    """The POSIX descriptor of HDF5's default (sec2) driver, else None."""
    try:
        fd = f.id.get_vfd_handle()
    except Exception:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV}


@contextlib.contextmanager
def reserved_room(f: Any, nbytes: int) -> Iterator[None]:
    """Allocate ``nbytes`` past the end of the open HDF5 file ``f`` before writing into it.

    A disk that filled since the free-space check (another process, a quota, a file size limit)
    then fails here, with an ``OSError`` before HDF5 has written a byte, instead of inside HDF5.
    After a write that succeeded (flushed by the caller), the unused part is given back. Files
    without a POSIX descriptor, and filesystems without ``posix_fallocate``, are written unreserved.
    """
    fd = _descriptor(f)
    if fd is None:
        yield
        return
    start = os.fstat(fd).st_size
    try:
        os.posix_fallocate(fd, start, max(int(nbytes), 1))
        reserved = True
    except OSError as exc:
        _shrink(fd, start)  # an emulated allocation may have extended the file partway
        if exc.errno not in _UNSUPPORTED:
            raise
        reserved = False
    yield
    if reserved:  # only after success: a failed write's file is abandoned, never touched again
        _shrink(fd, max(int(f.id.get_filesize()), start))


def _shrink(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)


_hooks_lock = threading.Lock()
_hooks_depth = 0
_sticky = False
_saved_hooks: tuple[Any, Any] | None = None


def _install_filters() -> None:
    global _saved_hooks
    if _hooks_depth == 0:
        _saved_hooks = (sys.excepthook, sys.unraisablehook)
        sys.excepthook, sys.unraisablehook = _filtered_excepthook, _filtered_unraisablehook


def _restore_if_idle() -> None:
    global _saved_hooks
    if _hooks_depth == 0 and _saved_hooks is not None:
        if sys.excepthook is _filtered_excepthook:
            sys.excepthook = _saved_hooks[0]
        if sys.unraisablehook is _filtered_unraisablehook:
            sys.unraisablehook = _saved_hooks[1]
        _saved_hooks = None


@contextlib.contextmanager
def quiet_hdf5_failures() -> Iterator[None]:
    """Silence h5py's ``Exception ignored in ... ObjectID.__dealloc__`` tracebacks while writing.

    When a write fails, h5py frees its temporary HDF5 objects, each free fails too, and Cython prints
    each failure (through ``sys.excepthook`` and ``sys.unraisablehook``) where no caller can catch it;
    the failure itself is raised and reported in one line. Other exceptions still reach the hooks.
    Nested and threaded use share one installation.
    """
    global _hooks_depth
    with _hooks_lock:
        _install_filters()
        _hooks_depth += 1
    try:
        yield
    finally:
        with _hooks_lock:
            _hooks_depth -= 1
            _restore_if_idle()


def _from_h5py_dealloc(tb: Any, where: Any = None) -> bool:
    if "h5py" in str(where or "") and "__dealloc__" in str(where or ""):
        return True
    while tb is not None:
        code = tb.tb_frame.f_code
        if "h5py" in code.co_filename and "__dealloc__" in code.co_name:
            return True
        tb = tb.tb_next
    return False


def _filtered_excepthook(exc_type: Any, exc: Any, tb: Any) -> None:
    if not _from_h5py_dealloc(tb):
        (_saved_hooks[0] if _saved_hooks else sys.__excepthook__)(exc_type, exc, tb)


def _filtered_unraisablehook(unraisable: Any) -> None:
    if not _from_h5py_dealloc(unraisable.exc_traceback, unraisable.object):
        (_saved_hooks[1] if _saved_hooks else sys.__unraisablehook__)(unraisable)
