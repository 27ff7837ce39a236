"""Small RGB thumbnails for the shallow colour/texture branch of the head.

The deep descriptor is invariant to much of what makes two products look alike (exact colour,
fine texture); the Flipkart design runs a shallow CNN on a down-sampled image beside it. The
thumbnails are made from the database's own image files on first use and cached beside the
feature database, so extraction and its resumable format stay unchanged.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ris.errors import BadImage, DatabaseError


def thumbnail(image_rgb: np.ndarray, size: int) -> np.ndarray:
    from ris.images import resize_square

    return resize_square(image_rgb, size)


def cache_path(features_db: str | Path, size: int) -> Path:
    from ris.sidecars import thumbs_path

    return thumbs_path(features_db, size)


def database_thumbnails(db, size: int, root: str | Path | None = None, progress: bool = False,
                        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> np.ndarray:
    """(N, size, size, 3) uint8 for every database row, from the cache or the image files.

    The cache is keyed on the database's content key and the size: a re-extracted database, even
    of the same images count, makes new thumbnails. A damaged JPEG among the files is said through
    ``log`` as ris-extract says it ('warning: FILE: corrupt JPEG data (...)'), once, not in
    libjpeg's unnamed line."""
    from ris.sidecars import read_h5_cache, write_h5_cache

    path = cache_path(db.path, size)
    key = f"{db.content_key}|thumbs={int(size)}"
    cached = read_h5_cache(path, key)
    if cached is not None and "thumbs" in cached:
        return cached["thumbs"]
    ids = db.image_ids
    from concurrent.futures import ThreadPoolExecutor

    from ris.images import load_image

    root = Path(root or db.dataset_root or ".")

    def load(rel: str) -> np.ndarray:
        try:
            return load_image(root / rel, size)
        except BadImage as exc:
            raise DatabaseError(f"{exc}; the thumbnails a --shallow head is fed are made from the database's images: "
                                "ris-extract --sync brings the database up to date with its folder (ris-extract --sync "
                                "--dataset DIR if the folder moved; ris-search and ris-serve also take --dataset-root "
                                "DIR)") from None

    from ris.jpeg_noise import naming_these

    with naming_these(lambda: [root / rel for rel in ids], log), ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        thumbs = np.stack(list(pool.map(load, ids))) if ids else np.zeros((0, size, size, 3), np.uint8)
    try:
        write_h5_cache(path, key, {"rows": len(ids)}, thumbs=thumbs)
    except OSError:  # read-only next to the database: use them uncached
        pass
    return thumbs


def with_thumbnails(features: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """The shallow head's single input row: deep feature, then the thumbnail scaled to [0, 1]."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32) / 255.0
    return np.concatenate([features.reshape(len(features), -1).astype(np.float32), flat], axis=1)
