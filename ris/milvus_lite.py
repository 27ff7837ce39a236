"""Milvus Lite's data folder: what ris refuses to use as one, and why Milvus Lite could not open it
(pymilvus says only 'Open local milvus failed')."""
from __future__ import annotations

import os


def foreign_folder(uri: str) -> bool:
    """A non-empty folder without Milvus Lite's LOCK or collections/: the user's own files, which
    Milvus Lite would write its data among."""
    try:
        entries = set(os.listdir(uri))
    except OSError:
        return False  # unreadable: Milvus Lite's open says why
    return bool(entries) and not entries & {"LOCK", "collections"}


def lite_open_problem(uri: str) -> str | None:
    """Why Milvus Lite could not open the folder ``uri``: pymilvus says only 'Open local milvus
    failed' (Milvus Lite logs its reason), whether another process holds the folder's lock or the
    place cannot be written. Redo its first steps (make the folder, open and lock its LOCK file)
    to tell which; None if they succeed (the reason is elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: Milvus Lite locks with msvcrt there
        return None
    try:
        os.makedirs(uri, exist_ok=True)
        fd = os.open(os.path.join(uri, "LOCK"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        return f"{exc.strerror or exc} ({exc.filename or uri})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "another process is using it (Milvus Lite lets one process at a time open a .db folder)"
    except OSError as exc:
        return f"cannot lock its LOCK file: {exc.strerror or exc}"
    finally:
        os.close(fd)  # closing also drops the lock, if this probe got it
    return None
