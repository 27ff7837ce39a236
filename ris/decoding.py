"""The decoding pipeline: image files -> resized uint8 RGB arrays, in input order, ahead of the model.

Decoding runs in a thread pool (OpenCV releases the GIL) or, with ``processes=True``, in a pool of
worker processes, a few batches ahead of the consumer, so the CPU decodes while the network
computes. What the decodes in flight may hold is bounded by a byte budget (``RIS_DECODE_BUDGET``),
judged from each file's header before it is submitted, whatever the worker count.

No Keras here: worker processes import this module, and so can a process that only decodes (a
data-loading stage on its own machine).
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from ris.aspect import stack_images
from ris.errors import BadImage


def _load_batch_item(root: Path, rel: str, size: int, aspect: str = "squash") -> tuple[np.ndarray, int]:
    """One image as the model takes it: (size, size, 3) uint8 RGB, or its aspect ratio kept
    (``ris.aspect``), and the digest of the bytes decoded (``ris.filestamp``: each file is read
    once, by its worker); ``BadImage`` when it cannot be."""
    from ris.images import load_image_digest

    return load_image_digest(root / rel, size, aspect)


def fails_as_before(root: Path, rel: str, reason: str, size: int, aspect: str = "squash") -> str | None:
    """The reason ``rel`` still cannot be decoded as an extraction decodes it, when it is the same
    reason as before (``reason``, recorded with the folder as it was then named); None when it now
    decodes or fails another way, and is worth extracting again (``ris-extract --sync``)."""
    path = root / rel
    try:
        _load_batch_item(root, rel, size, aspect)
    except BadImage as exc:
        now = str(exc)
        why = now[len(str(path)):] if now.startswith(str(path)) else now
        return now if why and reason.endswith(why) else None
    return None


DEFAULT_DECODE_BUDGET = 1 << 30


def decode_budget() -> int:
    """Bytes the images being decoded at once may hold: RIS_DECODE_BUDGET (e.g. 512M, 2G), default 1 GiB.

    Why: decoding holds each image at full size; six 169-MP PNGs took 6.7 GB with 6 workers. The
    budget bounds that whatever the worker count (an image bigger than it is decoded alone).
    """
    from ris.imagefile import parse_bytes

    text = os.environ.get("RIS_DECODE_BUDGET")
    return parse_bytes(text, "RIS_DECODE_BUDGET") if text else DEFAULT_DECODE_BUDGET


def iter_decoded(root: Path, rel_paths: Iterable[str], size: int, workers: int,
                 prefetch: int, processes: bool = False, chunk: int | None = None,
                 budget: int | None = None, aspect: str = "squash",
                 digest_of: dict[str, int] | None = None) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(path, image or None, error) in input order; decoding runs ``prefetch`` images ahead.

    ``processes``: decode in ``workers`` worker processes, ``chunk`` images per task, instead of
    threads (on many cores the threads' Python work holds the GIL; processes scale further).
    ``budget``: bytes the decodes in flight may hold (default ``decode_budget()``); each image's
    share comes from its header before it is submitted (``ris.images.decode_cost``). ``aspect``: the
    input's shape (``ris.aspect``; with 'keep' images of one run may differ in shape).
    ``digest_of``: each decoded path's digest of the bytes decoded (``ris.filestamp``) is put here
    before its image is yielded.
    """
    from ris.images import decode_cost

    budget = decode_budget() if budget is None else budget
    if processes:
        yield from _iter_decoded_processes(root, rel_paths, size, workers, prefetch, chunk, budget, aspect,
                                           digest_of)
        return
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the pool, not inside each decode
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    tasks = _in_flight(pool, partial(_load_batch_item, root, size=size, aspect=aspect), rel_paths, prefetch,
                       lambda rel: decode_cost(root / rel, size), budget)
    try:
        for rel, fut in tasks:
            try:
                img, digest = fut.result()
            except BadImage as exc:
                yield rel, None, str(exc)
                continue
            if digest_of is not None:
                digest_of[rel] = digest
            yield rel, img, None
    finally:  # also when the consumer stops early (interrupt): don't decode the rest of the window
        tasks.close()
        pool.shutdown(wait=True, cancel_futures=True)


Item = TypeVar("Item")
_END = object()


def _in_flight(pool: Any, fn: Callable[[Item], Any], items: Iterable[Item], depth: int,
               cost: Callable[[Item], int] | None = None,
               budget: int | None = None) -> Iterator[tuple[Item, Future]]:
    """(item, future of fn(item)) in input order, keeping ``depth`` tasks submitted ahead of the
    consumer so the workers never wait for it; closing it early cancels the tasks not started.

    With ``cost`` and ``budget``, submission also holds while the costs of the unfinished tasks
    plus the next item's would pass the budget (a task that is alone always runs). A task counts
    until it finishes, also after the consumer took it off the window; then its result is the
    small, resized image.
    """
    it = iter(items)
    window: deque[tuple[Item, Future]] = deque()
    live: list[tuple[Future, int]] = []  # submitted with a cost and not known to be finished
    held: list[tuple[Item, int]] = []  # the next item and its cost, while the budget holds it back

    def fill() -> bool:
        """Submit what depth and budget allow; True when the budget holds the next item back."""
        while len(window) < max(1, depth):
            if not held:
                nxt = next(it, _END)
                if nxt is _END:
                    return False
                held.append((nxt, cost(nxt) if cost is not None and budget is not None else 0))
            nxt, c = held[0]
            if c:
                live[:] = [(f, ci) for f, ci in live if not f.done()]
                busy = sum(ci for _, ci in live)
                if busy and busy + c > budget:
                    return True
            held.clear()
            fut = pool.submit(fn, nxt)
            window.append((nxt, fut))
            if c:
                live.append((fut, c))
        return False

    try:
        blocked = fill()
        while window or held:
            while blocked and (not window or not window[0][1].done()):  # refill as soon as a task finishes
                running = [f for f, _ in live if not f.done()]
                if running:
                    wait(running, return_when=FIRST_COMPLETED)
                blocked = fill()
            item, fut = window.popleft()
            blocked = fill()
            yield item, fut
    finally:
        for _, fut in window:
            fut.cancel()


