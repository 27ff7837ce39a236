"""Query-time rotations: describe a query at 0/90/180/270 degrees and let every database image keep
its best score over the four.

Why: phone photos arrive turned (no or wrong EXIF orientation), and CNN descriptors are not
rotation invariant. Measured in bench/quality.md: rotated UKBench queries N-S 3.90 -> 3.96.
Cost: four forward passes per query instead of one (one batch of four), and four searches.

The four copies are turned after the query is squashed to the network's square input: a 90-degree
turn commutes with that axis-aligned resize, so this is the same as turning the photo first
(up to interpolation), and the four copies go through the network as one batch.

Merging per-rotation top-k lists by each row's smallest distance is exact: a row in the top k of
the merged ranking (best at rotation r) is in rotation r's own top k, since every row closer under
r is also closer in the merged ranking. So it works through every index kind (approximate indexes
stay as approximate as one search). Re-rankers qualify only when their scores of different queries
are comparable (``Method.comparable_scores``): qe and dba+qe score cosine distances; diffusion and
k-reciprocal normalise scores per query (each copy's best row scores 0), so they are refused.
"""
from __future__ import annotations

import sys

import numpy as np

from ris.errors import RisError

ANGLES = (0, 90, 180, 270)


def turned(images: "np.ndarray | list[np.ndarray]") -> "np.ndarray | list[np.ndarray]":
    """(B, H, W, C) images, or a list of (H, W, C) images of several shapes (``--aspect keep``) ->
    their B * 4 copies at 0, 90, 180 and 270 degrees (anticlockwise), the four copies of one image
    consecutive: one array for square images, else a list (a quarter turn swaps height and width)."""
    from ris.aspect import stack_images

    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"(B, H, W, C) images expected, not {images.shape}")
        if images.shape[1] == images.shape[2]:
            return np.stack([np.rot90(images, k, axes=(1, 2)) for k in range(len(ANGLES))], axis=1).reshape(
                -1, *images.shape[1:])
    return stack_images([np.ascontiguousarray(np.rot90(im, k)) for im in images for k in range(len(ANGLES))])


def check_rerank(method: str) -> None:
    """Refuse a re-ranker whose scores of different query copies cannot be compared (one line)."""
    from ris.rerank import RERANKERS

    if method in RERANKERS and not RERANKERS[method].comparable_scores:
        ok = ", ".join(name for name, m in RERANKERS.items() if m.comparable_scores)
        raise RisError(f"--rotations does not work with --rerank {method}: its scores are normalised per query, "
                       f"so the scores of the four turned copies cannot be compared; use --rerank {ok}")


def merge_best(dist: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-copy top-k lists (V, k') of ONE query -> its (1, <=k) merged list: each row once, with its
    smallest distance over the copies, sorted by (distance, row). Empty slots (row < 0) and
    non-finite distances are dropped."""
    d = np.asarray(dist, np.float64).ravel()
    i = np.asarray(idx, np.int64).ravel()
    keep = (i >= 0) & np.isfinite(d)
    d, i = d[keep], i[keep]
    order = np.lexsort((d, i))  # by row, then distance: the first of each row is its best
    d, i = d[order], i[order]
    first = np.ones(len(i), bool)
    first[1:] = i[1:] != i[:-1]
    d, i = d[first], i[first]
    best = np.lexsort((i, d))[:k]
    return d[best][None].astype(np.float32), i[best][None]


def embed_turned(extractor, paths: list, batch: int = 16) -> np.ndarray:
    """(n, 4, D) descriptors of image files at 0/90/180/270 degrees, made as ``ris-search
    --rotations`` makes a query's (``load_image`` at the extractor's size and shape, then ``turned``).
    libjpeg's warnings about them are named on stderr, as ris-extract names them (``ris.jpeg_noise``)."""
    from ris.aspect import stack_images
    from ris.embed import raw_descriptors
    from ris.images import load_image
    from ris.jpeg_noise import naming

    out = []
    for s in range(0, len(paths), batch):
        with naming(lambda line: print(line, file=sys.stderr)):
            imgs = stack_images([load_image(p, extractor.max_size, extractor.aspect) for p in paths[s : s + batch]])
        vec = extractor.embed(turned(imgs))
        out.append(raw_descriptors(vec) if vec.ndim == 4 else vec)
    if not out:
        return np.zeros((0, len(ANGLES), 0), np.float32)
    v = np.concatenate(out)
    return v.reshape(len(paths), len(ANGLES), -1)
