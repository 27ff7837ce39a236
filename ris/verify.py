"""Geometric verification: re-rank the top of a ranked list with local features (spatial re-ranking).

Global CNN descriptors confuse objects that share a look (two CD covers, two cereal boxes); the same
physical object seen twice shares many local features in a consistent geometry. For each query the
``k`` best candidates of the global ranking (after any ``--rerank``) are matched with RootSIFT
(Arandjelovic & Zisserman 2012: SIFT, L1-normalised, square-rooted), Lowe's ratio test, then a
RANSAC homography; its inlier count moves verified candidates up:
``score = rank_term + weight * min(inliers, cap) / cap`` for candidates with ``>= min_inliers``
inliers, where ``rank_term`` is 1 for the first candidate and falls linearly to 0 at ``k``. The
rest of the list keeps its order.

Local features are computed once per image (the longest side scaled to ``side`` pixels, at most
``features`` keypoints, EXIF orientation applied as everywhere in ris) and kept in a sidecar beside
the database, ``feats.h5.local-sift<features>-<side>.h5``, keyed on the database's content key:
keypoint (x, y) as float16 and SIFT as uint8 (136 bytes a keypoint).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ris.errors import BadChoice

DEFAULTS: dict[str, float] = {"k": 30, "features": 500, "side": 512, "ratio": 0.8, "min_inliers": 20,
                              "cap": 50, "weight": 1.0, "threshold": 8.0}


def inlier_order(counts: np.ndarray, min_inliers: float, weight: float, cap: float) -> np.ndarray:
    """How a verified shortlist of ``len(counts)`` is reordered: each candidate scores its rank
    (1 for the first, falling linearly) plus, at ``min_inliers`` or more, ``weight`` x its capped
    inlier share; ties keep the global order. The one rule ``Verifier`` and the choice scripts use."""
    counts = np.asarray(counts)
    k = len(counts)
    score = 1.0 - np.arange(k) / max(k, 1)
    score = score + np.where(counts >= min_inliers, weight * np.minimum(counts, cap) / cap, 0.0)
    return np.lexsort((np.arange(k), -score))


def parse_settings(text: str) -> dict[str, float]:
    """``--verify-settings min_inliers=12,ratio=0.75``: the verification parameters other than K
    (``DEFAULTS``), checked here so that a typo is one line naming the known keys."""
    import argparse

    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS or key == "k":
            known = ", ".join(k for k in DEFAULTS if k != "k")
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE with KEY one of {known} (K is --verify)")
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: not a number") from None
        if not np.isfinite(number) or number < 0 or (key in ("features", "side", "cap") and number < 1):
            raise argparse.ArgumentTypeError(f"{key}={value}: must be a finite number >= {1 if key in ('features', 'side', 'cap') else 0}")
        out[key] = int(number) if key in ("features", "side", "cap", "min_inliers") else number
    return out


def check_params(params: Any) -> dict[str, Any]:
    """``verify`` settings given in Python (``ris.score``): a dict of ``DEFAULTS``' keys whose numbers
    are in the ranges --verify and --verify-settings take; a BadChoice naming the first that is not
    (k=-1 verified all but the last of each shortlist, a wrong key was a bare ValueError)."""
    from ris.train_checks import is_real, is_whole

    if not isinstance(params, Mapping):
        raise BadChoice(f"verify must be a dict of verification settings (k, features, ...) or None, not {params!r}")
    for key, value in params.items():
        if key not in DEFAULTS:
            raise BadChoice(f"verify: unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        least = 1 if key in ("k", "features", "side", "cap") else 0
        if value is not None and not (is_whole(value, least) if key == "k" else is_real(value) and value >= least):
            words = "a whole number" if key == "k" else "a number"
            raise BadChoice(f"verify: {key} must be {words}, {least} or more, not {value!r}")
    return dict(params)


SETTINGS_HELP = ("verification parameters other than K, KEY=VALUE joined by ',': "
                 + ", ".join(f"{k} (default {v:g})" for k, v in DEFAULTS.items() if k != "k")
                 + "; features and side choose the local features kept beside the database (built once per pair)")


@dataclass
class LocalFeatures:
    """Every image's keypoints and descriptors, packed: image i owns rows offsets[i]:offsets[i + 1]."""

    offsets: np.ndarray  # (N + 1,) int64
    xy: np.ndarray  # (M, 2) float16, pixels of the resized image
    desc: np.ndarray  # (M, 128) uint8 SIFT

    def of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.xy[s:e].astype(np.float32), root_sift(self.desc[s:e])

    def bytes_per_image(self) -> float:
        n = max(len(self.offsets) - 1, 1)
        return (self.xy.nbytes + self.desc.nbytes + self.offsets.nbytes) / n


