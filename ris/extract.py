"""Feature extraction: images -> CNN trunk -> pooled descriptors -> HDF5.

Decoding runs in a thread pool (OpenCV releases the GIL) or, with ``decode="processes"``, in a
pool of worker processes, a few batches ahead of the model, so the CPU decodes while the network
computes. The uint8 pixels go to the model as they are: the backbone's input scaling runs inside
the compiled forward pass (on the accelerator, a quarter of the bytes of float32 to transfer).
On JAX the next batch is dispatched before the previous one is collected and written, so host
work overlaps device work. The same ``FeatureExtractor``, rebuilt from a database's attributes,
embeds query images in ``ris-search``: queries and database are always made the same way.
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from ris.errors import BadImage, RisError

DEFAULT_BATCH = 32


@dataclass
class ExtractConfig:
    model: str = "vgg16"
    weights: str = "imagenet"  # 'imagenet' | 'none' | path
    layer: str | None = None  # trunk layer; default: the last conv block
    input_size: int | None = None  # None = the backbone's native size
    scales: tuple[float, ...] = (1.0,)
    pooling: str = "gap"
    dtype: str = "float32"  # 'bfloat16' = mixed precision on accelerators
    fold_batchnorm: bool = True  # merge inference BatchNorm into the conv before it (same features, faster)

    def resolved_size(self) -> int:
        from ris.backbones import get_backbone

        return int(self.input_size or get_backbone(self.model).input_size)

    def scale_sizes(self) -> list[int]:
        return _scale_sizes(self.resolved_size(), self.scales)

    def resolved(self) -> "ExtractConfig":
        """This config with the input size filled in (the backbone's native size when None)."""
        return replace(self, input_size=self.resolved_size())

    def to_attrs(self) -> dict[str, Any]:
        """The recipe as database attributes; ``from_attrs`` rebuilds this config from them.

        ``input_size`` is the base size that every scale multiplies (not the first scale's size),
        so a query made from a database's attributes has the database's sizes.
        """
        return {
            "model": self.model,
            "weights_arg": self.weights,
            "layer": self.layer,
            "input_size": self.resolved_size(),
            "scales": [float(s) for s in self.scales],
            "scale_sizes": self.scale_sizes(),
            "pooling": self.pooling,
            "dtype": self.dtype,
            "fold_batchnorm": bool(self.fold_batchnorm),
            "recipe_version": RECIPE_VERSION,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "ExtractConfig":
        """The config a database's attributes record (also those written before ``recipe_version`` 2)."""
        scales = tuple(float(s) for s in (attrs.get("scales") or [1.0]))
        layer = attrs.get("layer")
        return cls(model=str(attrs["model"]), weights=str(attrs.get("weights_arg", "imagenet")),
                   layer=None if layer in (None, "", "none") else str(layer),
                   input_size=_base_size(attrs, scales), scales=scales, pooling=str(attrs["pooling"]),
                   dtype=str(attrs.get("dtype", "float32")),
                   fold_batchnorm=bool(attrs.get("fold_batchnorm", True)))


# 2: ``input_size`` holds the base size. 1 (unmarked): it held the first scale's size, which made
# queries of a multi-scale database whose first scale is not 1 at the wrong sizes.
RECIPE_VERSION = 2


def _scale_sizes(base: int, scales: Sequence[float]) -> list[int]:
    return [max(32, int(round(base * s))) for s in scales]


def _base_size(attrs: dict[str, Any], scales: tuple[float, ...]) -> int:
    """The base input size of a database, recovered from ``scale_sizes`` for version-1 databases."""
    size = int(attrs["input_size"])
    stored = [int(s) for s in (attrs.get("scale_sizes") or [])]
    if int(attrs.get("recipe_version", 1)) >= 2 or len(stored) != len(scales) or _scale_sizes(size, scales) == stored:
        return size
    # version 1 stored scale_sizes[0]: the base is the size at scale 1, or the ratio of size to scale
    guesses = [stored[i] for i, s in enumerate(scales) if s == 1.0]
    guesses += [int(round(n / s)) for n, s in zip(stored, scales) if n > 32]
    for guess in guesses:
        for base in (guess, guess - 1, guess + 1, guess - 2, guess + 2):
            if _scale_sizes(base, scales) == stored:
                return base
    raise RisError(f"cannot tell the input size from the database's attributes (input_size {size}, "
                   f"scales {list(scales)}, scale_sizes {stored})")


class FeatureExtractor:
    """Backbone + pooling at one or more scales; returns (B, D) descriptors or (B, h, w, C) maps."""

    def __init__(self, config: ExtractConfig):
        import keras

        from ris.backbones import get_backbone
        from ris.layers import GlobalPool
        from ris.pooling import NO_POOLING, POOLING

        if config.pooling not in POOLING and config.pooling != NO_POOLING:
            raise RisError(f"unknown pooling {config.pooling!r}; choose one of {', '.join([*POOLING, NO_POOLING])}")
        if config.pooling == "none" and len(config.scales) > 1:
            raise RisError("--pool none stores conv maps and cannot combine several --scales")
        if config.dtype not in ("float32", "bfloat16"):
            raise RisError(f"unknown dtype {config.dtype!r}; choose float32 or bfloat16")
        self.config = config
        self.backbone = get_backbone(config.model)
        # The precision policy applies to the layers made here only; the global policy is restored
        # so that a float32 extractor made after a bfloat16 one in the same process is float32.
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if config.dtype == "bfloat16" else "float32")
        try:
            self.trunk = self.backbone.build(config.weights, config.layer)
            self.layer = config.layer or self.trunk.layers[-1].name
            self.batchnorm_folded = 0
            if config.fold_batchnorm:
                from ris.backbones.fold import fold_batchnorm

                self.trunk, self.batchnorm_folded = fold_batchnorm(self.trunk)
            self.sizes = config.scale_sizes()
            # input scaling inside the model when it is a per-channel affine map (all backbones here)
            self._affine = _affine_preprocess(self.backbone.preprocess)
            self._forward: list[Callable[[np.ndarray], Any]] = []
            for size in self.sizes:
                if self._affine is not None:
                    perm, scale, offset = self._affine
                    inp = keras.Input((size, size, 3), dtype="uint8")
                    x = keras.ops.cast(inp, "float32")
                    if perm != [0, 1, 2]:
                        x = keras.ops.take(x, perm, axis=-1)
                    x = x * scale + offset
                else:
                    inp = x = keras.Input((size, size, 3))
                out = self.trunk(x)
                if config.pooling != "none":
                    out = GlobalPool(config.pooling)(keras.ops.cast(out, "float32"))
                if not self._forward:
                    static_shape = tuple(out.shape[1:])  # known without running the model
                self._forward.append(_compile_forward(keras.Model(inp, out)))
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self._pad_batches = keras.backend.backend() == "jax"  # jit compiles once per batch shape
        if not self._pad_batches or any(d is None for d in static_shape):
            # one call with one image: also traces the forward pass (TF: one trace serves every batch
            # size). Skipped on JAX, where it would compile a batch-1 program that extraction never uses.
            static_shape = self._probe_shape()
        self.output_shape = tuple(int(d) for d in static_shape)

    def _probe_shape(self) -> tuple[int, ...]:
        probe = np.zeros((1, self.sizes[0], self.sizes[0], 3), np.uint8)
        return self.embed(probe).shape[1:]

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) at ``max_size`` -> float32 descriptors, L2-normalised per scale and summed."""
        return self.embed_async(images)()

    def embed_async(self, images: np.ndarray, pad_to: int | None = None) -> Callable[[], np.ndarray]:
        """Start ``embed``; the returned function waits for the result and returns it.

        On JAX the forward pass runs asynchronously, so the caller can prepare (and dispatch) the
        next batch before collecting this one. ``pad_to``: pad a short batch with zero images to
        this many rows (JAX compiles once per batch shape; the padding rows are dropped).
        """
        from ris.images import resize_square

        images = np.asarray(images)
        n = len(images)
        if self._affine is not None and images.dtype != np.uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        if pad_to and self._pad_batches and 0 < n < pad_to:
            images = np.concatenate([images, np.zeros((pad_to - n, *images.shape[1:]), images.dtype)])
        pending = []
        for size, fwd in zip(self.sizes, self._forward):
            batch = images if images.shape[1] == size else np.stack([resize_square(im, size) for im in images])
            pending.append(fwd(batch if self._affine is not None else self.backbone.preprocess(batch)))
            if self.config.pooling == "none":
                break

        def result() -> np.ndarray:
            from ris.topk import l2_normalize

            total = None
            for handle in pending:
                out = np.asarray(handle, dtype=np.float32)[:n]
                if self.config.pooling == "none":
                    return out
                out = l2_normalize(out)
                total = out if total is None else total + out
            return l2_normalize(total)

        return result

    def attrs(self) -> dict[str, Any]:
        import cv2
        import h5py
        import keras

        cfg = self.config
        return {
            **self.recipe.to_attrs(),
            "weights": self.backbone.weights_source(cfg.weights),
            "normalized": cfg.pooling != "none",
            "preprocessing": f"decode RGB, squash-resize to SxS (INTER_AREA), {self.backbone.preprocessing}",
            "batchnorm_folded": int(self.batchnorm_folded),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy_version": np.__version__,
            "opencv_version": cv2.__version__,
            "h5py_version": h5py.__version__,
            "ris_version": _ris_version(),
            "python": platform.python_version(),
        }

    @property
    def recipe(self) -> ExtractConfig:
        """The config with everything resolved (size, layer): what the database records."""
        return replace(self.config.resolved(), layer=self.layer)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "FeatureExtractor":
        return cls(ExtractConfig.from_attrs(attrs))


def _affine_preprocess(preprocess: Callable[[np.ndarray], np.ndarray]
                       ) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """(perm, scale, offset) such that ``preprocess(x)[..., c] == x[..., perm[c]] * scale[c] + offset[c]``.

    Found by probing ``preprocess`` with black, one-channel-white and random images and checked on
    them; None when it is not such a map (then preprocessing stays on the host, as before).
    """
    rng = np.random.default_rng(0)
    probe = np.zeros((7, 4, 4, 3), np.uint8)
    for c in range(3):
        probe[1 + c, ..., c] = 255
    probe[4:] = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    try:
        out = np.asarray(preprocess(probe.copy()), dtype=np.float64)
    except Exception:
        return None
    if out.shape != probe.shape or not np.all(np.isfinite(out)):
        return None
    offset = out[0, 0, 0]
    delta = out[1:4, 0, 0] - offset  # [input channel, output channel]
    perm: list[int] = []
    scale = np.zeros(3)
    for c in range(3):
        col = np.abs(delta[:, c])
        src = int(np.argmax(col))
        if col[src] == 0 or np.sort(col)[-2] > 1e-6 * col[src]:
            return None
        perm.append(src)
        scale[c] = delta[src, c] / 255.0
    predicted = probe[..., perm].astype(np.float64) * scale + offset
    tol = 1e-5 * max(1.0, float(np.abs(out).max()))
    if np.abs(predicted - out).max() > tol:
        return None
    return perm, scale.astype(np.float32), offset.astype(np.float32)


def _compile_forward(model) -> Callable[[np.ndarray], Any]:
    """A fast inference call per backend: ``predict()`` costs per-batch host overhead.

    Returns an array-like (``np.asarray`` gives the values); on JAX it is computed asynchronously.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

        @jax.jit
        def jitted(tv, ntv, x):
            out, _ = model.stateless_call(tv, ntv, x, training=False)
            return out

        return lambda x: jitted(state[0], state[1], x)
    if backend == "tensorflow":
        import tensorflow as tf

        dtype = tf.as_dtype(keras.backend.standardize_dtype(model.inputs[0].dtype))
        spec = tf.TensorSpec([None, *model.input_shape[1:]], dtype)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        return lambda x: fn(tf.convert_to_tensor(x, dtype)).numpy()
    if backend == "torch":
        import torch

        def run(x):
            with torch.no_grad():
                return keras.ops.convert_to_numpy(model(x, training=False))

        return run
    return lambda x: model.predict_on_batch(x)


