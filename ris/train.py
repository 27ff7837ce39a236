"""Training the embedding head on stored features, with an honest split by object.

Objects (labels) are split, never images: ``test`` objects are held out from every decision
(no training, no checkpoint choice); ``val`` objects, carved from the training side, choose the
best epoch and stop early. Off-the-shelf features are scored on the same test objects.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ris.errors import DatabaseError, RisError
from ris.whiten import fit_whitening, write_whitening_report  # noqa: F401  (the default head; re-exported)

META_NAME = "ris.json"  # stored inside the .keras zip next to Keras' own files


@dataclass
class TrainConfig:
    arch: str = "whiten"  # learned whitening, closed form; 'mlp' = the blog's base network; 'residual'
    whiten_shrinkage: float | None = None  # whiten: None = chosen by cross-validation on training objects
    whiten_power: float | None = None  # whiten: 0.5 = full whitening, less = partial; None = chosen
    whiten_dim: int | None = None  # whiten: output size; None = chosen
    hidden: tuple[int, ...] = (512, 512)
    out_dim: int = 256  # mlp only; residual keeps the input size
    l2_normalize: bool = True
    dropout: float = 0.1
    pooling: str = "gap"  # when the database holds conv maps
    distance: str = "euclidean"
    margin: float = 0.2
    mining: str = "batch-hard"  # 'random' = the blog's random triplets
    epochs: int = 60
    batch_size: int = 128  # random mining: triplets per batch
    p: int = 32  # P x K batches: objects per batch
    k: int = 4  # P x K batches: views per object
    learning_rate: float = 1e-3
    patience: int = 10
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 0
    fold: int | None = None  # k-fold mode: which fold is the test set
    folds: int = 5
    shallow: int = 0  # thumbnail size of the shallow colour/texture branch (0 = none)
    split_by: str = "object"  # 'image' = split inside each class (Corel-style category retrieval)
    unseen_classes: int = 0  # split_by image: classes kept out of training entirely


# --- splits ----------------------------------------------------------------------------------

def split_objects(labels: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
                  fold: int | None = None, folds: int = 5) -> dict[str, np.ndarray]:
    """Label ids of train / val / test objects, seeded; ``fold`` picks the k-fold test part."""
    objects = np.unique(labels[labels >= 0])
    if len(objects) < 3:
        raise RisError(f"need at least 3 labelled objects to split, found {len(objects)}")
    perm = np.random.default_rng(seed).permutation(objects)
    if fold is not None:
        parts = np.array_split(perm, folds)
        test = parts[fold]
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    else:
        n_test = max(1, int(round(len(perm) * test_fraction))) if test_fraction > 0 else 0
        test, rest = perm[:n_test], perm[n_test:]
    n_val = max(1, int(round(len(objects) * val_fraction))) if val_fraction > 0 else 0
    val, train = rest[:n_val], rest[n_val:]
    if len(train) < 2:
        raise RisError("too few training objects after the split; lower --test-fraction/--val-fraction")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def rows_of(labels: np.ndarray, objects: np.ndarray) -> np.ndarray:
    return np.nonzero(np.isin(labels, objects))[0]


def split_images(labels: np.ndarray, test_fraction: float = 0.5, val_fraction: float = 0.1, seed: int = 0,
                 unseen_classes: int = 0, fold: int | None = None,
                 folds: int = 5) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Row ids of train / val / test images, split inside every class (Corel's 50/50 protocol).

    ``unseen_classes`` classes (seeded) give no image to train or val: their test images measure
    how the head does on classes it never saw. ``fold``: k-fold inside every class instead of
    ``test_fraction``: the test images of fold k are part k of each class's seeded permutation, so the
    ``folds`` test sets partition the labelled images. Returns (rows per part, unseen class ids).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    if len(classes) < 2 + unseen_classes:
        raise RisError(f"need at least {2 + unseen_classes} labelled classes, found {len(classes)}")
    unseen = np.sort(rng.choice(classes, size=unseen_classes, replace=False)) if unseen_classes else classes[:0]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in classes:
        rows = rng.permutation(np.nonzero(labels == c)[0])
        if fold is not None:
            chunks = np.array_split(rows, folds)
            test, rest = chunks[fold], np.concatenate([ch for i, ch in enumerate(chunks) if i != fold])
        else:
            n_test = int(round(len(rows) * test_fraction))
            test, rest = rows[:n_test], rows[n_test:]
        n_val = int(round(len(rows) * val_fraction))
        parts["test"].append(test)
        if c not in unseen:
            parts["val"].append(rest[:n_val])
            parts["train"].append(rest[n_val:])
    out = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    return out, unseen


def make_split(labels: np.ndarray, cfg: "TrainConfig") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rows of train / val / test, and a description stored with the model."""
    if cfg.split_by == "object":
        objs = split_objects(labels, cfg.test_fraction, cfg.val_fraction, cfg.seed, cfg.fold, cfg.folds)
        rows = {k: rows_of(labels, v) for k, v in objs.items()}
        return rows, {"by": "object", "objects": {k: v.tolist() for k, v in objs.items()}}
    if cfg.split_by == "image":
        rows, unseen = split_images(labels, cfg.test_fraction, cfg.val_fraction, cfg.seed, cfg.unseen_classes,
                                    cfg.fold, cfg.folds)
        return rows, {"by": "image", "unseen_classes": unseen.tolist()}
    raise RisError(f"--split-by must be object or image, not {cfg.split_by!r}")


