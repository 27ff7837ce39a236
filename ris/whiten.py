"""Learned whitening, the default ``ris-train`` head: the closed form, its settings chosen by
cross-validation inside the training groups (the table of what each setting gained; its CSV and
plot: ``ris.train_report``), and the fitted head in NumPy (``WhiteningHead``) and as a Keras model
(``build_whitening_head``, saved).

Everything here is NumPy except ``build_whitening_head``, which imports Keras when called: the
evaluation and search of a whitening head never need Keras (``ris.modelio.load_model``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ris.errors import TooFewGroups
from ris.topk import l2_normalize

if TYPE_CHECKING:
    import keras

# Searched by choose_whitening; "off" (the raw descriptor) is always a candidate.
WHITEN_GRID = {"shrinkage": (0.1, 0.3, 1.0, 3.0), "power": (0.5, 0.25), "dim": (256, 512)}
# Used when the training groups are too few to hold some out (flags still override them).
FALLBACK = {"shrinkage": 1.0, "power": 0.5, "dim": 512}


def one_blas_thread():
    """A context in which BLAS/LAPACK runs on one thread.

    Why: the whitening fit is many small decompositions (eigh of 1280 x 1280 and less). With
    OpenBLAS's default threads they spin-wait for cores that other work holds: on a busy 2-core
    machine one 1280 x 1280 eigh took 12.8-45.8 s instead of 1.2-1.7 s on one thread, and ris-demo
    750 s instead of 199 s (bench/README.md). One thread also makes the fit the same on any machine.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _within_scatter(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean over all matching pairs of (x_a - x_b)(x_a - x_b)^T, from per-group scatter (no pair list)."""
    cov = np.zeros((x.shape[1], x.shape[1]))
    pairs = 0
    for g in np.unique(labels):
        xg = x[labels == g]
        k = len(xg)
        if k < 2:
            continue
        c = xg - xg.mean(0)
        cov += k * (c.T @ c)  # sum over a < b of the pair differences' outer products
        pairs += k * (k - 1) // 2
    if not pairs:
        raise TooFewGroups("learned whitening needs a group (object or class) with two or more training images; "
                           "every training group has one")
    return cov / pairs


def within_basis(features, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x as float64, mean, eigenvalues, eigenvectors) of the within-object scatter of matching
    pairs: what every shrinkage and power of ``learned_whitening`` shares on one training set.
    Why: shrinkage adds a multiple of the identity, which moves the eigenvalues and leaves the
    eigenvectors, so a grid over shrinkage needs one decomposition, not one per setting."""
    x = np.asarray(features, np.float64)
    with one_blas_thread():
        mean = x.mean(0)
        w, v = np.linalg.eigh(_within_scatter(x, np.asarray(labels)))
    return x, mean, w, v


def learned_whitening(features, labels, out_dim: int, shrinkage: float = 1.0,
                      power: float = 0.5, basis: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radenovic et al.'s learned whitening (Lw): whiten the within-object scatter of matching
    pairs, then rotate to the principal axes of the whitened training set and keep ``out_dim``.

    Fitted in closed form on training objects only. ``shrinkage`` adds that multiple of the mean
    eigenvalue to the within-object covariance (a few hundred objects cannot estimate a 1280 x 1280
    matrix); ``power`` 0.5 whitens fully, smaller values partially. ``basis``: ``within_basis`` of
    these features, when several settings are fitted on them. Returns (mean, P).
    """
    x, mean, w, v = basis if basis is not None else within_basis(features, labels)
    with one_blas_thread():
        w = w + shrinkage * w.mean()  # = eigenvalues of cov + shrinkage * trace(cov) / D * I
        pw = v / np.maximum(w, 1e-12) ** power
        xw = (x - mean) @ pw
        keep = min(out_dim, x.shape[1])
        if keep < len(xw) - 1 < x.shape[1]:  # fewer images than dimensions: the covariance's rank is below
            return mean.astype(np.float32), (pw @ _leading_axes(xw, keep)).astype(np.float32)  # D: n x n side
        w2, v2 = np.linalg.eigh(np.atleast_2d(np.cov(xw.T)))  # one dimension: a scalar otherwise
        order = np.argsort(w2)[::-1][:keep]
        return mean.astype(np.float32), (pw @ v2[:, order]).astype(np.float32)


def _leading_axes(xw: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` leading principal axes of the rows of ``xw`` (n x D, n < D) from the n x n Gram
    matrix: the same axes as the D x D covariance's eigenvectors (up to sign) at (n/D)^3 of the cost
    (3,560-dimensional fused features of 800 images: one decomposition per setting was minutes)."""
    c = xw - xw.mean(0)
    w, u = np.linalg.eigh(c @ c.T)
    order = np.argsort(w)[::-1][:keep]
    v = c.T @ u[:, order]
    return v / np.maximum(np.linalg.norm(v, axis=0), 1e-30)


@dataclass(frozen=True, eq=False)
class WhiteningHead:
    """The fitted head in NumPy: ``l2(l2(x) @ kernel + bias)``, the arithmetic of its Keras model
    (``kernel`` = P, ``bias`` = -mean @ P), so a saved whitening head is applied without Keras."""

    kernel: np.ndarray
    bias: np.ndarray
    l2_normalize: bool = True

    @classmethod
    def from_fit(cls, mean: np.ndarray, projection: np.ndarray, l2_normalize: bool = True) -> "WhiteningHead":
        kernel = np.asarray(projection, np.float32)
        return cls(kernel, -(np.asarray(mean, np.float32) @ kernel), l2_normalize)

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.kernel.shape[1])

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"the whitening head takes (n, {self.input_dim}) features, not {x.shape}")
        y = l2_normalize(x) @ self.kernel + self.bias
        return l2_normalize(y) if self.l2_normalize else y