def _ris_version() -> str:
    try:
        from importlib.metadata import version

        return version("ris")
    except Exception:
        return "dev"


# --- the extraction run ------------------------------------------------------------------

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

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        d["skipped"] = [{"image": i, "reason": r} for i, r in self.skipped]
        return d


def _load_batch_item(root: Path, rel: str, size: int) -> np.ndarray:
    from ris.images import load_image

    return load_image(root / rel, size)


DEFAULT_DECODE_BUDGET = 1 << 30


def decode_budget() -> int:
    """Bytes the images being decoded at once may hold: RIS_DECODE_BUDGET (e.g. 512M, 2G), default 1 GiB.

    Why: decoding holds each image at full size; six 169-MP PNGs took 6.7 GB with 6 workers. The
    budget bounds that whatever the worker count (an image bigger than it is decoded alone).
    """
    from ris.imagefile import parse_bytes

    text = os.environ.get("RIS_DECODE_BUDGET")
    return parse_bytes(text, "RIS_DECODE_BUDGET") if text else DEFAULT_DECODE_BUDGET


def iter_decoded(root: Path, rel_paths: Sequence[str], size: int, workers: int,
                 prefetch: int, processes: bool = False, chunk: int | None = None,
                 budget: int | None = None) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(path, image or None, error) in input order; decoding runs ``prefetch`` images ahead.

    ``processes``: decode in ``workers`` worker processes, ``chunk`` images per task, instead of
    threads (on many cores the threads' Python work holds the GIL; processes scale further).
    ``budget``: bytes the decodes in flight may hold (default ``decode_budget()``); each image's
    share comes from its header before it is submitted (``ris.images.decode_cost``).
    """
    from ris.images import decode_cost

    budget = decode_budget() if budget is None else budget
    if processes:
        yield from _iter_decoded_processes(root, rel_paths, size, workers, prefetch, chunk, budget)
        return
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the pool, not inside each decode
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    tasks = _in_flight(pool, partial(_load_batch_item, root, size=size), rel_paths, prefetch,
                       lambda rel: decode_cost(root / rel, size), budget)
    try:
        for rel, fut in tasks:
            try:
                yield rel, fut.result(), None
            except BadImage as exc:
                yield rel, None, str(exc)
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


def _decode_chunk(root: str, rel_paths: list[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode a chunk in a worker: (stacked images that decoded, error or None per path)."""
    images, errors = [], []
    for rel in rel_paths:
        try:
            images.append(_load_batch_item(Path(root), rel, size))
            errors.append(None)
        except BadImage as exc:
            errors.append(str(exc))
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, errors  # one array per chunk: one copy through the pipe, no per-image pickling


def _iter_decoded_processes(root: Path, rel_paths: Sequence[str], size: int, workers: int, prefetch: int,
                            chunk: int | None, budget: int) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    from ris.images import decode_cost

    workers = max(1, workers)
    chunk = max(1, chunk or min(32, max(4, prefetch // (2 * workers))))
    depth = max(2 * workers, -(-prefetch // chunk))  # chunks in flight
    pool = _decode_pool(workers)
    chunks = (list(rel_paths[i : i + chunk]) for i in range(0, len(rel_paths), chunk))
    # a worker decodes its chunk one image at a time: a chunk holds at most its largest image
    tasks = _in_flight(pool, partial(_decode_chunk, str(root), size=size), chunks, depth,
                       lambda c: max(decode_cost(root / rel, size) for rel in c), budget)
    try:
        for c, fut in tasks:
            stacked, errors = fut.result()
            k = 0
            for rel, err in zip(c, errors):
                if err is None:
                    yield rel, stacked[k], None
                    k += 1
                else:
                    yield rel, None, err
    finally:
        tasks.close()


def extract_features(
    dataset: str | Path,
    features_db: str | Path,
    config: ExtractConfig,
    labels: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    workers: int | None = None,
    append: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    decode: str = "threads",
    prefetch: int | None = None,
    extractor: FeatureExtractor | None = None,
) -> ExtractSummary:
    """Extract every image under ``dataset`` into ``features_db``; resumable and atomic.

    ``decode``: 'threads' (default) or 'processes' (``workers`` worker processes; worth it on many
    cores feeding a GPU). ``prefetch``: images decoded ahead of the model (default 4 batches).
    ``extractor``: an already built (and warmed-up) extractor to use instead of one built from
    ``config``; its own config is what is used and recorded. ``overwrite``: replace an existing
    database (it stays usable until the new one is complete). The run holds ``<features_db>.lock``
    throughout: a second writer of the same database is refused, naming this one.
    """
    from ris.featuredb import FeatureWriter, check_target, partial_path
    from ris.images import make_labels, scan_folder
    from ris.sidecars import WriterLock

    root = Path(dataset)
    scan = scan_folder(root)
    files = scan.images
    if not files:
        raise RisError(f"{root}: no images found (looked for {_extension_list()}, any case, recursively"
                       f"{_not_read_note(scan.other, scan.hidden)})")
    features_db = Path(features_db)
    check_target(features_db, append=append, overwrite=overwrite)
    label_ids, label_names, label_mode = make_labels(files, labels, root)
    label_of = {f: (label_names[l] if l >= 0 else "") for f, l in zip(files, label_ids)}
    label_file = Path(label_mode).resolve() if label_mode not in ("ukbench", "folders", "none") else None
    not_read = [f for f in scan.other if (root / f).resolve() != label_file]  # the label file is read

    if decode not in ("threads", "processes"):
        raise RisError(f"decode must be 'threads' or 'processes', not {decode!r}")
    lock = WriterLock(features_db).acquire()  # before the slow model build; the writer takes it over
    try:
        extractor = extractor or FeatureExtractor(config)
        attrs = extractor.attrs()
        attrs.update(dataset_root=str(root.resolve()), labels_mode=label_mode)
        writer = FeatureWriter(features_db, attrs, extractor.output_shape, label_names, append=append,
                               overwrite=overwrite, lock=lock)
    except BaseException:
        lock.release()
        raise
    if writer.discarded_partial:
        log(f"warning: {writer.discarded_partial}; starting over")
    done = writer.done_ids()
    todo = [f for f in files if f not in done]
    if writer.resumed_rows:
        log(f"resuming: {writer.resumed_rows} images already in {features_db.name}, {len(todo)} to go")

    if decode == "processes":
        workers = workers or (os.cpu_count() or 2)
    else:
        workers = workers or min(8, (os.cpu_count() or 2))
    summary = ExtractSummary(str(features_db), len(files), 0, writer.resumed_rows, feature_shape=extractor.output_shape)
    summary.other_files, summary.hidden_files = not_read, scan.hidden
    bar = _progress(len(todo), progress)
    t0 = time.perf_counter()
    ids: list[str] = []
    imgs: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    # one batch in flight: the next batch is dispatched before this one is collected and written
    in_flight: list[tuple[list[str], Callable[[], np.ndarray]]] = []

    def flush(last: bool = False) -> None:
        if ids:
            in_flight.append((list(ids), extractor.embed_async(np.stack(imgs), pad_to=batch_size)))
            ids.clear()
            imgs.clear()
        while len(in_flight) > (0 if last else 1):
            done_ids, result = in_flight.pop(0)
            done_ids, feats = _finite_rows(done_ids, result(), failures)
            writer.add(done_ids, feats, [label_of[i] for i in done_ids])
            summary.extracted += len(done_ids)
            bar.update(len(done_ids))
        if failures:
            writer.add_failures(failures)
            summary.skipped.extend(failures)
            bar.update(len(failures))
            failures.clear()
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{summary.extracted / max(elapsed, 1e-9):.1f} img/s, {len(summary.skipped)} skipped")

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for rel, img, err in iter_decoded(root, todo, extractor.max_size, workers, prefetch=prefetch or 4 * batch_size,
                                          processes=decode == "processes"):
            if err is not None:
                failures.append((rel, err))
                bar.write(f"skipped: {err}", file=sys.stderr)
            else:
                ids.append(rel)
                imgs.append(img)
            if len(ids) >= batch_size:
                flush()
        flush(last=True)
    except KeyboardInterrupt:
        bar.close()
        rows = writer.rows
        writer.close()
        raise RisError(f"interrupted after {rows} images; run the same command again to resume "
                       f"(partial data kept in {partial_path(features_db)})") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    summary.seconds = time.perf_counter() - t0
    if writer.rows == 0:
        writer.discard()
        raise RisError(f"{root}: none of the {len(files)} images could be decoded; nothing written")
    writer.finish({"num_images": writer.rows, "num_failed": len(writer.done_ids()) - writer.rows,
                   "extract_seconds": round(summary.seconds, 3),
                   "images_per_second": round(summary.images_per_second, 2)})
    return summary


def _extension_list() -> str:
    from ris.images import IMAGE_EXTENSIONS

    order = [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"]
    return " ".join(sorted(IMAGE_EXTENSIONS, key=lambda e: (order.index(e) if e in order else len(order), e)))


def count_phrase(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def not_read_counts(other: Sequence[str], hidden: Sequence[str]) -> list[str]:
    """['3 files with other extensions', '1 hidden file', '1 hidden folder'] (empty counts left out)."""
    folders = sum(1 for h in hidden if h.endswith("/"))
    parts = [count_phrase(len(other), "file with another extension", "files with other extensions"),
             count_phrase(len(hidden) - folders, "hidden file", "hidden files"),
             count_phrase(folders, "hidden folder", "hidden folders")]
    return [p for p in parts if not p.startswith("0 ")]


def _not_read_note(other: Sequence[str], hidden: Sequence[str]) -> str:
    parts = not_read_counts(other, hidden)
    if other:
        parts[0] += f" ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})"
    return f"; not read: {', '.join(parts)}" if parts else ""


def _finite_rows(ids: list[str], feats: np.ndarray,
                 failures: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """The rows whose features are all finite; the others join ``failures`` (they would rank nowhere)."""
    ok = np.isfinite(feats.reshape(len(ids), -1)).all(axis=1)
    if ok.all():
        return ids, feats
    failures.extend((i, f"{i}: features are not finite (NaN/inf)") for i, good in zip(ids, ok) if not good)
    return [i for i, good in zip(ids, ok) if good], feats[ok]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                desc="extract")
