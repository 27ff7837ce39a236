"""Feature extraction: images -> CNN trunk -> pooled descriptors -> HDF5.

Decoding runs in a thread pool (OpenCV releases the GIL) a few batches ahead of the model,
so the CPU decodes while the network computes. The same ``FeatureExtractor``, rebuilt from a
database's attributes, embeds query images in ``ris-search``: queries and database are always
made the same way.
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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

    def resolved_size(self) -> int:
        from ris.backbones import get_backbone

        return int(self.input_size or get_backbone(self.model).input_size)

    def scale_sizes(self) -> list[int]:
        base = self.resolved_size()
        return [max(32, int(round(base * s))) for s in self.scales]


class FeatureExtractor:
    """Backbone + pooling at one or more scales; returns (B, D) descriptors or (B, h, w, C) maps."""

    def __init__(self, config: ExtractConfig):
        import keras

        from ris.backbones import get_backbone
        from ris.pooling import POOLINGS, GlobalPool

        if config.pooling not in POOLINGS:
            raise RisError(f"unknown pooling {config.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if config.pooling == "none" and len(config.scales) > 1:
            raise RisError("--pool none stores conv maps and cannot combine several --scales")
        if config.dtype == "bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        self.config = config
        self.backbone = get_backbone(config.model)
        self.trunk = self.backbone.build(config.weights, config.layer)
        self.layer = config.layer or self.trunk.layers[-1].name
        self.sizes = config.scale_sizes()
        self._forward: list[Callable[[np.ndarray], np.ndarray]] = []
        for size in self.sizes:
            inp = keras.Input((size, size, 3))
            out = self.trunk(inp)
            if config.pooling != "none":
                out = GlobalPool(config.pooling)(keras.ops.cast(out, "float32"))
            self._forward.append(_compile_forward(keras.Model(inp, out)))
        self.output_shape = tuple(int(d) for d in self._probe_shape())

    def _probe_shape(self) -> tuple[int, ...]:
        probe = np.zeros((1, self.sizes[0], self.sizes[0], 3), np.uint8)
        return self.embed(probe).shape[1:]

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) at ``max_size`` -> float32 descriptors, L2-normalised per scale and summed."""
        from ris.images import resize_square
        from ris.topk import l2_normalize

        total = None
        for size, fwd in zip(self.sizes, self._forward):
            batch = images if images.shape[1] == size else np.stack([resize_square(im, size) for im in images])
            out = np.asarray(fwd(self.backbone.preprocess(batch)), dtype=np.float32)
            if self.config.pooling == "none":
                return out
            out = l2_normalize(out)
            total = out if total is None else total + out
        return l2_normalize(total)

    def attrs(self) -> dict[str, Any]:
        import cv2
        import h5py
        import keras

        cfg = self.config
        return {
            "model": cfg.model,
            "weights": self.backbone.weights_source(cfg.weights),
            "weights_arg": cfg.weights,
            "layer": self.layer,
            "input_size": self.sizes[0],
            "scales": list(cfg.scales),
            "scale_sizes": self.sizes,
            "pooling": cfg.pooling,
            "normalized": cfg.pooling != "none",
            "preprocessing": f"decode RGB, squash-resize to SxS (INTER_AREA), {self.backbone.preprocessing}",
            "dtype": cfg.dtype,
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy_version": np.__version__,
            "opencv_version": cv2.__version__,
            "h5py_version": h5py.__version__,
            "ris_version": _ris_version(),
            "python": platform.python_version(),
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "FeatureExtractor":
        scales = attrs.get("scales") or [1.0]
        return cls(ExtractConfig(
            model=attrs["model"], weights=attrs.get("weights_arg", "imagenet"), layer=attrs.get("layer"),
            input_size=int(attrs["input_size"]), scales=tuple(float(s) for s in scales),
            pooling=attrs["pooling"], dtype=attrs.get("dtype", "float32"),
        ))


def _compile_forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """A fast inference call per backend: ``predict()`` costs per-batch host overhead."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

        @jax.jit
        def run(tv, ntv, x):
            out, _ = model.stateless_call(tv, ntv, x, training=False)
            return out

        return lambda x: np.asarray(run(state[0], state[1], x))
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        return lambda x: fn(tf.convert_to_tensor(x)).numpy()
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


def iter_decoded(root: Path, rel_paths: Sequence[str], size: int, workers: int,
                 prefetch: int) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(path, image or None, error) in input order; decoding runs ``prefetch`` images ahead."""
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the pool, not inside each decode
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        window: deque = deque()
        it = iter(rel_paths)
        for rel in it:
            window.append((rel, pool.submit(_load_batch_item, root, rel, size)))
            if len(window) >= prefetch:
                break
        while window:
            rel, fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(_load_batch_item, root, nxt, size)))
            try:
                yield rel, fut.result(), None
            except BadImage as exc:
                yield rel, None, str(exc)


