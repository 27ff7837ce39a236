"""Collections change: removing images from a database, and ``ris-extract --sync``.

Design (README "Collections change"): every image has a stable id (``ids``, assigned once by the
writer, never reused). Removing images rewrites the database without their rows to
``<db>.rewrite`` under the writer lock and renames it into place, so readers see the old
database or the new one, never a torn one, and a killed removal leaves the old one untouched
(its leftover is deleted by the next writer). The removed ids are appended to the database's
``removed_ids`` log and its lineage and content history are kept, so every saved index (HNSW,
IVF-PQ, Milvus) follows by replaying the log (``mark_deleted``, ``remove_ids``, ``delete``)
instead of being rebuilt; caches that cannot follow (embeddings, DBA, thumbnails) are deleted.

``--sync``: images whose file is gone are removed; images whose file changed since its row was
written (mtime or ctime newer than the row's ``added_at``, the time its run began reading), or that
is another file (size or mtime other than its row's ``file_stamp``, ``ris.filestamp``), are
removed and extracted again, unless its bytes still have its row's digest (``ris.filestamp``: a
``cp -a``, ``chmod`` or ``touch`` changes times, not photos): that row and its id are kept, and its
times and stamp refreshed in the same atomic rewrite; new files are extracted (an ``--append`` with the database's own
settings); failed images still there are retried unless they still fail the same way; rows a resumed (killed) sync kept of files
deleted since are removed at the end.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from ris.cli.common import one_line
from ris.decoding import fails_as_before
from ris.errors import DatabaseError, RisError
from ris.featuredb import ROW_DATASETS, FeatureDB, encode_names
from ris.h5write import hdf5_writing
from ris.labels import LABEL_MODES
from ris.sidecars import WriterLock, clear_sidecars, database_file, ensure_room, fsync_dir, fsync_file, new_content_id, rewrite_path

HISTORY_LIMIT = 200  # content ids kept: an index older than that many changes is rebuilt
_ROW_DATASETS = ("features", "image_ids", "labels", *ROW_DATASETS)
_BLOCK = 65536


@dataclass
class RemoveSummary:
    features_db: str
    removed: list[str] = field(default_factory=list)  # images whose rows were removed
    removed_failed: list[str] = field(default_factory=list)  # entries dropped from the failed list
    not_found: list[str] = field(default_factory=list)
    rows: int = 0  # rows after
    refreshed: int = 0  # rows kept whose added_at and file_stamp were refreshed

    def to_dict(self) -> dict:
        return asdict(self)


def names_in_list(path: str | Path) -> list[str]:
    """The relative paths listed in a text file, one a line (``ris-index remove --from-file``).
    UTF-8 (names not valid UTF-8 kept byte for byte); UTF-8 or UTF-16 with a byte-order mark, as
    Windows Notepad saves, decoded by the mark: read as UTF-8, UTF-16 matched no name. A list
    still holding NUL bytes (UTF-16 without a mark) is refused: no file name holds one."""
    from ris.imagefile import read_file

    data = read_file(path)
    codec = next((c for bom, c in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
                  if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec, errors="surrogateescape" if codec.startswith("utf-8") else "strict")
    except UnicodeDecodeError as exc:
        raise RisError(f"{path}: not a list of names in UTF-16, though it starts with UTF-16's byte-order mark "
                       f"({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise RisError(f"{path}: holds NUL bytes, which no file name has: save the list as UTF-8 "
                       "(UTF-16 is read only with its byte-order mark)")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def remove_images(features_db: str | Path, image_ids: Iterable[str], lock: WriterLock | None = None,
                  refresh: dict[int, tuple[float, int, int]] | None = None,
                  attrs: dict[str, str] | None = None) -> RemoveSummary:
    """Remove these images (relative paths as stored) from the database and its failed list.

    Takes the writer lock (or uses ``lock``, already held); rewrites and renames atomically.
    ``refresh``: row id -> (added_at, size, mtime_ns) for kept rows whose file was found unchanged
    (``plan_sync``); with nothing removed, the rewrite keeps the content id (the same rows).
    ``attrs``: attributes to set (``--sync``'s ``dataset_root`` of a moved folder), the rows unchanged.
    """
    own = lock is None
    lock = WriterLock(features_db).acquire() if own else lock
    try:
        return _rewrite_without(database_file(features_db), set(image_ids), refresh or {}, attrs or {})
    finally:
        if own:
            lock.release()


def _rewrite_without(path: Path, names: set[str], refresh: dict[int, tuple[float, int, int]],
                     attrs: dict[str, str]) -> RemoveSummary:
    tmp = rewrite_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed removal: we hold the lock, it is ours to drop
    summary = RemoveSummary(str(path))
    with FeatureDB(path) as db:
        ids_now = db.image_ids
        keep = np.array([n not in names for n in ids_now], dtype=bool)
        failures = db.failures
        failed_keep = [(i, r) for i, r in failures if i not in names]
        summary.removed = [n for n, k in zip(ids_now, keep) if not k]
        summary.removed_failed = [i for i, _ in failures if i in names]
        summary.not_found = sorted(names - set(summary.removed) - set(summary.removed_failed))
        summary.rows = int(keep.sum())
        refreshed = {i for i in db.row_ids[keep].tolist() if i in refresh}
        same = bool(keep.all()) and len(failed_keep) == len(failures)
        attrs = {k: v for k, v in attrs.items() if db.attrs.get(k) != v}
        if same and not refreshed and not attrs:
            return summary
        removed_ids = db.row_ids[~keep]
        need = path.stat().st_size
        ensure_room(path.parent, need, "to rewrite the database without the removed images")
        try:
            with hdf5_writing(tmp, reserve=need) as out:
                _copy_kept(db, out, keep, failed_keep, removed_ids, {i: refresh[i] for i in refreshed}, same)
                out.attrs.update(attrs)
            fsync_file(tmp)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):  # no room (a quota, a size limit), an I/O error
                raise DatabaseError(f"{path}: could not rewrite it without the removed images "
                                    f"({exc.strerror or exc}); it is unchanged") from None
            raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    summary.refreshed = len(refreshed)
    if not same:
        clear_sidecars(path, keep_indexes=True)  # indexes replay the removal log; the other caches go
    return summary


def _copy_kept(db: FeatureDB, out: h5py.File, keep: np.ndarray, failed_keep: list, removed_ids: np.ndarray,
               refresh: dict[int, tuple[float, int, int]], same: bool) -> None:
    src = db.f
    n, kept = len(keep), int(keep.sum())
    for k, v in src.attrs.items():
        out.attrs[k] = v
    row_data = {"ids": db.row_ids, "added_at": db.added_at, "file_stamp": db.file_stamps,  # made here for
                "file_digest": db.file_digests}  # databases older than them
    if refresh:
        for r in np.flatnonzero(np.isin(row_data["ids"], list(refresh))):
            t, size, mtime_ns = refresh[int(row_data["ids"][r])]
            row_data["added_at"][r], row_data["file_stamp"][r] = t, (size, mtime_ns)
    for name in _ROW_DATASETS:
        d = src[name] if name in src else None
        like = d if d is not None else row_data[name]
        chunks = d.chunks if d is not None and d.chunks else ((4096, *like.shape[1:]) if d is None else None)
        ds = out.create_dataset(name, shape=(kept, *like.shape[1:]), maxshape=(None, *like.shape[1:]),
                                dtype=like.dtype, chunks=chunks or True)
        source = row_data[name] if d is None or (refresh and name in ("added_at", "file_stamp")) else d
        w = 0
        for s in range(0, n, _BLOCK):
            e = min(s + _BLOCK, n)
            block = source[s:e][keep[s:e]]
            ds[w : w + len(block)] = block
            w += len(block)
    str_dt = h5py.string_dtype("utf-8")
    for name, values in (("failed_ids", [i for i, _ in failed_keep]), ("failed_reasons", [r for _, r in failed_keep])):
        out.create_dataset(name, data=encode_names(values) if values else np.zeros(0, dtype=object),
                           dtype=str_dt, maxshape=(None,), chunks=(256,))
    log = np.concatenate([db.removed_ids, np.asarray(removed_ids, np.int64)])
    out.create_dataset("removed_ids", data=log, maxshape=(None,), chunks=(4096,))
    for name in src:  # label_names and anything a later version adds
        if name not in out:
            src.copy(src[name], out, name=name)
    if same:  # only times and stamps refreshed: the same rows, so every cache made from them holds
        out.attrs.update(complete=True, content_id=db.content_id, lineage_id=db.lineage, next_id=db.next_id)
        return
    history = (db.content_history + [db.content_id])[-HISTORY_LIMIT:]
    out.attrs.update(rows_done=kept, failed_done=len(failed_keep), num_images=kept, num_failed=len(failed_keep),
                     complete=True, content_id=new_content_id(), content_history=json.dumps(history),
                     lineage_id=db.lineage, next_id=db.next_id, run_kind="remove")


# -- sync ----------------------------------------------------------------------------------------

@dataclass
class SyncSummary:
    features_db: str
    dataset: str
    removed: list[str] = field(default_factory=list)  # files gone
    replaced: list[str] = field(default_factory=list)  # files changed: extracted again
    kept: int = 0  # files with new times but the same bytes: their rows and ids kept
    retried: list[str] = field(default_factory=list)  # failed images still there, tried again
    added: int = 0  # rows extracted (new and replaced)
    skipped: list = field(default_factory=list)  # (image, reason) that could not be decoded
    rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _changed_since(path: Path, t: float) -> bool:
    """Whether the file, or the symlink that names it, changed after ``t``: a link pointed at
    another photo keeps its name and its old target's times, so the link's own times count too."""
    try:
        st, link = os.stat(path), os.lstat(path)
    except OSError:
        return True
    return not math.isnan(t) and max(st.st_mtime, st.st_ctime, link.st_mtime, link.st_ctime) > t


def plan_sync(features_db: str | Path, dataset: str | Path | None = None):
    """(root, files, gone, changed, retry, new) for ``sync_database``; reads only the files it must
    hash. Changed: newer than its row, or another file than the one read (``ris.filestamp``: same
    names, older files), and not of the bytes its row's digest names."""
    return _plan(features_db, dataset)[:6]


def _plan(features_db: str | Path, dataset: str | Path | None):
    """``plan_sync``'s tuple, the rows kept by their digest (row id -> (added_at, size, mtime_ns)) and
    the failed images that still fail the same way (id -> reason), kept as they are, and the folders
    that could not be listed ('x/' -> why): their rows are kept, neither gone nor checked."""
    from ris import filestamp
    from ris.images import in_unlisted, scan_folder

    with FeatureDB(features_db) as db:
        root = Path(dataset or db.dataset_root or "")
        if not root.is_dir():
            raise RisError(f"{root}: not a folder; give the images' folder with --dataset "
                           f"(the database says {db.dataset_root!r})")
        names, added_at, stamps, failures = db.image_ids, db.added_at, db.file_stamps, db.failures
        row_ids, digests, decoding = db.row_ids, db.file_digests, _decoding(db.attrs)
    failed = [i for i, _ in failures]
    scan = scan_folder(root)
    files, unlisted = scan.images, scan.unlisted
    present = set(files)
    gone = [n for n in [*names, *failed] if n not in present and not in_unlisted(n, unlisted)]
    began = time.time()  # before any file is hashed: a change after the hash is newer than the refreshed row
    changed, refresh = [], {}
    for n, rid, t, s, d in zip(names, row_ids.tolist(), added_at, stamps, digests):
        path = root / n
        if n not in present or not (_changed_since(path, float(t)) or filestamp.differs(s, path)):
            continue
        now = filestamp.file_stamp(path)  # before the hash, as an extraction takes it
        if filestamp.same_content(d, path):
            refresh[rid] = (began, *now)
        else:
            changed.append(n)
    # every failed image still there is decoded again: whether it was fixed cannot be told from the
    # database file's time, which any later rewrite (an --append, a removal) moves on. One that still
    # fails the same way keeps its entry: retried, it cost two rewrites and the caches every --sync
    still = {i: why for i, r in failures if i in present and decoding
             and (why := fails_as_before(root, i, r, *decoding)) is not None}
    retry = [i for i in failed if i in present and i not in still]
    kept = (set(names) | set(failed)) - set(gone) - set(changed) - set(retry)
    new = [f for f in files if f not in kept]
    return root, files, gone, changed, retry, new, refresh, still, unlisted


def _decoding(attrs) -> tuple[int, str] | None:
    """(size, aspect) the database's images are decoded at, as its extraction decodes them; None
    when its recipe cannot be read (its failed images are then all retried)."""
    from ris.extractor import ExtractConfig

    try:
        config = ExtractConfig.from_attrs(attrs)
        parts = getattr(config, "parts", (config,))
        aspect = "keep" if any(getattr(p, "aspect", "squash") == "keep" for p in parts) else "squash"
        return max(max(p.scale_sizes()) for p in parts), aspect
    except Exception:  # a hand-made or damaged recipe: the extraction that follows says what is wrong
        return None


def sync_database(features_db: str | Path, dataset: str | Path | None = None, labels: str | None = None,
                  batch_size: int = 32, workers: int | None = None, progress: bool = True,
                  log=lambda s: print(s, file=sys.stderr), ray_options=None) -> SyncSummary:
    """Bring the database in step with its folder (see the module docstring). ``ray_options``
    (a ``ris.ray_cluster.RayOptions``): the new images are extracted on that Ray cluster. The
    writer lock is held from before the plan to the end: another writer (a second --sync planned at
    the same moment) is refused before this one reads anything, or this one before it does."""
    with WriterLock(features_db) as lock:
        return _sync(lock, features_db, dataset, labels, batch_size, workers, progress, log, ray_options)


class _Lent:
    """The sync's lock lent to its extraction: the writer's release leaves it held."""

    def __init__(self, lock: WriterLock):
        self.lock = lock

    def release(self) -> None:
        pass


def _sync(lock: WriterLock, features_db, dataset, labels, batch_size, workers, progress, log,
          ray_options) -> SyncSummary:
    root, files, gone, changed, retry, new, refresh, still, unlisted = _plan(features_db, dataset)
    present = set(files)
    for folder, why in unlisted.items():
        log(f"warning: {one_line(str(root / folder.rstrip('/')))}: cannot list this folder ({why}); "
            "its rows are kept as they are")
    with FeatureDB(features_db) as db:
        mode = _label_mode(features_db, str(db.attrs.get("labels_mode") or ""), labels)
        stored_root = db.dataset_root
    if new:  # a new image the database's labels cannot name stops the sync before anything changes
        from ris.labels import make_labels

        try:
            make_labels(files, mode, root)
        except RisError as exc:
            raise RisError(f"{features_db}: nothing was changed: {str(exc).split('; use --labels')[0]}; this "
                           f"database's images are labelled by --labels {mode} and --sync labels new ones the same "
                           "way: rename or move that file, or extract the folder again into a new --features-db "
                           "with other --labels") from None
    summary = SyncSummary(str(features_db), str(root), removed=gone, replaced=changed, retried=retry,
                          skipped=sorted(still.items()))
    for reason in summary.skipped:
        log(f"skipped: {one_line(reason[1])}")
    # a moved folder (--dataset) is recorded, or the next --sync, thumbnails and --verify look in the old one;
    # an extraction of new files records it itself
    here = os.path.abspath(root)  # links kept: a folder link pointed elsewhere is followed by the next --sync
    moved = {"dataset_root": here} if stored_root != here and not new else {}
    if gone or changed or retry or refresh or moved:  # one atomic rewrite removes rows, refreshes the kept ones
        r = remove_images(features_db, set(gone) | set(changed) | set(retry), lock, refresh=refresh, attrs=moved)
        if moved:
            log(f"{features_db}: its images' folder is now {moved['dataset_root']} (was {stored_root})")
        if gone or changed or retry:
            log(f"{features_db}: removed {len(r.removed)} row(s) ({len(gone)} gone, {len(changed)} changed), "
                f"{len(r.removed_failed)} failed entr(ies) to retry or forget")
        if r.refreshed:
            summary.kept = r.refreshed
            log(f"{features_db}: {r.refreshed} file(s) with new times but the same content kept their rows")
    if new:
        from ris.extractor import ExtractConfig

        if unlisted:  # said above, for --sync: the extraction's own line on those folders would say it again
            from ris.run_input import without_unlisted_warnings

            log = without_unlisted_warnings(log)

        with FeatureDB(features_db) as db:
            config = ExtractConfig.from_attrs(db.attrs, str(features_db))
        if ray_options is not None:
            from ris.ray_engine import extract_on_ray

            s = extract_on_ray(root, features_db, config, labels=mode, batch_size=batch_size, append=True,
                               progress=progress, log=log, options=ray_options, lock=_Lent(lock))
        else:
            from ris.extract import ExtractOptions, extract_features

            options = ExtractOptions(labels=mode, batch_size=batch_size, workers=workers, append=True,
                                     progress=progress, log=log, lock=_Lent(lock))
            s = extract_features(root, features_db, config, options)
        summary.added, summary.skipped = s.extracted, summary.skipped + list(s.skipped)
        # a killed sync's .partial was resumed with rows of files deleted since: they go too
        from ris.images import in_unlisted

        with FeatureDB(features_db) as db:
            stale = [n for n in [*db.image_ids, *(i for i, _ in db.failures)]
                     if n not in present and not in_unlisted(n, unlisted)]
        if stale:
            remove_images(features_db, set(stale), lock)
            summary.removed = sorted(set(summary.removed) | set(stale))
            log(f"{features_db}: removed {len(stale)} row(s) a resumed run had kept of files deleted since")
    with FeatureDB(features_db) as db:
        summary.rows = len(db)
    return summary


def _label_mode(features_db, stored: str, asked: str | None) -> str:
    """The labels --sync gives new images: the database's own (``labels_mode``). A ``--labels``
    that differs is refused: stored, it would label every later sync's images another way than
    the rows already there, and scoring would mix the two."""
    if asked and stored and asked != stored:
        same_file = stored not in LABEL_MODES and Path(asked).resolve() == Path(stored).resolve()
        if not same_file:
            raise RisError(f"{features_db}: its images are labelled by --labels {stored}; --sync labels new ones "
                           f"the same way, not by --labels {asked}: leave --labels out, or extract the folder again "
                           "into a new --features-db with the labels you want")
    return stored or asked or "auto"


def sync_main(args) -> int:
    """``ris-extract --sync``: the CLI's part (prints a summary, or JSON with --json)."""
    from ris.cli.common import print_json
    from ris.index import follow_saved_indexes

    ray_options = None
    if args.engine == "ray":
        from ris.ray_cluster import RayOptions

        ray_options = RayOptions(address=args.ray_address, actors=args.ray_actors)
    s = sync_database(args.features_db, args.dataset, labels=None if args.labels == "auto" else args.labels,
                      batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                      ray_options=ray_options)
    follow_saved_indexes(args.features_db)
    if args.json:
        print_json(s.to_dict())
    else:
        print(f"{s.features_db}: in step with {s.dataset}: {len(s.removed)} removed (file gone), "
              f"{len(s.replaced)} replaced (file changed), {s.added} extracted, {len(s.skipped)} skipped; "
              f"{s.rows} images")
        for image, reason in s.skipped:
            print(f"  skipped: {reason}")
    return 0
