"""The extraction run: every image under a folder -> features in an HDF5 database; resumable.

What to extract is an ``ExtractConfig`` (``ris.extractor``, written into the database; a
``ris.fusion.FusionConfig`` for several backbones); how to run
it is an ``ExtractOptions`` (labels, batch size, decoding, append/overwrite, progress), which may
differ between runs of the same database. Decoding (``ris.decoding``) runs ahead of the model;
one batch stays in flight, so the next batch is dispatched before the previous one is collected
and written. The database is written through ``FeatureWriter``: under ``.partial`` and a writer
lock until complete, each batch committed, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import numbers
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ris.cli.common import one_line
from ris.errors import Interrupted, RisError, yes_no
from ris.interrupts import raise_interrupt as _raise_interrupt  # never dropped by a gc callback
from ris.extractor import ExtractConfig, FeatureExtractor, build_extractor
from ris.jpeg_noise import capture, warnings_for
from ris.run_input import RunInput, list_input, not_read_counts

if TYPE_CHECKING:
    from ris.fusion import FusedExtractor, FusionConfig

DEFAULT_BATCH = 32
DECODE_MODES = ("threads", "processes")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class ExtractOptions:
    """How to run an extraction, apart from what to extract (``ExtractConfig``).

    ``labels``: auto | ukbench | folders | none | a TSV path (``ris.labels.make_labels``).
    ``decode``: 'threads', or 'processes' (``workers`` worker processes; worth it on many cores
    feeding a GPU). ``workers``: default the CPU count (at most 8 threads). ``prefetch``: images
    decoded ahead of the model (default 4 batches). ``append``: add the images not yet in the
    database; ``overwrite``: replace it (it stays usable until the new one is complete).
    ``verbose``: log the run's settings, and list the files not read in the summary's report.
    ``log``: where warnings and progress notes go (stderr). ``lock``: the writer lock, held
    already (``--sync`` lends its own, held from its plan to its end).
    """

    labels: str | os.PathLike = "auto"
    batch_size: int = DEFAULT_BATCH
    workers: int | None = None
    decode: str = "threads"
    append: bool = False
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False
    prefetch: int | None = None
    log: Callable[[str], None] = field(default=_to_stderr, repr=False, compare=False)
    lock: Any = field(default=None, repr=False, compare=False)  # the writer lock, held already (--sync)

    def check(self) -> None:
        """Refuse settings that cannot run, before anything is read or locked."""
        if isinstance(self.labels, os.PathLike):  # a TSV as a Path: stored as its name (a Path made the HDF5 write fail)
            self.labels = os.fspath(self.labels)
        for name in ("append", "overwrite", "progress", "verbose"):
            setattr(self, name, yes_no(name, getattr(self, name)))
        if self.decode not in DECODE_MODES:
            raise RisError(f"decode must be 'threads' or 'processes', not {self.decode!r}")
        for name in ("batch_size", "workers", "prefetch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise RisError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.append and self.overwrite:
            raise RisError("append and overwrite exclude each other: add new images, or replace the database")

    def resolved_workers(self) -> int:
        cpus = os.cpu_count() or 2
        return self.workers or (cpus if self.decode == "processes" else min(8, cpus))


@dataclass
class ExtractSummary:
    features_db: str
    images_found: int
    extracted: int  # rows written in this run
    resumed: int  # rows already present from an earlier, interrupted run or --append
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    feature_shape: tuple[int, ...] = ()
    other_files: list[str] = field(default_factory=list)  # not read: extensions that are not images'
    hidden_files: list[str] = field(default_factory=list)  # not read: hidden files, hidden folders ('x/')
    # recorded as failed by an earlier run (before an interruption, or before an --append), not tried again:
    # images_found = extracted + resumed + len(skipped) + len(skipped_before)
    skipped_before: list[tuple[str, str]] = field(default_factory=list)
    unlisted_folders: list[str] = field(default_factory=list)  # not read: folders that could not be listed ('x/')

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        d["skipped"] = [{"image": i, "reason": r} for i, r in self.skipped]
        d["skipped_before"] = [{"image": i, "reason": r} for i, r in self.skipped_before]
        return d

    def report(self, verbose: bool = False) -> list[str]:
        """The closing summary for people: counts, each skipped image, the files not read
        (counted; listed with ``verbose``). Names are printed escaped (``one_line``): a file name
        holding a newline would split its line in two; ``to_dict`` keeps them as they are."""
        lines = [f"{one_line(self.features_db)}: {self.extracted} images extracted ({self.images_per_second:.1f} img/s)"
                 f"{f', {self.resumed} already there' if self.resumed else ''}, {len(self.skipped)} skipped, "
                 f"{f'{len(self.skipped_before)} skipped before (not tried again), ' if self.skipped_before else ''}"
                 f"features {'x'.join(map(str, self.feature_shape))}"]
        lines += [f"  skipped: {one_line(reason)}" for _, reason in self.skipped]
        lines += [f"  skipped before: {one_line(reason)}" for _, reason in self.skipped_before]
        counts = not_read_counts(self.other_files, self.hidden_files, self.unlisted_folders)
        if counts:
            lines.append(f"not read: {', '.join(counts)}{'' if verbose else ' (--verbose lists them)'}")
            if verbose:
                lines += [f"  not read ({'folder read already' if f.endswith('/') else 'extension'}): {one_line(f)}"
                          for f in self.other_files]
                lines += [f"  not read (hidden): {one_line(f)}" for f in self.hidden_files]
                lines += [f"  not read (cannot list): {one_line(f)}" for f in self.unlisted_folders]
        return lines


def extract_features(dataset: str | Path, features_db: str | Path, config: ExtractConfig | FusionConfig,
                     options: ExtractOptions | None = None, *,
                     extractor: FeatureExtractor | FusedExtractor | None = None) -> ExtractSummary:
    """Extract every image under ``dataset`` into ``features_db``; resumable and atomic.

    ``extractor``: an already built (and warmed-up) extractor to use instead of one built from
    ``config``; its own config is what is used and recorded. The run holds ``<features_db>.lock``
    throughout: a second writer of the same database is refused, naming this one. Ctrl-C or
    SIGTERM ends it with ``Interrupted``, the committed batches kept for the next run.
    """
    from ris.decoding import decode_budget

    opts = options or ExtractOptions()
    opts.check()
    budget = decode_budget()  # a bad RIS_DECODE_BUDGET is refused before anything is locked
    features_db = Path(features_db)
    run = list_input(dataset, opts.labels, features_db, opts.append, opts.overwrite)
    for line in [*run.warnings(), *([run.label_note] if run.label_note else [])]:
        opts.log(line)
    writer, extractor = _open_writer(features_db, config, opts, extractor, run.label_names,
                                     dataset_root=os.path.abspath(run.root), labels_mode=run.label_mode)
    try:
        todo = still_to_do(writer, run.files, features_db, opts.log)
        summary = ExtractSummary(str(features_db), len(run.files), 0, writer.resumed_rows,
                                 feature_shape=extractor.output_shape, other_files=run.other_files,
                                 hidden_files=run.hidden_files, skipped_before=skipped_before(writer, run.files),
                                 unlisted_folders=list(run.unlisted or {}))
        with capture():  # libjpeg's lines, named
            _run_batches(run.root, todo, extractor, writer, opts, budget, run.label_of, summary)
    except KeyboardInterrupt:
        rows = writer.rows
        writer.close()
        raise Interrupted(f"interrupted after {rows} images; run the same command again to resume "
                          f"(partial data kept in {writer.tmp})") from None
    except BaseException:
        writer.close()  # the committed batches stay in .partial; the lock is released
        raise
    finish_run(writer, run, summary)
    return summary


def still_to_do(writer, files: list[str], features_db: Path, log: Callable[[str], None]) -> list[str]:
    """The files a (resumed) run has left, saying so when it resumes or had to start over."""
    if writer.discarded_partial:
        log(f"warning: {writer.discarded_partial}; starting over")
    done = writer.done_ids()
    todo = [f for f in files if f not in done]
    if writer.resumed_rows:
        verb = "adding" if getattr(writer, "kind", None) == "append" else "resuming"  # --append, --sync
        log(f"{verb}: {writer.resumed_rows} images already in {features_db.name}, {len(todo)} to go")
    return todo


def skipped_before(writer, files: list[str]) -> list[tuple[str, str]]:
    """(id, reason) of the listed files an earlier run recorded as failed: counted and named in the
    summary, though not decoded again (a resumed run's first part, or the database --append adds to)."""
    listed = set(files)
    return [(i, r) for i, r in writer.failures() if i in listed]


def finish_run(writer, run: RunInput, summary: ExtractSummary, **attrs: Any) -> None:
    """Publish the database under its final name, or discard it when no image could be decoded."""
    if writer.rows == 0:
        writer.discard()
        not_finite = sum(1 for _, reason in summary.skipped if reason.endswith(NOT_FINITE))
        if not_finite:
            raise RisError(f"{run.root}: none of the {len(run.files)} images gave features ({not_finite} "
                           "gave non-finite ones; the skipped lines say why); nothing written")
        raise RisError(f"{run.root}: none of the {len(run.files)} images could be decoded; nothing written")
    writer.finish({"num_images": writer.rows, "num_failed": len(writer.done_ids()) - writer.rows,
                   "extract_seconds": round(summary.seconds, 3),
                   "images_per_second": round(summary.images_per_second, 2), **attrs})


def _open_writer(features_db: Path, config: ExtractConfig | FusionConfig, opts: ExtractOptions,
                 extractor: FeatureExtractor | FusedExtractor | None, label_names: list[str], **attrs: Any):
    """(writer, extractor): the lock is taken before the slow model build, and the writer takes it
    over; a failure on the way releases it."""
    from ris.featurewriter import FeatureWriter
    from ris.sidecars import WriterLock

    Path(features_db).parent.mkdir(parents=True, exist_ok=True)  # --features-db out/feats.h5 makes out/
    lock = opts.lock or WriterLock(features_db).acquire()
    try:
        if extractor is None:
            refuse_another_recipe(features_db, config, opts.append, opts.overwrite)
        extractor = extractor or build_extractor(config)
        writer = FeatureWriter(features_db, {**extractor.attrs(), **attrs}, extractor.output_shape, label_names,
                               append=opts.append, overwrite=opts.overwrite, lock=lock, log=opts.log,
                               progress=opts.progress)
    except BaseException:
        lock.release()
        raise
    return writer, extractor


def refuse_another_recipe(features_db: Path, config: ExtractConfig | FusionConfig, append: bool, overwrite: bool) -> None:
    """Refuse an append or a resume whose recipe differs from the file it would add to, before the
    network is built (a download of hundreds of MB online). What needs the built network (the
    resolved layer, the weights' source, the feature shape) is compared again by the writer."""
    import h5py

    from ris.featuredb import fingerprint, partial_path
    from ris.recipe_diff import recipe_refusal

    if overwrite:
        return
    target = partial_path(features_db)
    if not target.is_file():
        if not append or not features_db.is_file():
            return
        target = features_db
    try:
        with h5py.File(target, "r") as f:
            old = fingerprint(dict(f.attrs))
    except (OSError, ValueError):
        return  # unreadable: the writer says why
    new = fingerprint(config.to_attrs())
    keys = ["model", "input_size", "scales", "pooling", "flip", "aspect"] + (["layer"] if getattr(config, "layer", None) else [])
    if any(old.get(k) != new.get(k) for k in keys):
        raise recipe_refusal(features_db if target == features_db else target, {k: old.get(k) for k in keys},
                             {k: new.get(k) for k in keys})


def _run_batches(root: Path, todo: list[str], extractor: FeatureExtractor | FusedExtractor, writer, opts: ExtractOptions,
                 budget: int, label_of: dict[str, str], summary: ExtractSummary) -> None:
    """Decode ``todo`` ahead of the model and write its features batch by batch into ``writer``;
    SIGTERM is a KeyboardInterrupt meanwhile. Called inside ``ris.jpeg_noise.capture``."""
    from ris.aspect import stack_images
    from ris.decoding import iter_decoded
    from ris.filestamp import file_stamps
    from ris.imagefile import human_bytes

    batch_size = opts.batch_size
    workers = opts.resolved_workers()
    prefetch = opts.prefetch or 4 * batch_size
    if opts.verbose:
        opts.log(f"decoding: {workers} {opts.decode}, {prefetch} images ahead, at most {human_bytes(budget)} "
                 f"in flight (RIS_DECODE_BUDGET); batches of {batch_size}")
    bar = _progress(len(todo), opts.progress)
    t0 = time.perf_counter()
    ids: list[str] = []
    imgs: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    stamps, batch_stamps = file_stamps(root, todo), []
    digest_of: dict[str, int] = {}  # the digest of the bytes each file's decoder read (ris.filestamp)
    # one batch in flight: the next batch is dispatched before this one is collected and written
    in_flight: list[tuple[list[str], Callable[[], np.ndarray], list]] = []

    def flush(last: bool = False) -> None:
        if ids:
            in_flight.append((list(ids), extractor.embed_async(stack_images(imgs), pad_to=batch_size),
                              list(batch_stamps)))
            ids.clear()
            imgs.clear()
            batch_stamps.clear()
        while len(in_flight) > (0 if last else 1):
            done_ids, result, done_stamps = in_flight.pop(0)
            stamp_of = dict(zip(done_ids, done_stamps))
            done_ids, feats, not_finite = _finite_rows(done_ids, result(), root)
            writer.add(done_ids, feats, [label_of[i] for i in done_ids], *zip(*(stamp_of[i] for i in done_ids)))
            summary.extracted += len(done_ids)
            bar.update(len(done_ids) + len(not_finite))
            for _, reason in not_finite:  # said and counted, not recorded: the next run tries them again
                bar.write(f"skipped: {one_line(reason)}", file=sys.stderr)
            summary.skipped.extend(not_finite)
        if failures:
            writer.add_failures(failures)
            summary.skipped.extend(failures)
            bar.update(len(failures))
            failures.clear()
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{summary.extracted / max(elapsed, 1e-9):.1f} img/s, {len(summary.skipped)} skipped")

    # SIGTERM stops the run as Ctrl-C does; only the main thread may set a handler (a run in another
    # thread, e.g. a worker of a serving or distributed engine, leaves signals to its owner)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    decoded = iter_decoded(root, todo, extractor.max_size, workers, prefetch=prefetch,
                           processes=opts.decode == "processes", budget=budget,
                           aspect=getattr(extractor, "aspect", "squash"), digest_of=digest_of)
    try:
        for k, (rel, img, err) in enumerate(decoded):
            for warning in warnings_for(root / rel):
                bar.write(f"warning: {one_line(str(root / rel))}: {warning}", file=sys.stderr)
            if err is not None:
                failures.append((rel, err))
                bar.write(f"skipped: {one_line(err)}", file=sys.stderr)  # a newline in a name: one line
            else:
                ids.append(rel)
                imgs.append(img)
                batch_stamps.append((stamps[k], digest_of.pop(rel)))
            if len(ids) >= batch_size:
                flush()
        flush(last=True)
    finally:
        decoded.close()  # its decoding threads stop here, not when collected
        if main:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
    summary.seconds = time.perf_counter() - t0


NOT_FINITE = "the model gave non-finite features (NaN/inf)"


def _finite_rows(ids: list[str], feats: np.ndarray,
                 root: Path) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(ids, features) of the rows whose features are all finite, and (id, reason) for the others.

    Those are skipped like an undecodable image (they would rank nowhere), but not recorded among
    the failed ids: the model, not the file, may be at fault, so ``--append``/``--sync`` try them again."""
    if not len(ids):  # a batch whose images all failed (the Ray engine sends those too)
        return ids, feats, []
    ok = np.isfinite(feats.reshape(len(ids), -1)).all(axis=1)
    if ok.all():
        return ids, feats, []
    bad = [(i, f"{root / i}: {NOT_FINITE}") for i, good in zip(ids, ok) if not good]
    return [i for i, good in zip(ids, ok) if good], feats[ok], bad


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # one rate on the bar: the run's average img/s and the skipped count come in the postfix
    # (tqdm's own smoothed rate beside it showed a second, different img/s)
    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                desc="extract", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