def root_sift(desc: np.ndarray) -> np.ndarray:
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(1, keepdims=True), 1e-7)
    return np.sqrt(d)


def sift_of_image(img: np.ndarray, features: int = 500, side: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(xy float16 (n, 2), SIFT uint8 (n, 128)) of an RGB or grey uint8 image."""
    import cv2

    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    scale = side / max(g.shape[:2])
    if scale < 1:
        g = cv2.resize(g, (max(1, round(g.shape[1] * scale)), max(1, round(g.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    sift = cv2.SIFT_create(nfeatures=int(features))
    kps, desc = sift.detectAndCompute(g, None)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float16), np.zeros((0, 128), np.uint8)
    xy = np.array([k.pt for k in kps], np.float32)
    return xy.astype(np.float16), np.clip(np.round(desc), 0, 255).astype(np.uint8)


def sift_of_file(path: str | Path, features: int = 500, side: int = 512):
    from ris.images import decode_image

    return sift_of_image(decode_image(path, target=side), features, side)


def sidecar_path(features_db: str | Path, features: int, side: int) -> Path:
    return Path(f"{features_db}.local-sift{int(features)}-{int(side)}.h5")


def database_local_features(db, features_db: str | Path, features: int = 500, side: int = 512,
                            log: Callable[[str], None] | None = None,
                            dataset_root: str | Path | None = None) -> LocalFeatures:
    """The sidecar's local features, computed from the database's images on first use (under
    ``dataset_root``, else the folder the database was extracted from). Images that cannot be read
    get none (never verified), said in one warning; the cache is made again once one is back.
    libjpeg's warnings about them are named on stderr, as ris-extract names them (``ris.jpeg_noise``)."""
    from ris.jpeg_noise import naming
    from ris.sidecars import read_h5_cache, write_h5_cache

    path = sidecar_path(features_db, features, side)
    key = f"{db.content_key}:sift:{int(features)}:{int(side)}"
    root = Path(dataset_root) if dataset_root else None
    got = read_h5_cache(path, key)
    ids = db.image_ids
    if got is not None:
        unread = got.get("unread", np.zeros(0, np.int64))
        base = root or (Path(db.dataset_root) if db.dataset_root else None)
        if not len(unread) or base is None or not any((base / ids[int(r)]).is_file() for r in unread):
            return LocalFeatures(got["offsets"], got["xy"], got["desc"])
    root = root if root is not None and root.is_dir() else db.images_folder("geometric verification")
    t0 = time.perf_counter()
    xys, descs, offsets, unread = [], [], [0], []
    for n, i in enumerate(ids):
        try:
            with naming(lambda line: print(line, file=sys.stderr)):
                xy, d = sift_of_file(root / i, features, side)
        except Exception:  # an image gone or damaged since extraction: no local features, never verified
            xy, d = np.zeros((0, 2), np.float16), np.zeros((0, 128), np.uint8)
            unread.append(n)
        xys.append(xy)
        descs.append(d)
        offsets.append(offsets[-1] + len(d))
        if log and (n + 1) % 200 == 0:
            log(f"local features: {n + 1}/{len(ids)} images")
    lf = LocalFeatures(np.array(offsets, np.int64), np.concatenate(xys), np.concatenate(descs))
    if unread:
        print(f"warning: {features_db}: geometric verification: {len(unread)} image(s) could not be read under "
              f"{root} ({', '.join(ids[r] for r in unread[:3])}{', ...' if len(unread) > 3 else ''}); they are never "
              "verified (their local features are made again once they are back)", file=sys.stderr)
    try:
        write_h5_cache(path, key, {"seconds": time.perf_counter() - t0}, offsets=lf.offsets, xy=lf.xy, desc=lf.desc,
                       unread=np.array(unread, np.int64))
    except OSError:  # read-only next to the database, or no room: they still serve this run
        pass
    return lf


def inliers(q: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray], ratio: float = 0.8,
            threshold: float = 8.0) -> int:
    """RANSAC-homography inliers among the ratio-test matches of two images' RootSIFT."""
    import cv2

    (qxy, qd), (cxy, cd) = q, c
    if len(qd) < 4 or len(cd) < 4:
        return 0
    sim = qd @ cd.T  # RootSIFT: Hellinger kernel; squared distance = 2 - 2 sim
    top2 = np.argpartition(-sim, 1, axis=1)[:, :2]
    s2 = np.take_along_axis(sim, top2, 1)
    first = s2.argmax(1)
    best = top2[np.arange(len(qd)), first]
    d1 = 2 - 2 * s2.max(1)
    d2 = 2 - 2 * s2.min(1)
    ok = d1 < (ratio ** 2) * d2  # Lowe's ratio on distances, squared
    if ok.sum() < 4:
        return int(0)
    src, dst = qxy[ok], cxy[best[ok]]
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=500, confidence=0.99)
    return int(mask.sum()) if mask is not None else 0