# --- batch samplers --------------------------------------------------------------------------

def _groups(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    return {int(u): order[s:e] for u, s, e in zip(uniq, starts, list(starts[1:]) + [len(order)])}


def random_triplets(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(anchor, positive, negative) row triplets: every image is an anchor once per epoch,
    its positive drawn at random from the other members of its group (not always the first and
    last member, as the blog's sampler did), its negative from any other group."""
    groups = {g: rows for g, rows in _groups(labels).items() if len(rows) >= 2}
    anchors = np.concatenate(list(groups.values()))
    rng.shuffle(anchors)
    out = np.empty((len(anchors), 3), dtype=np.int64)
    n = len(labels)
    for i, a in enumerate(anchors):
        members = groups[int(labels[a])]
        pos = members[rng.integers(len(members) - 1)]
        if pos == a:
            pos = members[-1]
        neg = rng.integers(n)
        while labels[neg] == labels[a]:
            neg = rng.integers(n)
        out[i] = (a, pos, neg)
    return out


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """P objects x K views per batch; every object appears once per epoch."""
    groups = {g: rows for g, rows in _groups(labels).items() if len(rows) >= 2}
    objects = np.array(list(groups))
    rng.shuffle(objects)
    batches = []
    starts = list(range(0, len(objects), p))
    if len(starts) > 1 and len(objects) - starts[-1] < 2:
        starts.pop()  # a lone last object joins the previous batch
    for i, s in enumerate(starts):
        chunk = objects[s : starts[i + 1] if i + 1 < len(starts) else len(objects)]
        if len(chunk) < 2:
            continue
        rows = [rng.choice(groups[int(o)], size=k, replace=len(groups[int(o)]) < k) for o in chunk]
        batches.append(np.concatenate(rows))
    return batches


def _dataset(features: np.ndarray, labels: np.ndarray, cfg: TrainConfig, seed: int, fixed: bool = False):
    import keras

    from ris.head import MININGS

    class Batches(keras.utils.PyDataset):
        """Fresh triplets / P x K batches every epoch (fixed ones for validation)."""

        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self._make()

        def _make(self):
            if MININGS[cfg.mining].triplet_inputs:
                t = random_triplets(labels, self.rng)
                self.batches = [t[s : s + cfg.batch_size] for s in range(0, len(t), cfg.batch_size)]
            else:
                self.batches = pk_batches(labels, cfg.p, cfg.k, self.rng)

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            b = self.batches[i]
            if MININGS[cfg.mining].triplet_inputs:
                x = (features[b[:, 0]], features[b[:, 1]], features[b[:, 2]])
                return x, np.zeros((len(b), 1), np.float32)
            return features[b], labels[b].astype(np.float32)

        def on_epoch_end(self):
            if not fixed:
                self._make()

    return Batches()


# --- embedding and scoring -------------------------------------------------------------------

def embed_features(model, features, batch: int = 4096) -> np.ndarray:
    """Run the head over stored features in batches (an h5py dataset or an array)."""
    import keras

    outs = []
    for s in range(0, int(features.shape[0]), batch):
        x = np.asarray(features[s : s + batch], dtype=np.float32)
        outs.append(keras.ops.convert_to_numpy(model(x, training=False)))
    if not outs:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.concatenate(outs).astype(np.float32)


def raw_descriptors(features: np.ndarray, pooling: str = "gap") -> np.ndarray:
    """Off-the-shelf descriptor of stored features: pooled if maps, L2-normalised."""
    from ris.pooling import pool_numpy
    from ris.topk import l2_normalize

    return l2_normalize(pool_numpy(features, pooling) if features.ndim == 4 else features)


# --- saving ----------------------------------------------------------------------------------

def save_model(model, path: str | Path, meta: dict[str, Any]) -> Path:
    """Keras ``.keras`` file with our metadata inside; written atomically."""
    from ris.sidecars import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=".keras") as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(META_NAME, json.dumps(meta, indent=1, default=_json_default))
    return path


def load_model(path: str | Path):
    """(keras model, metadata); a clear error for a missing or foreign file."""
    import keras

    import ris.layers  # noqa: F401  (registers custom layers)

    path = Path(path)
    if not path.is_file():
        raise RisError(f"{path}: model file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read(META_NAME)) if META_NAME in zf.namelist() else None
    except zipfile.BadZipFile:
        raise RisError(f"{path}: not a .keras model file") from None
    if meta is None:
        raise RisError(f"{path}: not a ris model (no {META_NAME} metadata); train it with ris-train")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise RisError(f"{path}: cannot load model ({str(exc).splitlines()[0][:160]})") from None
    return model, meta


def check_compatible(meta: dict[str, Any], db_fingerprint: dict[str, Any], db_path: str) -> None:
    """Refuse a head trained on features made differently from this database's."""
    trained = meta.get("feature_fingerprint", {})
    diff = {k: (trained.get(k), db_fingerprint.get(k)) for k in db_fingerprint if trained.get(k) != db_fingerprint.get(k)}
    if diff:
        pretty = ", ".join(f"{k}: model={a!r} db={b!r}" for k, (a, b) in diff.items())
        raise DatabaseError(f"{db_path}: features were made differently from the model's training features ({pretty})")


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


# --- the training run ------------------------------------------------------------------------

@dataclass
class TrainResult:
    model_path: str
    best_epoch: int | None  # triplet heads; None for learned whitening (no epochs)
    epochs_run: int | None
    seconds: float  # fitting time: the epochs of a triplet head, the whole fit of learned whitening
    seconds_per_epoch: float | None
    split: dict[str, int]
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # test split: raw vs head
    history_path: str = ""
    plot_path: str = ""


def train_head(features_db: str | Path, output: str | Path, cfg: TrainConfig, progress: bool = True,
               log=lambda s: print(s, file=sys.stderr)) -> TrainResult:
    import keras

    from ris.featuredb import FeatureDB
    from ris.head import HEADS, MININGS, build_whitening_head
    from ris.metrics import evaluate_retrieval

    if cfg.arch not in HEADS or cfg.mining not in MININGS:
        raise RisError(f"unknown head {cfg.arch!r} or mining {cfg.mining!r}; heads: {', '.join(HEADS)}; "
                       f"minings: {', '.join(MININGS)}")

    keras.utils.set_random_seed(cfg.seed)
    with FeatureDB(features_db) as db:
        labels_all = db.labels
        if (labels_all >= 0).sum() == 0:
            raise DatabaseError(f"{features_db}: no labels; extract with --labels ukbench|folders|FILE.tsv")
        rows, split_meta = make_split(labels_all, cfg)
        feats = {name: db.read_rows(r) for name, r in rows.items()}
        inputs = feats
        if cfg.shallow:
            from ris.thumbs import database_thumbnails, with_thumbnails

            thumbs = database_thumbnails(db, cfg.shallow)
            inputs = {name: with_thumbnails(feats[name], thumbs[r]) for name, r in rows.items()}
        labs = {name: labels_all[r] for name, r in rows.items()}
        fp = db.fingerprint()
        label_names = db.label_names
        image_ids = db.image_ids
        feature_shape = tuple(db.features.shape[1:])
    n_obj = {k: len(np.unique(v)) for k, v in labs.items()}
    where = f"seed {cfg.seed}" + ("" if cfg.fold is None else f", fold {cfg.fold + 1}/{cfg.folds}")
    kind = "objects" if cfg.split_by == "object" else "classes"
    if cfg.arch == "whiten":  # no epochs to choose: the val part is fitted on too
        log(f"split by {cfg.split_by} ({where}): {n_obj['train'] + n_obj['val']}/{n_obj['test']} fit/test {kind}, "
            f"{len(rows['train']) + len(rows['val'])}/{len(rows['test'])} images")
    else:
        log(f"split by {cfg.split_by} ({where}): {n_obj['train']}/{n_obj['val']}/{n_obj['test']} train/val/test "
            f"{kind}, {len(rows['train'])}/{len(rows['val'])}/{len(rows['test'])} images")

    t0 = time.perf_counter()
    if cfg.arch == "whiten":
        if cfg.shallow:
            raise RisError("--shallow trains a CNN branch; use it with --arch residual or --arch mlp")
        if len(feature_shape) != 1:
            raise RisError("--arch whiten needs pooled features (extract with --pool gap|mac|gem|rmac)")
        fit_rows = np.concatenate([feats["train"], feats["val"]])
        fit_labels = np.concatenate([labs["train"], labs["val"]])
        whitening = fit_whitening(raw_descriptors(fit_rows), fit_labels, cfg, log)
        base = build_whitening_head(whitening.pop("mean"), whitening.pop("projection"), cfg.l2_normalize)
        run = None
    else:
        base, run = _train_triplet_head(feature_shape, inputs, feats, labs, rows, cfg, progress, log)
    seconds = time.perf_counter() - t0

    test_scores = {}
    if len(rows["test"]) >= 2:
        test_scores["raw"] = evaluate_retrieval(raw_descriptors(feats["test"], cfg.pooling), labs["test"], cfg.distance).to_dict()
        test_scores["head"] = evaluate_retrieval(embed_features(base, inputs["test"]), labs["test"], cfg.distance).to_dict()

    if split_meta.get("unseen_classes") and len(rows["test"]) >= 2:
        unseen_q = np.nonzero(np.isin(labs["test"], split_meta["unseen_classes"]))[0]
        test_scores["unseen_classes"] = {
            "raw": evaluate_retrieval(raw_descriptors(feats["test"], cfg.pooling), labs["test"], cfg.distance,
                                      query_rows=unseen_q).to_dict(),
            "head": evaluate_retrieval(embed_features(base, inputs["test"]), labs["test"], cfg.distance,
                                       query_rows=unseen_q).to_dict()}

    def names(objs):
        return [label_names[int(o)] if int(o) < len(label_names) else str(int(o)) for o in objs]

    split_store = {"by": split_meta["by"], "test_images": [image_ids[i] for i in rows["test"]],
                   "fit_images": [image_ids[i] for i in np.sort(np.concatenate([rows["train"], rows["val"]]))]}
    if split_meta["by"] == "object":
        split_store.update({k: names(v) for k, v in split_meta["objects"].items()})
    else:
        split_store["unseen_classes"] = names(split_meta["unseen_classes"])
    meta = {
        "format": "ris-head/1",
        "feature_fingerprint": fp,
        "feature_shape": list(feature_shape),
        "features_db": str(Path(features_db).resolve()),
        "config": asdict(cfg),
        "distance": cfg.distance,
        "split": split_store,
        **({"whitening": whitening} if run is None else {"best_epoch": run.best_epoch, "raw_val_ns": run.raw_val}),
        "fit_seconds": round(seconds, 3),
        "test_scores": test_scores,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_model(base, output, meta)
    if run is None:
        hist_path, plot_path = write_whitening_report(whitening, output)
        epochs = (None, None, None)
    else:
        hist_path, plot_path = write_history(run.history, output, run.raw_val, run.monitor_name)
        epochs = (run.best_epoch, len(run.history),
                  round(float(np.mean(run.epoch_times)) if run.epoch_times else 0.0, 3))
    return TrainResult(str(output), epochs[0], epochs[1], round(seconds, 2), epochs[2],
                       {k: int(n_obj[k]) for k in rows}, test_scores, str(hist_path), str(plot_path) if plot_path else "")


@dataclass
class _TripletRun:
    history: list[dict[str, Any]]
    best_epoch: int
    epoch_times: list[float]
    raw_val: float
    monitor_name: str


def _train_triplet_head(feature_shape: tuple[int, ...], inputs: dict[str, np.ndarray], feats: dict[str, np.ndarray],
                        labs: dict[str, np.ndarray], rows: dict[str, np.ndarray], cfg: TrainConfig,
                        progress: bool, log) -> tuple[Any, _TripletRun]:
    """Epochs of triplet training; the best epoch is chosen on the val objects (by training loss
    when they cannot score). Returns the head with the best epoch's weights."""
    import keras

    from ris.head import HEADS, MININGS, build_embedding_head, build_triplet_network, training_loss
    from ris.metrics import evaluate_retrieval

    base = build_embedding_head(feature_shape, cfg.hidden, cfg.out_dim, cfg.pooling, cfg.l2_normalize,
                                cfg.dropout, cfg.arch, cfg.shallow)
    model = build_triplet_network(base) if MININGS[cfg.mining].triplet_inputs else base
    loss = training_loss(cfg.mining, cfg.margin, cfg.distance)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=loss)

    def usable_groups(lab: np.ndarray) -> int:  # triplets need groups with a positive pair
        return int((np.unique(lab, return_counts=True)[1] >= 2).sum()) if len(lab) else 0

    if usable_groups(labs["train"]) < 2:
        raise RisError("fewer than 2 training groups with 2+ images: nothing to learn triplets from")
    train_ds = _dataset(inputs["train"], labs["train"], cfg, cfg.seed)
    use_val = usable_groups(labs["val"]) >= 2
    if not use_val:
        log("warning: fewer than 2 validation groups with 2+ images; the best epoch is chosen by training loss")
        rows["val"] = rows["val"][:0]
    val_ds = _dataset(inputs["val"], labs["val"], cfg, cfg.seed + 1, fixed=True) if use_val else None

    monitor_name = "N-S" if cfg.split_by == "object" else "mAP"  # classes of 100: N-S@4 says little

    def score(name: str, emb=None) -> float:
        if len(rows[name]) < 2:
            return float("nan")
        x = emb if emb is not None else embed_features(base, inputs[name])
        scores = evaluate_retrieval(x, labs[name], cfg.distance, recall_ks=(), precision_ks=())
        return scores.ns_score if monitor_name == "N-S" else scores.map

    raw_val = score("val", raw_descriptors(feats["val"], cfg.pooling)) if len(rows["val"]) else float("nan")
    history: list[dict[str, Any]] = []
    best = {"ns": -1.0, "epoch": 0, "weights": base.get_weights()}
    if HEADS[cfg.arch].starts_raw and use_val:  # epoch 0 = the off-the-shelf ranking: keep it unless beaten
        best["ns"] = score("val")
    wait = 0
    epoch_times = []
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        h = model.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0)
        epoch_times.append(time.perf_counter() - te)
        row = {"epoch": epoch, "loss": float(h.history["loss"][-1]),
               "val_loss": float(h.history.get("val_loss", [math.nan])[-1]),
               "val_score": score("val") if len(rows["val"]) else math.nan,
               "test_score": score("test"), "seconds": round(epoch_times[-1], 3)}
        history.append(row)
        monitor = row["val_score"] if not math.isnan(row["val_score"]) else -row["loss"]
        improved = monitor > best["ns"] + 1e-6
        if improved:
            best = {"ns": monitor, "epoch": epoch, "weights": base.get_weights()}
            wait = 0
        else:
            wait += 1
        if progress:
            log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  val_loss {row['val_loss']:.4f}  "
                f"val {monitor_name} {row['val_score']:.3f} (raw {raw_val:.3f})  {row['seconds']:.1f}s" + ("  *" if improved else ""))
        if wait >= cfg.patience:
            log(f"early stop: val {monitor_name} has not improved for {cfg.patience} epochs")
            break
    base.set_weights(best["weights"])
    return base, _TripletRun(history, best["epoch"], epoch_times, raw_val, monitor_name)


def write_history(history: list[dict[str, Any]], model_path: Path, raw_val: float,
                  metric: str = "N-S") -> tuple[Path, Path | None]:
    """History as CSV next to the model, and a loss / N-S curve PNG a person can look at."""
    stem = model_path.with_suffix("")
    csv_path = Path(f"{stem}.history.csv")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]) if history else ["epoch"])
        w.writeheader()
        w.writerows(history)
    png = Path(f"{stem}.history.png")
    try:
        import matplotlib
    except ImportError:  # a bare accelerator host: the CSV is still written
        return csv_path, None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(ep, [h["loss"] for h in history], label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], label="val loss")
    a1.set_xlabel("epoch"), a1.set_ylabel("triplet loss"), a1.legend()
    a2.plot(ep, [h["val_score"] for h in history], label=f"val {metric} (head)")
    a2.plot(ep, [h["test_score"] for h in history], label=f"test {metric} (head)", alpha=0.6)
    if not math.isnan(raw_val):
        a2.axhline(raw_val, color="gray", ls="--", label=f"val {metric} (raw features)")
    a2.set_xlabel("epoch"), a2.set_ylabel(metric), a2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return csv_path, png


