"""Writing the HDF5 feature database: atomic, resumable, one writer at a time.

Batches go to ``<name>.partial`` under an exclusive ``<name>.lock`` (``ris.sidecars.WriterLock``)
and become ``<name>`` by an atomic rename only when complete, so a database under its final name
is never half-written and two writers never share one. ``rows_done`` is bumped only after a batch
is flushed, which makes an interrupted run resumable from the last good batch; every change draws
a new ``content_id``, the key of every cache kept beside the database. The layout is described in
``ris.featuredb``.

A resume never writes into the file an interrupted run left; it continues in a copy of the rows
committed there whose batch checksums hold (``ris.partial``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from ris.errors import DatabaseError
from ris.featuredb import (FINGERPRINT_KEYS, FORMAT_VERSION, REQUIRED_DATASETS, ROW_DATASETS, STR, FeatureDB,
                           _attr_value, _plain, check_target, create_layout, create_row_datasets, decode_names,
                           encode_names, fingerprint, partial_path, unique_names)
from ris.partial import COMMITS, Damaged, batch_crc, copy_committed, create_commits
from ris.recipe_diff import recipe_refusal
from ris.h5write import abandon_hdf5, close_hdf5, quiet_hdf5_failures, reserved_room
from ris.imagefile import human_bytes
from ris.index_state import replaced_lineages
from ris.sidecars import WriterLock, clear_sidecars, database_file, ensure_room, fsync_dir, fsync_file, new_content_id

_ROWS = REQUIRED_DATASETS + ROW_DATASETS  # one entry per image


class FeatureWriter:
    """Appends batches to ``<path>.partial``; ``finish()`` renames it into place.

    Holds ``<path>.lock`` from construction to ``finish``/``close``/``discard`` (a ``lock`` passed
    in, already acquired, is taken over). ``append``: continue from the finished database;
    ``overwrite``: build a new one that replaces it at ``finish`` (the old one stays usable until then).
    ``log`` hears about long setup work (the copy a resume makes), ``progress`` shows it as bars.
    """

    def __init__(self, path: str | Path, attrs: dict[str, Any], feature_shape: tuple[int, ...],
                 label_names: list[str], append: bool = False, overwrite: bool = False, resume: bool = True,
                 lock: WriterLock | None = None, log: Callable[[str], None] | None = None, progress: bool = False):
        self.read_since = time.time()  # rows' added_at: before their files were read (decoded ahead)
        self.path = database_file(path)  # through a symlink: the link keeps naming the database
        self.tmp = partial_path(self.path)
        # every fingerprint key is written (None as 'none'): readers require them all
        self.attrs = {**{k: None for k in FINGERPRINT_KEYS}, **attrs, "feature_shape": list(feature_shape)}
        self.resumed_rows = 0
        self.committed = 0  # rows committed, counted here
        self.discarded_partial: str | None = None
        self.f: h5py.File | None = None
        self.log = log or (lambda line: None)
        self.progress = progress
        check_target(self.path, append, overwrite)  # before the lock: no .lock beside a directory
        self.path.parent.mkdir(parents=True, exist_ok=True)  # --features-db out/feats.h5 makes out/
        self.lock = lock if lock is not None else WriterLock(self.path).acquire()
        try:
            check_target(self.path, append, overwrite)  # again: another writer may have finished meanwhile
            self.base_id, self.base_rows = _finished_base(self.path) if append and self.path.exists() else (None, 0)
            self.kind = "append" if self.base_id is not None else ("overwrite" if overwrite else "create")
            if resume and self.tmp.exists():
                self._try_resume()
            elif self.tmp.exists():
                self._discard_partial("not resumed")
            if self.f is None:
                self._start(feature_shape)
            self._set_label_names(label_names)
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------
    def _try_resume(self) -> None:
        """Continue the partial left by an interrupted run of the same kind; discard any other."""
        try:
            with h5py.File(self.tmp, "r") as f:
                kind, base = f.attrs.get("run_kind"), f.attrs.get("base_content_id")
        except Exception as exc:  # killed mid-write: HDF5 metadata may be damaged
            return self._discard_partial(f"it was damaged ({exc})", damaged=True)
        kind, base = _plain(kind), _plain(base)
        fresh = ("create", "overwrite")
        if kind is None and self.kind == "overwrite":  # made before runs were marked
            return self._discard_partial("it was left by a run without --overwrite")
        if kind is not None and (kind in fresh) != (self.kind in fresh):
            return self._discard_partial(f"it was left by {'an --append' if kind == 'append' else 'a new'} run")
        if self.kind == "append" and base is not None and base != self.base_id:
            return self._discard_partial(f"it was an --append onto {self.path} before that changed")
        try:
            copy_committed(self.tmp, self.attrs, self.path, self.base_rows, self.log, self.progress)
        except Damaged as exc:
            return self._discard_partial(f"it was damaged ({exc})", damaged=True)
        except DatabaseError:
            raise
        except Exception as exc:  # writing the copy failed (a full disk): the committed rows stay
            raise DatabaseError(f"{self.tmp}: could not copy its committed rows into a new file to resume "
                                f"({_os_reason(exc)}); it is kept: run again once that is fixed") from None
        try:
            self._open_existing()
        except DatabaseError:
            raise
        except Exception as exc:
            self._discard_partial(f"it was damaged ({exc})", damaged=True)

    def _discard_partial(self, why: str, damaged: bool = False) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        self.tmp.unlink()  # we hold the lock: this partial is ours to discard
        self.discarded_partial = f"discarded {self.tmp}: {why}"
        if damaged:
            self.damaged_partial = why

    def _start(self, feature_shape: tuple[int, ...]) -> None:
        if self.kind == "append":  # continue from a copy of the finished database
            ensure_room(self.tmp.parent, self.path.stat().st_size, f"to copy {self.path.name} for --append")
            try:
                shutil.copyfile(self.path, self.tmp)
            except OSError as exc:  # a quota or a size limit the free-space check cannot see
                self.tmp.unlink(missing_ok=True)
                raise DatabaseError(f"{self.tmp}: could not copy {self.path.name} to append to it "
                                    f"({exc.strerror or exc}); {self.path} is unchanged: free space and run the "
                                    "same command again") from None
            self._open_existing(fresh_copy=True)
            history = json.loads(_plain(self.f.attrs.get("content_history", "[]")))
            self.f.attrs["content_history"] = json.dumps((history + [self.base_id])[-200:])  # HDF5 attrs are small
            self._mark_run()
            return
        failure = None
        with quiet_hdf5_failures():  # a disk that filled while the model was built: one line, nothing left
            try:
                ensure_room(self.tmp.parent, 0, "to create the database")
                self._create(feature_shape)
                self._mark_run()
            except Exception as exc:
                failure = _os_reason(exc)
                if isinstance(exc, OSError) and exc.filename == str(self.tmp.parent):  # ensure_room's refusal
                    failure = f"{exc.filename}: {failure}"
                exc.__traceback__ = None  # h5py's objects go now, while their failing dealloc is silenced
                if self.f is not None:
                    abandon_hdf5(self.f, self.tmp)
                    self.f = None
                self.tmp.unlink(missing_ok=True)
        if failure is not None:
            if not failure.startswith(f"{self.tmp.parent}: "):
                failure = f"{self.tmp}: could not create the database ({failure})"
            raise DatabaseError(f"{failure}; nothing was written: free space and run the same command again")

    def _mark_run(self) -> None:
        self.f.attrs["run_kind"] = self.kind
        if self.base_id is not None:
            self.f.attrs["base_content_id"] = self.base_id
        self.f.flush()

    def _create(self, feature_shape: tuple[int, ...]) -> None:
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.tmp, "w")
        create_layout(f, feature_shape)
        create_commits(f)
        for k, v in self.attrs.items():
            f.attrs[k] = _attr_value(v)
        f.attrs.update(format_version=FORMAT_VERSION, rows_done=0, failed_done=0, complete=False, next_id=0,
                       content_id=new_content_id(), content_history="[]", lineage_id=new_content_id())
        self.f = f

    def _open_existing(self, fresh_copy: bool = False) -> None:
        f = h5py.File(self.tmp, "r+")
        try:
            old = fingerprint(dict(f.attrs))
            new = fingerprint(self.attrs)
            if old != new:
                raise recipe_refusal(self.path if self.kind == "append" else self.tmp, old, new)
            rows = int(f.attrs.get("rows_done", 0))
            create_row_datasets(f, rows)  # those a file made before them lacks
            if COMMITS not in f:  # a finished database copied for --append, or a partial made before them
                create_commits(f)
            for name in _ROWS:
                f[name].resize(rows, axis=0)
            nfail = int(f.attrs.get("failed_done", 0))
            for name in ("failed_ids", "failed_reasons"):
                f[name].resize(nfail, axis=0)
        except Exception:
            f.close()
            if fresh_copy:
                self.tmp.unlink(missing_ok=True)  # our own copy of the base: nothing lost
            raise
        f.attrs["complete"] = False
        if "content_id" not in f.attrs:  # made before content ids
            f.attrs["content_id"] = new_content_id()
        if "lineage_id" not in f.attrs:  # made before lineages: as FeatureDB.lineage reads it
            history = json.loads(_plain(f.attrs.get("content_history", "[]")) or "[]")
            f.attrs["lineage_id"] = history[0] if history else _plain(f.attrs["content_id"])
        ids = f["ids"]
        f.attrs["next_id"] = max(int(f.attrs.get("next_id", 0)), int(ids[-1]) + 1 if rows else 0)
        for k, v in self.attrs.items():
            if k not in FINGERPRINT_KEYS:
                f.attrs[k] = _attr_value(v)
        self.f = f
        self.resumed_rows = self.committed = rows

    def _set_label_names(self, names: list[str]) -> None:
        old = decode_names(self.f["label_names"][:]) if "label_names" in self.f else []
        merged = old + [n for n in names if n not in set(old)]
        if merged != old or "label_names" not in self.f:
            if "label_names" in self.f:
                del self.f["label_names"]
            self.f.create_dataset("label_names", data=encode_names(merged), dtype=STR)
            self._changed()
        self.label_index = {n: i for i, n in enumerate(merged)}

    def _changed(self) -> None:
        """Any change makes every cache made from the old content stale: new content key."""
        self.f.attrs.modify("content_id", new_content_id())

    # -- writing -------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        named = self.path if self.kind == "append" else self.tmp  # the file a repeated id came from
        return set(unique_names(self.f["image_ids"][:], named)) | set(decode_names(self.f["failed_ids"][:]))

    def failures(self) -> list[tuple[str, str]]:
        """(id, reason) of the images recorded as failed so far (an --append's base's included)."""
        return list(zip(decode_names(self.f["failed_ids"][:]), decode_names(self.f["failed_reasons"][:])))

    def add(self, ids: list[str], features: np.ndarray, label_names: list[str], stamps: Any = None,
            digests: Any = None) -> None:
        """Append one batch and flush; ``label_names`` per row ('' = unknown); ``stamps``: (n, 2) file
        stamps, ``digests`` (n,) file digests, taken before reading (``ris.filestamp``; None: unknown)."""
        n = len(ids)
        if n == 0:
            return
        features = features.astype(np.float32, copy=False)
        chunk = self.f["features"].chunks
        need = 2 * (features.nbytes + 4 * int(np.prod(chunk, dtype=np.int64)))
        self._check_space(need)
        with self._room(need + (1 << 20)), self._writing():
            rows = int(self.f.attrs["rows_done"])
            first = int(self.f.attrs["next_id"])
            for name in _ROWS:
                self.f[name].resize(rows + n, axis=0)
            names, labels = encode_names(ids), np.array([self.label_index.get(l, -1) for l in label_names], np.int64)
            self.f["features"][rows:] = features
            self.f["image_ids"][rows:] = names
            self.f["labels"][rows:] = labels
            self.f["ids"][rows:] = np.arange(first, first + n, dtype=np.int64)
            self.f["added_at"][rows:] = self.read_since
            self.f["file_stamp"][rows:] = -1 if stamps is None else np.asarray(stamps, np.int64).reshape(n, 2)
            self.f["file_digest"][rows:] = 0 if digests is None else np.asarray(digests, np.uint64)
            crc = batch_crc(features, names, labels)  # of what was meant to be written
            commits = self.f[COMMITS]
            commits.resize(len(commits) + 1, axis=0)
            commits[-1] = (rows, rows + n, crc)
            self.f.flush()
            if batch_crc(*(self.f[k][rows:] for k in ("features", "image_ids", "labels"))) != crc:
                raise OSError("the batch read back different from what was written; is the disk full?")  # seen on one
            self.f.attrs.modify("rows_done", rows + n)  # in place: h5py's item assignment deletes and re-creates
            self.f.attrs.modify("next_id", first + n)
            self._changed()
            self.f.flush()
        self.committed = rows + n

    def add_failures(self, failures: Iterable[tuple[str, str]]) -> None:
        failures = list(failures)
        if not failures:
            return
        self._check_space(0)
        with self._room(1 << 20, "the failure list"), self._writing():
            n = int(self.f.attrs.get("failed_done", 0))
            for name in ("failed_ids", "failed_reasons"):
                self.f[name].resize(n + len(failures), axis=0)
            self.f["failed_ids"][n:] = encode_names(i for i, _ in failures)
            self.f["failed_reasons"][n:] = encode_names(r for _, r in failures)
            self.f.flush()
            self.f.attrs.modify("failed_done", n + len(failures))
            self._changed()
            self.f.flush()

    def _check_space(self, batch_bytes: int) -> None:
        """Stop before the disk is full: HDF5 that runs out of space mid-write cannot close its file
        (each later close fails again, and the process crashes at exit)."""
        try:
            ensure_room(self.tmp.parent, batch_bytes, "to write the next batch")
        except OSError as exc:
            raise DatabaseError(f"{exc.filename}: {exc.strerror}; {_kept(self.committed)} in {self.tmp.name}: free "
                                "space and run the same command again to resume") from None

    @contextlib.contextmanager
    def _room(self, nbytes: int, what: str = "the next batch") -> Iterator[None]:
        """Reserve the write's room on disk first (``ris.h5write.reserved_room``): a disk that filled
        since ``_check_space`` stops the writer here in one line, with its file intact and closable."""
        try:
            with reserved_room(self.f, nbytes):
                yield
        except OSError as exc:
            if self.f is None or exc.errno is None:  # the write itself failed: reported by _writing
                raise
            raise DatabaseError(f"{self.tmp}: could not reserve {human_bytes(nbytes)} for {what} "
                                f"({exc.strerror}); {_kept(self.committed)}: free space and run the same command "
                                "again to resume") from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that fails anyway (an I/O error, a disk that filled past the reservation) ends this
        writer in one line that says what is kept; the file is abandoned (``ris.h5write``)."""
        try:
            with quiet_hdf5_failures():
                yield
        except (DatabaseError, KeyboardInterrupt):
            raise
        except Exception as exc:
            abandon_hdf5(self.f, self.tmp)
            self.f = None
            raise DatabaseError(f"{self.tmp}: could not write ({_os_reason(exc)}); {_kept(self.committed)}: "
                                "run the same command again to resume once that is fixed") from None

    @property
    def rows(self) -> int:
        """Rows committed (counted here, so that it can be read after a failed write)."""
        return self.committed

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, rename into place, release the lock; caches of replaced content go."""
        with self._room(1 << 20, "finishing"), self._writing():
            for k, v in (extra_attrs or {}).items():
                self.f.attrs[k] = _attr_value(v)
            if self.kind == "overwrite" and self.path.is_file():  # its indexes elsewhere (Milvus) may go
                self.f.attrs["replaced_lineages"] = replaced_lineages(self.path)
            changed = self.kind != "append" or _plain(self.f.attrs["content_id"]) != self.base_id
            if changed:
                self._changed()
            if COMMITS in self.f:
                del self.f[COMMITS]
            self.f.attrs["complete"] = True
            self.f.flush()
        with self._writing():
            self.f.close()
        self.f = None
        fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        if changed:  # appended rows extend the saved indexes; everything else is rebuilt on next use
            clear_sidecars(self.path, keep_indexes=self.kind == "append")
        self.lock.release()
        return self.path

    def close(self) -> None:
        """Leave the partial file for a later resume (closed without writing on a full disk:
        ``ris.h5write.close_hdf5``), and release the lock."""
        if self.f is not None:
            close_hdf5(self.f, self.tmp)
        self.f = None
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def discard(self) -> None:
        """Drop the partial file (nothing worth keeping), then release the lock."""
        if self.f is not None:
            self.f.close()
            self.f = None
        self.tmp.unlink(missing_ok=True)
        self.close()


def _kept(rows: int) -> str:
    return f"the {rows} images committed before are kept" if rows else "no images were committed yet"


def _os_reason(exc: BaseException) -> str:
    """The system's reason inside an HDF5 error ('No space left on device'), else its first line."""
    m = re.search(r"error message = '([^']+)'", str(exc))
    if m:
        return m.group(1)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _finished_base(path: Path) -> tuple[str, int]:
    """Content id and rows of the finished database at ``path``, after checking it is whole (--append)."""
    with FeatureDB(path) as db:
        return db.content_id, len(db)