def extract_features(
    dataset: str | Path,
    features_db: str | Path,
    config: ExtractConfig,
    labels: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    workers: int | None = None,
    append: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> ExtractSummary:
    """Extract every image under ``dataset`` into ``features_db``; resumable and atomic."""
    from ris.featuredb import FeatureWriter, partial_path
    from ris.images import find_images, make_labels

    root = Path(dataset)
    files = find_images(root)
    if not files:
        raise RisError(f"{root}: no images found (looked for .jpg .jpeg .png .bmp .webp .tif, any case, recursively)")
    features_db = Path(features_db)
    if features_db.exists() and not append:
        raise RisError(f"{features_db}: already exists; use --append to add new images or --overwrite to replace it")
    label_ids, label_names, label_mode = make_labels(files, labels, root)
    label_of = {f: (label_names[l] if l >= 0 else "") for f, l in zip(files, label_ids)}

    extractor = FeatureExtractor(config)
    attrs = extractor.attrs()
    attrs.update(dataset_root=str(root.resolve()), labels_mode=label_mode)
    resuming = partial_path(features_db).exists()
    writer = FeatureWriter(features_db, attrs, extractor.output_shape, label_names,
                           base=features_db if append and features_db.exists() and not resuming else None)
    if getattr(writer, "damaged_partial", None):
        log(f"warning: {partial_path(features_db)} was damaged ({writer.damaged_partial}); starting over")
    done = writer.done_ids()
    todo = [f for f in files if f not in done]
    if writer.resumed_rows:
        log(f"resuming: {writer.resumed_rows} images already in {features_db.name}, {len(todo)} to go")

    workers = workers or min(8, (os.cpu_count() or 2))
    summary = ExtractSummary(str(features_db), len(files), 0, writer.resumed_rows, feature_shape=extractor.output_shape)
    bar = _progress(len(todo), progress)
    t0 = time.perf_counter()
    ids: list[str] = []
    imgs: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []

    def flush() -> None:
        if ids:
            writer.add(list(ids), extractor.embed(np.stack(imgs)), [label_of[i] for i in ids])
            summary.extracted += len(ids)
            bar.update(len(ids))
            ids.clear()
            imgs.clear()
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
        for rel, img, err in iter_decoded(root, todo, extractor.max_size, workers, prefetch=4 * batch_size):
            if err is not None:
                failures.append((rel, err))
                bar.write(f"skipped: {err}", file=sys.stderr)
            else:
                ids.append(rel)
                imgs.append(img)
            if len(ids) >= batch_size:
                flush()
        flush()
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
        writer.close()
        partial_path(features_db).unlink(missing_ok=True)
        raise RisError(f"{root}: none of the {len(files)} images could be decoded; nothing written")
    writer.finish({"num_images": writer.rows, "num_failed": len(writer.done_ids()) - writer.rows})
    return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                desc="extract")