def summarize_folds(results: list[TrainResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std over folds of the held-out scores, for raw features and the head."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in ("raw", "head"):
        rows = [r.scores[key] for r in results if key in r.scores]
        if not rows:
            continue
        metrics = {"ns_score": [r["ns_score"] for r in rows], "map": [r["map"] for r in rows],
                   "top4_accuracy": [r["top4_accuracy"] for r in rows],
                   "recall_at_1": [r["recall_at"]["1"] for r in rows]}
        out[key] = {m: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)} for m, v in metrics.items()}
    paired = [r for r in results if "raw" in r.scores and "head" in r.scores]
    if paired:  # head - raw on the same fold: the comparison that fold-to-fold spread does not blur
        out["delta"] = {}
        for m in ("ns_score", "map"):
            d = np.array([r.scores["head"][m] - r.scores["raw"][m] for r in paired])
            out["delta"][m] = {"mean": round(float(d.mean()), 4), "std": round(float(d.std()), 4),
                               "folds_better": int((d > 0).sum()), "folds_worse": int((d < 0).sum())}
    return out


def head_inputs(meta: dict[str, Any], db, rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """What a saved head eats for these database rows: features, plus thumbnails if it has a
    shallow branch."""
    size = int(meta.get("config", {}).get("shallow", 0) or 0)
    if not size:
        return feats
    from ris.thumbs import database_thumbnails, with_thumbnails

    return with_thumbnails(feats, database_thumbnails(db, size)[rows])
