"""Training the embedding head on stored features, with an honest split (``ris.splits``).

``test`` objects are held out from every decision (no training, no checkpoint choice); ``val``
objects, carved from the training side, choose the best epoch of a triplet head and stop it
early. Learned whitening (the default) is fitted in closed form by ``ris.whiten``; triplet heads
train here. Off-the-shelf features are scored on the same test objects. K folds: ``ris.kfold``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ris.embed import embed_features, raw_descriptors
from ris.errors import DatabaseError, RisError, TooFewGroups
from ris.protocol import TRAINING_IN_GALLERY
from ris.splits import make_split
from ris.train_checks import check_config, check_output, refuse_non_finite, remove_killed_saves
from ris.train_report import epoch_zero_note, history_report, save_with_report, whitening_report
from ris.whiten import WhiteningHead, build_whitening_head, fit_whitening


@dataclass
class TrainConfig:
    """How to fit a head (``ris.fit_head``'s keyword arguments, ``ris-train``'s flags); the fields say."""

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

    def split(self, labels: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """This config's train / val / test rows of ``labels`` (``ris.splits.make_split``)."""
        return make_split(labels, self.split_by, self.test_fraction, self.val_fraction, self.seed, self.fold,
                          self.folds, self.unseen_classes)


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
    whitening: dict[str, Any] | None = None  # learned whitening: what was chosen and how (None for triplet heads)
    interrupted_by: str | None = None  # SIGINT/SIGTERM ended the epochs: the best of epochs_run was saved


@dataclass
class _Data:
    """A training run's rows, features (and head inputs: features + thumbnails) and labels per part."""

    rows: dict[str, np.ndarray]
    split_meta: dict[str, Any]
    feats: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    labs: dict[str, np.ndarray]
    fingerprint: dict[str, Any]
    label_names: list[str]
    image_ids: list[str]
    feature_shape: tuple[int, ...]

    def groups(self) -> dict[str, int]:
        return {k: len(np.unique(v)) for k, v in self.labs.items()}


def _read_data(features_db: str | Path, cfg: TrainConfig, log: Callable[[str], None]) -> _Data:
    from ris.featuredb import FeatureDB

    with FeatureDB(features_db) as db:
        feature_shape = tuple(db.features.shape[1:])
        check_config(cfg, feature_shape)
        labels_all = db.labels
        if (labels_all >= 0).sum() == 0:
            raise DatabaseError(f"{features_db}: no labels; extract with --labels ukbench|folders|FILE.tsv")
        rows, split_meta = cfg.split(labels_all)
        feats = {name: db.read_rows(r) for name, r in rows.items()}
        refuse_non_finite(features_db, feats, rows, db.image_ids)
        inputs = feats
        if cfg.shallow:
            from ris.thumbs import database_thumbnails, with_thumbnails

            thumbs = database_thumbnails(db, cfg.shallow, log=log)  # a damaged JPEG's warning too
            inputs = {name: with_thumbnails(feats[name], thumbs[r]) for name, r in rows.items()}
        return _Data(rows, split_meta, feats, inputs, {name: labels_all[r] for name, r in rows.items()},
                     db.fingerprint(), db.label_names, db.image_ids, feature_shape)


