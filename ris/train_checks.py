"""What ``ris-train`` refuses before any work: a config its head cannot train, an output it could
not write (found after hours of fitting, not before), features that would make a NaN head."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ris.errors import DatabaseError, RisError, yes_no
from ris.splits import SPLIT_BY

if TYPE_CHECKING:
    from ris.train import TrainConfig


def is_real(v) -> bool:
    """A finite number (not a bool, not text): what a numeric setting given in Python must be."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def is_whole(v, least: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least


# the ranges ris-train's argparse types give its flags, for a TrainConfig made in Python (ris.fit_head),
# where whiten_dim=-1 or margin=-1 fitted a head silently and seed='a' failed inside Keras
_WHOLE = {"whiten_dim": 1, "out_dim": 1, "epochs": 1, "patience": 1, "batch_size": 1, "p": 2, "k": 2,
          "seed": 0, "shallow": 0, "unseen_classes": 0}
_ABOVE_0 = ("whiten_power", "margin", "learning_rate")
_CHOSEN = ("whiten_shrinkage", "whiten_power", "whiten_dim")  # None: chosen by cross-validation


def check_ranges(cfg: TrainConfig) -> None:
    """Refuse a setting outside what ris-train's flag for it takes, naming the setting."""
    def refuse(name: str, words: str) -> None:
        raise RisError(f"{name} must be {words}, not {getattr(cfg, name)!r}")

    for name, least in _WHOLE.items():
        value = getattr(cfg, name)
        if not (value is None and name in _CHOSEN) and not is_whole(value, least):
            refuse(name, f"a whole number, {least} or more")
    for name in _ABOVE_0:
        value = getattr(cfg, name)
        if not (value is None and name in _CHOSEN) and not (is_real(value) and value > 0):
            refuse(name, "a number greater than 0")
    if cfg.whiten_shrinkage is not None and not (is_real(cfg.whiten_shrinkage) and cfg.whiten_shrinkage >= 0):
        refuse("whiten_shrinkage", "a number, 0 or more")
    for name in ("dropout", "test_fraction", "val_fraction"):
        if not (is_real(getattr(cfg, name)) and 0 <= getattr(cfg, name) < 1):
            refuse(name, "a number in [0, 1)")
    if not isinstance(cfg.hidden, (tuple, list)) or not all(is_whole(h, 1) for h in cfg.hidden):
        refuse("hidden", "whole numbers, 1 or more")
    cfg.l2_normalize = yes_no("l2_normalize", cfg.l2_normalize)  # 'false' was true
    if not is_whole(cfg.folds, 0) or cfg.folds == 1:
        refuse("folds", "0 (off) or a whole number, 2 or more")


def check_config(cfg: TrainConfig, feature_shape: tuple[int, ...] | None = None) -> None:
    """Refuse, before any work, a config that cannot train on features of ``feature_shape``."""
    from ris.head import DISTANCES, HEADS, MININGS

    check_ranges(cfg)

    if cfg.arch not in HEADS or cfg.mining not in MININGS:  # name only the one that is wrong
        wrong = f"head {cfg.arch!r}" if cfg.arch not in HEADS else f"mining {cfg.mining!r}"
        raise RisError(f"unknown {wrong}; heads: {', '.join(HEADS)}; minings: {', '.join(MININGS)}")
    if cfg.distance not in DISTANCES:
        raise RisError(f"unknown distance {cfg.distance!r}; distances: {', '.join(DISTANCES)}")
    if cfg.split_by not in SPLIT_BY:
        raise RisError(f"--split-by must be one of {', '.join(SPLIT_BY)}, not {cfg.split_by!r}")
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise RisError(f"fold {cfg.fold} is not one of the {cfg.folds} folds (0 to {cfg.folds - 1})")
    if feature_shape is None:
        return
    if cfg.arch == "whiten":
        if cfg.shallow:
            raise RisError("--shallow trains a CNN branch; use it with --arch residual or --arch mlp")
        if len(feature_shape) != 1:
            raise RisError("--arch whiten needs pooled features (extract with --pool gap|mac|gem|rmac)")
    elif cfg.shallow and len(feature_shape) != 1:
        raise RisError("--shallow needs pooled features, not conv maps (extract with --pool gap|mac|gem|rmac)")


def refuse_non_finite(features_db: str | Path, feats: dict[str, np.ndarray], rows: dict[str, np.ndarray],
                       image_ids: list[str]) -> None:
    """NaN or inf features make a NaN head that still scores (NaN distances sort anywhere): refuse
    the database, naming the rows, before any fitting."""
    bad = np.sort(np.concatenate([r[~np.isfinite(f).all(axis=tuple(range(1, f.ndim)))] for r, f in
                                  ((rows[k], feats[k]) for k in feats)]))
    if len(bad):
        shown = ", ".join(image_ids[int(i)] for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
        rows_hold = f"{len(bad)} row{'s' if len(bad) > 1 else ''} hold"
        raise DatabaseError(f"{features_db}: {rows_hold} NaN or infinite features ({shown}); "
                            "extract them again (ris-extract --overwrite) before training")


def _check_writable(out: Path) -> None:
    """Make --output's folder and try a file in it before the hours of training, not after."""
    from ris.sidecars import create_locked

    probe = out.with_name(f"{out.name}.{os.getpid()}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.close(create_locked(probe))
        probe.unlink()
    except OSError as exc:
        raise RisError(f"{out}: cannot write the model there ({exc.strerror or exc})") from None


def check_output(features_db: str | Path, output: str | Path) -> None:
    """Never save a model over the database it learns from, an HDF5 file (a database) or any file
    that is not an earlier ris model (someone's own Keras model); and only under a .keras name:
    Keras 3 loads no other, so a head saved as ``head.model`` trained and then could not be used."""
    out = Path(output)
    if out.is_dir():
        raise RisError(f"{output}: is a folder; a head is saved as a .keras file: give --output {out / 'model.keras'}")
    if out.suffix.lower() != ".keras":
        raise RisError(f"{output}: a head is saved as a .keras file (Keras loads no other name); "
                       f"give --output {out.with_suffix('.keras').name if out.suffix else out.name + '.keras'}")
    _check_writable(out)
    if not out.exists():
        return
    if out.resolve() == Path(features_db).resolve():
        what = "the feature database itself"
    elif not out.is_file():
        what = "not a regular file"
    else:
        with open(out, "rb") as fh:
            hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
        if not hdf5:
            from ris.errors import ModelError
            from ris.modelio import read_meta

            try:
                read_meta(out)
                return  # a ris model saved before: replaced
            except ModelError:
                raise RisError(f"{output}: exists and is not a ris model (kept: only an earlier ris model is "
                               "replaced); delete it or choose another --output") from None
        what = "an HDF5 file (a feature database?)"
    raise RisError(f"{output}: is {what}; a model is saved as a new .keras file: choose another --output")


def remove_killed_saves(output: str | Path) -> list[Path]:
    """Delete the temps that saves of ``output`` and of its history, killed mid-way (``kill -9``),
    left beside them: when a run starts, not only when its own save ends (hours later). Only
    ``atomic_write``'s temps of these names that no live writer holds (``ris.sidecars``)."""
    from ris.sidecars import remove_abandoned_temps

    out = Path(output)
    stem = out.with_suffix("")
    return [*remove_abandoned_temps(out, ".keras"), *remove_abandoned_temps(Path(f"{stem}.history.csv")),
            *remove_abandoned_temps(Path(f"{stem}.history.png"))]