def _apply_whitening(x, mean, proj):
    return l2_normalize((l2_normalize(np.asarray(x, np.float32)) - mean) @ proj)


def choose_whitening(features, labels, score: Callable, folds: int = 3, seed: int = 0,
                     grid: dict | None = None, max_eval: int = 4000,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Pick shrinkage, power and size of learned whitening by cross-validation inside the training set.

    Why: the best regularisation depends on the backbone and on how many objects there are, and the
    held-out objects may not be used to choose it. The inner folds hold out whole groups, so the
    choice is made for objects (or classes) the head has not seen. ``score(descriptors, labels)`` is
    higher-better (N-S or mAP). Returns the choice, its mean inner gain over the raw descriptor and
    the whole table; ``{"off": True}`` when nothing beat raw. Each held-out part is scored on at most
    ``max_eval`` images (whole groups, seeded), so the choice costs about the same on 100k training
    images as on 1k. ``progress`` gets a line per inner fold (minutes on large databases). Raises ``TooFewGroups`` when no fold leaves two groups on each side.
    """
    with one_blas_thread():  # many small fits and scorings: threads only spin on a busy machine
        return _choose_whitening(features, labels, score, folds, seed, grid, max_eval, progress)


def _choose_whitening(features, labels, score: Callable, folds: int, seed: int, grid: dict | None,
                      max_eval: int, progress: Callable[[str], None] | None = None) -> dict:
    grid = grid or WHITEN_GRID
    x = l2_normalize(np.asarray(features, np.float32))
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(np.unique(labels)), folds)
    held = [np.isin(labels, p) for p in parts]
    dims = sorted(d for d in grid["dim"] if d <= x.shape[1]) or [x.shape[1]]
    table: dict[tuple, list[float]] = {}
    raw = []
    t0 = time.perf_counter()
    for fold, te in enumerate(held, 1):
        tr = ~te
        if te.sum() > max_eval:  # score a seeded subset of the held-out groups
            groups, sizes = np.unique(labels[te], return_counts=True)
            order = rng.permutation(len(groups))
            keep = groups[order][: max(2, int(np.searchsorted(np.cumsum(sizes[order]), max_eval)))]
            te = te & np.isin(labels, keep)
        if len(np.unique(labels[te])) < 2 or len(np.unique(labels[tr])) < 2:
            continue
        raw.append(score(x[te], labels[te]))
        basis = within_basis(x[tr], labels[tr])  # one decomposition per fold serves the whole grid
        for shrink in grid["shrinkage"]:
            for power in grid["power"]:
                mean, proj = learned_whitening(x[tr], labels[tr], max(dims), shrink, power, basis=basis)
                for d in dims:
                    table.setdefault((shrink, power, d), []).append(
                        score(_apply_whitening(x[te], mean, proj[:, :d]), labels[te]))
        if progress is not None:
            progress(f"whitening: inner fold {fold}/{folds} ({len(grid['shrinkage']) * len(grid['power']) * len(dims)} "
                     f"settings scored, {time.perf_counter() - t0:.0f} s)")
    if not raw:
        raise TooFewGroups(f"too few groups ({len(np.unique(labels))}) to choose the whitening by "
                           f"{folds}-fold cross-validation")
    gains = {k: float(np.mean(v) - np.mean(raw)) for k, v in table.items()}
    best = max(gains, key=gains.get)
    rows = [{"shrinkage": k[0], "power": k[1], "dim": k[2], "inner_gain": g} for k, g in sorted(gains.items())]
    if gains[best] <= 0:
        return {"off": True, "inner_gain": 0.0, "inner_raw": float(np.mean(raw)), "table": rows}
    return {"off": False, "shrinkage": best[0], "power": best[1], "dim": best[2], "inner_gain": gains[best],
            "inner_raw": float(np.mean(raw)), "table": rows}


def fit_whitening(features: np.ndarray, labels: np.ndarray, shrinkage: float | None = None,
                  power: float | None = None, dim: int | None = None, metric: str = "N-S", seed: int = 0,
                  log: Callable[[str], None] = print,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Learned whitening with the settings given fixed and the rest (None) chosen by inner cross-validation.

    ``metric``: what the choice maximises, "N-S" (objects) or "mAP" (classes). Returns mean,
    projection and what was chosen (kept in the model's metadata). When no candidate beats the raw
    descriptor inside the training set, the projection is the identity: the head then ranks exactly
    like the off-the-shelf features. Too few groups to cross-validate: the fallback settings.
    """
    from ris.metrics import evaluate_retrieval

    fixed = {"shrinkage": shrinkage, "power": power, "dim": dim}
    chosen: dict[str, Any] = {k: v for k, v in fixed.items() if v is not None}
    chosen["selected_by"] = "command-line flags"

    def score(x, lab):
        r = evaluate_retrieval(x, lab, "euclidean", recall_ks=(), precision_ks=())
        return r.ns_score if metric == "N-S" else r.map

    if any(v is None for v in fixed.values()):
        grid = {k: (v,) if v is not None else WHITEN_GRID[k] for k, v in fixed.items()}
        try:
            # whole groups are held out in the inner folds even for Corel-style splits: the setting
            # must serve objects and classes the head has not seen, not only new images of known ones
            choice = choose_whitening(features, labels, score, folds=3, seed=seed, grid=grid, progress=progress)
        except TooFewGroups:
            chosen = {**FALLBACK, **{k: v for k, v in fixed.items() if v is not None},
                      "selected_by": "defaults (too few training groups to cross-validate)"}
            log(f"whitening: too few training groups to choose by cross-validation; using shrinkage "
                f"{chosen['shrinkage']}, power {chosen['power']}, {chosen['dim']} dims")
        else:
            chosen = {k: choice.get(k) for k in ("shrinkage", "power", "dim")}
            chosen.update(inner_gain=round(choice["inner_gain"], 5), inner_raw=round(choice["inner_raw"], 5),
                          off=choice["off"], selected_by="3-fold cross-validation over the training groups",
                          metric=metric, table=choice["table"])
            if choice["off"]:
                log(f"whitening: no setting beat the raw descriptor inside the training set (inner {metric} "
                    f"{choice['inner_raw']:.4f}); the head keeps the raw ranking")
            else:
                log(f"whitening: shrinkage {chosen['shrinkage']}, power {chosen['power']}, {chosen['dim']} dims "
                    f"(inner {metric} {choice['inner_raw']:.4f} -> +{choice['inner_gain']:.4f})")
    if chosen.get("off"):
        n = features.shape[1]
        return {"mean": np.zeros(n, np.float32), "projection": np.eye(n, dtype=np.float32), **chosen}
    mean, proj = learned_whitening(features, labels, int(chosen["dim"]), float(chosen["shrinkage"]),
                                   float(chosen["power"]))
    if proj.shape[1] != int(chosen["dim"]):  # asked for more than the features have: say what was fitted
        log(f"whitening: {chosen['dim']} dims asked for, the features have {proj.shape[1]}: keeping {proj.shape[1]}")
        chosen["dim"] = int(proj.shape[1])
    return {"mean": mean, "projection": proj, **chosen}


def build_whitening_head(mean, projection, l2_normalize: bool = True, name: str = "embedding") -> keras.Model:
    """The fixed linear head as a Keras model: (x - mean) @ P, then L2. Saved like a trained head."""
    import keras

    from ris.layers import L2Normalize

    inp = keras.Input((projection.shape[0],), name="features")
    dense = keras.layers.Dense(projection.shape[1], name="whitening", trainable=False)
    x = dense(L2Normalize(name="input_l2")(inp))
    head = WhiteningHead.from_fit(mean, projection, l2_normalize)
    dense.set_weights([head.kernel, head.bias])
    if l2_normalize:
        x = L2Normalize(name="l2norm")(x)
    return keras.Model(inp, x, name=name)