def _log_split(data: _Data, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    n, rows = data.groups(), {k: len(v) for k, v in data.rows.items()}
    where = f"seed {cfg.seed}" + ("" if cfg.fold is None else f", fold {cfg.fold + 1}/{cfg.folds}")
    kind = "objects" if cfg.split_by == "object" else "classes"
    if cfg.arch == "whiten":  # no epochs to choose: the val part is fitted on too
        fit = len(np.unique(np.concatenate([data.labs["train"], data.labs["val"]])))  # by image: shared classes
        log(f"split by {cfg.split_by} ({where}): {fit}/{n['test']} fit/test {kind}, "
            f"{rows['train'] + rows['val']}/{rows['test']} images")
    else:
        log(f"split by {cfg.split_by} ({where}): {n['train']}/{n['val']}/{n['test']} train/val/test "
            f"{kind}, {rows['train']}/{rows['val']}/{rows['test']} images")


def _fit_whitening_head(data: _Data, cfg: TrainConfig, log: Callable[[str], None], progress: bool = False):
    """(Keras model to save, NumPy head to score with, what was chosen) of learned whitening fitted
    on the train and val parts together."""
    fit_rows = np.concatenate([data.feats["train"], data.feats["val"]])
    fit_labels = np.concatenate([data.labs["train"], data.labs["val"]])
    whitening = fit_whitening(raw_descriptors(fit_rows), fit_labels, cfg.whiten_shrinkage, cfg.whiten_power,
                              cfg.whiten_dim, metric="N-S" if cfg.split_by == "object" else "mAP", seed=cfg.seed,
                              log=log, progress=log if progress else None)
    mean, projection = whitening.pop("mean"), whitening.pop("projection")
    return (build_whitening_head(mean, projection, cfg.l2_normalize),
            WhiteningHead.from_fit(mean, projection, cfg.l2_normalize), whitening)


def _test_scores(head, data: _Data, cfg: TrainConfig) -> dict[str, Any]:
    """Raw and head scores, test queries searching every labelled image (as ``ris-eval --model``);
    ``test_gallery``: searching only each other (the flattering fold protocol); unseen classes alone."""
    from ris.metrics import evaluate_retrieval

    if len(data.rows["test"]) < 2:
        return {}
    parts = ("train", "val", "test")
    lab = np.concatenate([data.labs[p] for p in parts])
    raw = raw_descriptors(np.concatenate([data.feats[p] for p in parts]), cfg.pooling)
    emb = np.concatenate([embed_features(head, data.inputs[p]) for p in parts if len(data.inputs[p])])
    first = len(lab) - len(data.rows["test"])
    test = np.arange(first, len(lab))

    def both(x_raw, x_emb, labels, queries=None) -> dict[str, Any]:
        return {"raw": evaluate_retrieval(x_raw, labels, cfg.distance, query_rows=queries).to_dict(),
                "head": evaluate_retrieval(x_emb, labels, cfg.distance, query_rows=queries).to_dict()}

    protocol = f"held-out queries search the whole collection; {TRAINING_IN_GALLERY[cfg.split_by]}"
    scores: dict[str, Any] = {"protocol": protocol, **both(raw, emb, lab, test),
                              "test_gallery": both(raw[first:], emb[first:], lab[first:])}
    if data.split_meta.get("unseen_classes"):
        scores["unseen_classes"] = both(raw, emb, lab, test[np.isin(lab[first:], data.split_meta["unseen_classes"])])
    return scores


def _split_store(data: _Data) -> dict[str, Any]:
    """The split as saved with the model: names, not label ids, and the test images by id."""
    def names(objs):
        return [data.label_names[int(o)] if int(o) < len(data.label_names) else str(int(o)) for o in objs]

    from ris.protocol import content_sketch, sketch_thresholds

    meta = data.split_meta
    rows = np.concatenate([data.rows["train"], data.rows["val"]])
    order = np.argsort(rows)
    cuts = sketch_thresholds(data.feats["train"], data.feats["val"])
    unordered = content_sketch(data.feats["train"], cuts) + content_sketch(data.feats["val"], cuts)  # no joined copy
    sketches = [unordered[i] for i in order]
    store = {"by": meta["by"], "test_images": [data.image_ids[i] for i in data.rows["test"]],
             "fit_images": [data.image_ids[i] for i in rows[order]],  # never scored as held-out (ris.protocol)
             "fit_sketches": sketches,  # ... recognised by content too, not by name alone
             "fit_sketch_thresholds": cuts}
    if meta["by"] == "object":
        store.update({k: names(v) for k, v in meta["objects"].items()})
    else:
        store["unseen_classes"] = names(meta["unseen_classes"])
    return store


def train_head(features_db: str | Path, output: str | Path, cfg: TrainConfig, progress: bool = True,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> TrainResult:
    """Split, fit or train ``cfg.arch``, score it on the test part, save it with its metadata and
    its report (history or whitening table) beside ``output``."""
    import keras

    check_config(cfg)
    check_output(features_db, output)
    for tmp in remove_killed_saves(output):
        log(f"removed {tmp}: left by a killed save")
    keras.utils.set_random_seed(cfg.seed)
    data = _read_data(features_db, cfg, log)
    _log_split(data, cfg, log)

    t0 = time.perf_counter()
    if cfg.arch == "whiten":
        base, scorer, whitening = _fit_whitening_head(data, cfg, log, progress)
        run = None
    else:
        base, run = _train_triplet_head(data, cfg, progress, log)
        if run.interrupted and not run.history:
            from ris.errors import Interrupted

            raise Interrupted(f"interrupted ({run.interrupted}) during epoch 1, before any epoch was complete: "
                              f"nothing saved ({output} is as it was)")
        scorer = base
    seconds = time.perf_counter() - t0
    test_scores = _test_scores(scorer, data, cfg)
    meta = {
        "feature_fingerprint": data.fingerprint,
        "feature_shape": list(data.feature_shape),
        "features_db": str(Path(features_db).resolve()),
        "config": asdict(cfg),
        "distance": cfg.distance,
        "split": _split_store(data),
        **({"whitening": whitening} if run is None else {"best_epoch": run.best_epoch, "raw_val_ns": run.raw_val}),
        "fit_seconds": round(seconds, 3),
        "test_scores": test_scores,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if run is None:
        report, epochs = whitening_report(whitening), (None, None, None)
    else:
        meta["history"] = run.history  # the model keeps its own epochs: its CSV may be lost or be another run's
        report = history_report(run.history, run.raw_val, run.monitor_name)
        epochs = (run.best_epoch, len(run.history),
                  round(float(np.mean(run.epoch_times)) if run.epoch_times else 0.0, 3))
    hist_path, plot_path = save_with_report(base, output, meta, report)  # the model's rename commits the run
    return TrainResult(str(output), epochs[0], epochs[1], round(seconds, 2), epochs[2],
                       {k: int(n) for k, n in data.groups().items()}, test_scores, str(hist_path),
                       str(plot_path) if plot_path else "", whitening if run is None else None,
                       None if run is None else run.interrupted)


@dataclass
class _TripletRun:
    history: list[dict[str, Any]]
    best_epoch: int
    epoch_times: list[float]
    raw_val: float
    monitor_name: str
    interrupted: str | None = None  # the signal (SIGINT, SIGTERM) that stopped the epochs


def _train_triplet_head(data: _Data, cfg: TrainConfig, progress: bool, log) -> tuple[Any, _TripletRun]:
    """Epochs of triplet training; the best epoch is chosen on the val objects (by training loss
    when they cannot score). Returns the head with the best epoch's weights; Ctrl-C or SIGTERM
    ends the epochs after the current batch (``ris.train_stop``), the epoch it cut short dropped."""
    from ris.train_stop import stop_between_batches

    with stop_between_batches() as stop:
        base, run = _triplet_epochs(data, cfg, progress, log, stop)
    if stop and run.history:  # the normal end from here: scored and saved by train_head
        log(f"stopping ({stop.signal}) after {len(run.history)} complete epochs: scoring and saving the best so "
            f"far, epoch {run.best_epoch}{epoch_zero_note(run.best_epoch)} (Ctrl-C again to stop at once, saving "
            "nothing)")
    return base, run


def _triplet_epochs(data: _Data, cfg: TrainConfig, progress: bool, log, stop) -> tuple[Any, _TripletRun]:
    import keras

    from ris.head import HEADS, MININGS, build_embedding_head, build_triplet_network, training_loss
    from ris.metrics import evaluate_retrieval
    from ris.samplers import batches

    inputs, labs = data.inputs, data.labs

    def usable_groups(lab: np.ndarray) -> int:  # triplets need groups with a positive pair
        return int((np.unique(lab, return_counts=True)[1] >= 2).sum()) if len(lab) else 0

    if usable_groups(labs["train"]) < 2:
        raise TooFewGroups("fewer than 2 training groups with two or more images: nothing to learn triplets from")
    use_val = usable_groups(labs["val"]) >= 2
    if not use_val:
        log("warning: fewer than 2 validation groups with 2+ images; the best epoch is chosen by training loss")
    scored = {"val": len(labs["val"]) if use_val else 0, "test": len(labs["test"])}

    base = build_embedding_head(data.feature_shape, cfg.hidden, cfg.out_dim, cfg.pooling, cfg.l2_normalize,
                                cfg.dropout, cfg.arch, cfg.shallow)
    triplets = MININGS[cfg.mining].triplet_inputs
    model = build_triplet_network(base) if triplets else base
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                  loss=training_loss(cfg.mining, cfg.margin, cfg.distance))
    train_ds = batches(inputs["train"], labs["train"], triplets, cfg.seed, cfg.batch_size, cfg.p, cfg.k)
    val_ds = (batches(inputs["val"], labs["val"], triplets, cfg.seed + 1, cfg.batch_size, cfg.p, cfg.k, fixed=True)
              if use_val else None)

    monitor_name = "N-S" if cfg.split_by == "object" else "mAP"  # classes of 100: N-S@4 says little

    def score(name: str, emb=None) -> float:
        if scored[name] < 2:
            return float("nan")
        x = emb if emb is not None else embed_features(base, inputs[name])
        scores = evaluate_retrieval(x, labs[name], cfg.distance, recall_ks=(), precision_ks=())
        return scores.ns_score if monitor_name == "N-S" else scores.map

    raw_val = score("val", raw_descriptors(data.feats["val"], cfg.pooling)) if scored["val"] else float("nan")
    history: list[dict[str, Any]] = []
    best = {"ns": -math.inf, "epoch": 0, "weights": base.get_weights()}  # without val: -loss, which may be below -1
    if HEADS[cfg.arch].starts_raw and use_val:  # epoch 0 = the off-the-shelf ranking: keep it unless beaten
        best["ns"] = score("val")
    wait = 0
    epoch_times = []
    for epoch in range(1, cfg.epochs + 1):
        if stop:  # asked while the head was built or the last epoch scored (that epoch counts)
            break
        te = time.perf_counter()
        h = model.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0, callbacks=[stop.callback()])
        if stop:  # cut short: not a complete epoch
            break
        epoch_times.append(time.perf_counter() - te)
        if not _finite_epoch(h.history, base, inputs["train"][:256]):
            epoch_times.pop()
            diverged = (f"the loss, weights or embeddings are not finite (NaN or inf) after epoch {epoch} "
                        f"(--lr {cfg.learning_rate:g}: try a lower one)")
            if not history:
                raise RisError(f"training diverged: {diverged}; no head saved")
            log(f"warning: training stopped: {diverged}; the best epoch before it is kept")
            break
        row = {"epoch": epoch, "loss": float(h.history["loss"][-1]),
               "val_loss": float(h.history.get("val_loss", [math.nan])[-1]),
               "val_score": score("val") if scored["val"] else math.nan,
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
            watched = (f"val_loss {row['val_loss']:.4f}  val {monitor_name} {row['val_score']:.3f} (raw {raw_val:.3f})"
                       if use_val else "no validation part: best by training loss")
            log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  {watched}  {row['seconds']:.1f}s" + ("  *" if improved else ""))
        if wait >= cfg.patience:
            judge = f"val {monitor_name}" if use_val else "the training loss"  # what chose the best epoch
            log(f"early stop: {judge} has not improved for {cfg.patience} epoch{'s' if cfg.patience != 1 else ''}")
            break
    base.set_weights(best["weights"])
    return base, _TripletRun(history, best["epoch"], epoch_times, raw_val, monitor_name, stop.signal)


def _finite_epoch(history: dict[str, list], base, probe: np.ndarray) -> bool:
    """False when an epoch diverged: its losses (val_loss too: finite weights whose embeddings
    overflow gave 'val_loss nan' and a saved head scoring mAP 3.0), weights or embeddings of a few
    training rows are NaN or inf."""
    losses = [history[k][-1] for k in ("loss", "val_loss") if history.get(k)]
    return (all(math.isfinite(v) for v in losses) and all(np.isfinite(w).all() for w in base.get_weights())
            and bool(np.isfinite(embed_features(base, probe)).all()))
