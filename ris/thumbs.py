"""Small RGB thumbnails for the shallow colour/texture branch of the head.

The deep descriptor is invariant to much of what makes two products look alike (exact colour,
fine texture); the Flipkart design runs a shallow CNN on a down-sampled image beside it. The
thumbnails are made from the database's own image files on first use and cached beside the
feature database, so extraction and its resumable format stay unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ris.errors import BadImage, DatabaseError


def thumbnail(image_rgb: np.ndarray, size: int) -> np.ndarray:
    from ris.images import resize_square

    return resize_square(image_rgb, size)


def cache_path(features_db: str | Path, size: int) -> Path:
    return Path(f"{features_db}.thumbs{size}.h5")


def database_thumbnails(db, size: int, root: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """(N, size, size, 3) uint8 for every database row, from the cache or the image files."""
    path = cache_path(db.path, size)
    ids = db.image_ids
    if path.exists():
        with h5py.File(path, "r") as f:
            if f.attrs.get("rows") == len(ids) and f.attrs.get("first_id") == (ids[0] if ids else ""):
                return f["thumbs"][:]
    from concurrent.futures import ThreadPoolExecutor

    from ris.images import load_image

    root = Path(root or db.dataset_root or ".")

    def load(rel: str) -> np.ndarray:
        try:
            return load_image(root / rel, size)
        except BadImage as exc:
            raise DatabaseError(f"cannot make thumbnails: {exc} (pass the images' current folder)") from None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        thumbs = np.stack(list(pool.map(load, ids))) if ids else np.zeros((0, size, size, 3), np.uint8)
    tmp = Path(str(path) + ".partial")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("thumbs", data=thumbs, chunks=True)
            f.attrs["rows"] = len(ids)
            f.attrs["first_id"] = ids[0] if ids else ""
        os.replace(tmp, path)
    except OSError:  # read-only next to the database: use them uncached
        tmp.unlink(missing_ok=True)
    return thumbs


def with_thumbnails(features: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """The shallow head's single input row: deep feature, then the thumbnail scaled to [0, 1]."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32) / 255.0
    return np.concatenate([features.reshape(len(features), -1).astype(np.float32), flat], axis=1)