@dataclass
class Verifier:
    """Local features of a set of database rows, and the settings to verify shortlists with."""

    local: LocalFeatures
    rows: np.ndarray  # database row of each gallery position
    p: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS))
    seconds: float = 0.0
    pairs: int = 0
    queries: int = 0

    @classmethod
    def for_database(cls, db, features_db: str | Path, rows: np.ndarray | None = None,
                     dataset_root: str | Path | None = None, **params) -> "Verifier":
        p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        unknown = set(p) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"verify: unknown parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        lf = database_local_features(db, features_db, int(p["features"]), int(p["side"]), dataset_root=dataset_root)
        rows = np.arange(len(lf.offsets) - 1) if rows is None else np.asarray(rows, np.int64)
        return cls(lf, rows, p)

    def describe(self) -> dict[str, Any]:
        return {"params": self.p, "bytes_per_image": round(self.local.bytes_per_image()),
                "ms_per_query": round(1000 * self.seconds / max(self.queries, 1), 1), "pairs": self.pairs}

    def rerank(self, query: tuple[np.ndarray, np.ndarray], shortlist: np.ndarray,
               rows: np.ndarray | None = None) -> np.ndarray:
        """``shortlist`` (gallery positions, best first) reordered; only its first ``k`` move.
        ``rows``: the database row of each gallery position (default ``self.rows``)."""
        rows = self.rows if rows is None else rows
        t0 = time.perf_counter()
        k = int(min(self.p["k"], len(shortlist)))
        head = shortlist[:k]
        counts = np.array([inliers(query, self.local.of(int(rows[j])), self.p["ratio"], self.p["threshold"])
                           for j in head])
        self.pairs += k
        self.queries += 1
        order = inlier_order(counts, self.p["min_inliers"], self.p["weight"], self.p["cap"])
        self.seconds += time.perf_counter() - t0
        return np.concatenate([head[order], shortlist[k:]])

    def evaluate(self, feats: np.ndarray, labels: np.ndarray, method: str = "none", metric: str = "euclidean",
                 query_rows: np.ndarray | None = None, recall_ks=(1, 4, 10), precision_ks=(10,), ns_k: int = 4):
        """``ris.evaluate.evaluate_reranked``'s scores, each query's list verified first (gallery = ``feats``)."""
        from ris.metrics import _Tally, labelled_queries, positives
        from ris.rerank import Reranker

        keep = np.asarray(labels) >= 0
        rows = self.rows[np.nonzero(keep)[0]]  # labelled_queries drops unlabelled rows: keep the map to ours
        feats, labels, qidx, without = labelled_queries(feats, labels, query_rows)
        n = len(labels)
        npos_all = positives(labels)
        reranker = Reranker(feats, method, metric)
        tally = _Tally(tuple(recall_ks), tuple(precision_ks), ns_k)
        for s in range(0, len(qidx), 64):
            qs = qidx[s: s + 64]
            _, idx = reranker.search(feats[qs], n - 1, query_rows=qs)
            for j, q in enumerate(qs):
                idx[j] = self.rerank(self.local.of(int(rows[q])), idx[j], rows)
            tally.add_ranked(labels, qs, idx, npos_all)
        return tally.scores(len(qidx), n, without, npos_all[qidx])


def verify_hits(hits: list, query_path: str | Path, verifier: Verifier, image_ids: list[str], k: int) -> list:
    """``ris-search --verify``: the engine's hits (a shortlist of at least the verifier's ``k``)
    reordered by geometric verification, renumbered, cut to ``k``. Distances stay the global ones."""
    from dataclasses import replace

    if not hits:
        return hits
    if all(getattr(h, "row", -1) >= 0 for h in hits):  # the engine's hits carry their rows
        rows = np.array([h.row for h in hits], np.int64)
    else:  # hits made elsewhere: find their rows by id (a pass over every id)
        row_of = {i: r for r, i in enumerate(image_ids)}
        rows = np.array([row_of[h.image_id] for h in hits], np.int64)
    q = sift_of_file(query_path, int(verifier.p["features"]), int(verifier.p["side"]))
    order = verifier.rerank((q[0].astype(np.float32), root_sift(q[1])), np.arange(len(hits)), rows)
    return [replace(hits[j], rank=r) for r, j in enumerate(order[:k], 1)]