# Worker processes are started once per worker count and kept for later extractions in the same
# process (starting 16 Python processes costs about a second); they are spawned, not forked,
# because the parent may hold an initialised JAX/TF runtime with its threads.
_PROCESS_POOLS: dict[int, Any] = {}


@atexit.register
def _shutdown_pools() -> None:
    """Stop the kept worker pools before the interpreter tears its modules down (otherwise
    the pools' own finalisers run too late and print 'Exception ignored' noise)."""
    for pool in _PROCESS_POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _PROCESS_POOLS.clear()


def _decode_pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = _PROCESS_POOLS.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_decode_worker)
        # Start every worker now (the pool would otherwise spawn them one by one as work queues up).
        # A spawned worker re-imports the parent's __main__ from its file; when that is no file
        # (python - < script, python -c), hide it so the workers don't fail looking for it.
        main = sys.modules.get("__main__")
        main_file = getattr(main, "__file__", None)
        hide = main_file is not None and getattr(main, "__spec__", None) is None and not os.path.isfile(main_file)
        if hide:
            del main.__file__
        try:
            for fut in [pool.submit(_init_decode_worker) for _ in range(workers)]:
                fut.result()
        finally:
            if hide:
                main.__file__ = main_file
        _PROCESS_POOLS[workers] = pool
    return pool


def _init_decode_worker() -> None:
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the work
    cv2.setNumThreads(1)


def _decode_chunk(root: str, rel_paths: list[str], size: int,
                  aspect: str = "squash") -> tuple[np.ndarray | list[np.ndarray], list[str | None], list[int]]:
    """Decode a chunk in a worker: (stacked images that decoded, error or None per path, digest of
    the bytes decoded per path, ``UNKNOWN_DIGEST`` for one that failed)."""
    from ris.filestamp import UNKNOWN_DIGEST

    images, errors, digests = [], [], []
    for rel in rel_paths:
        try:
            img, digest = _load_batch_item(Path(root), rel, size, aspect)
            images.append(img)
            errors.append(None)
            digests.append(digest)
        except BadImage as exc:
            errors.append(str(exc))
            digests.append(UNKNOWN_DIGEST)
    # one array per chunk where the shapes agree: one copy through the pipe, no per-image pickling
    stacked = stack_images(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, errors, digests


def _decode_chunk_named(root: str, rel_paths: list[str], size: int, aspect: str = "squash"):
    """``_decode_chunk`` with libjpeg's warnings caught in the worker (``ris.jpeg_noise``): its
    result and {path: libjpeg's lines} for the parent's capture to name."""
    from ris.jpeg_noise import capture, take

    with capture():
        stacked, errors, digests = _decode_chunk(root, rel_paths, size, aspect)
        found = {rel: take(Path(root) / rel) for rel in rel_paths}
    return stacked, errors, digests, {rel: lines for rel, lines in found.items() if lines}


def _iter_decoded_processes(root: Path, rel_paths: Iterable[str], size: int, workers: int, prefetch: int,
                            chunk: int | None, budget: int, aspect: str = "squash",
                            digest_of: dict[str, int] | None = None) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    from ris.images import decode_cost
    from ris.jpeg_noise import capturing, note

    workers = max(1, workers)
    chunk = max(1, chunk or min(32, max(4, prefetch // (2 * workers))))
    depth = max(2 * workers, -(-prefetch // chunk))  # chunks in flight
    pool = _decode_pool(workers)
    it = iter(rel_paths)  # taken lazily: a caller may act on each name as it is handed over
    chunks = iter(lambda: list(islice(it, chunk)), [])
    # a worker decodes its chunk one image at a time: a chunk holds at most its largest image
    named = capturing()  # libjpeg's lines named in this process: caught in the workers too
    tasks = _in_flight(pool, partial(_decode_chunk_named if named else _decode_chunk, str(root), size=size,
                                     aspect=aspect), chunks, depth,
                       lambda c: max(decode_cost(root / rel, size) for rel in c), budget)
    try:
        for c, fut in tasks:
            stacked, errors, digests, *found = fut.result()
            for rel, lines in (found[0] if found else {}).items():
                note(root / rel, lines)
            k = 0
            for rel, err, digest in zip(c, errors, digests):
                if err is None:
                    if digest_of is not None:
                        digest_of[rel] = digest
                    yield rel, stacked[k], None
                    k += 1
                else:
                    yield rel, None, err
    finally:
        tasks.close()
