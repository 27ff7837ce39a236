"""A training run's report beside its model (``model.history.csv`` and ``model.history.png``) and
whether the files there are the model's own.

``ris-train`` writes the report to temps first, records their SHA-256 in the model's ``ris.json``
(``report``), renames the model into place (the commit point), then the report. A run killed
between those renames (``kill -9``) leaves the new model beside the previous run's report, each
file whole: ``stale_report`` tells that from the digests, so ``ris-eval --model`` can say so
rather than let the old run's curves pass for the new head's. Models saved before the digests
were recorded are not checked.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ris.sidecars import atomic_write

REPORT_KEY = "report"  # in ris.json: {"files": {"<stem>.history.csv": sha256, "<stem>.history.png": sha256 | None}}


@dataclass
class Report:
    """What goes beside a model: the CSV's columns and rows, and a function drawing the plot
    (given ``matplotlib.pyplot``, it returns the figure)."""

    fieldnames: list[str]
    rows: list[dict[str, Any]]
    draw: Callable[[Any], Any]


def best_epoch_text(best_epoch: int | None, epochs_run: int | None) -> str:
    """'best epoch 3 of 10'; epoch 0 said for what it is (``epoch_zero_note``)."""
    return f"best epoch {best_epoch} of {epochs_run}" + epoch_zero_note(best_epoch)


def epoch_zero_note(best_epoch: int | None) -> str:
    """': ' and what epoch 0 is when it is the best, else "": 'best epoch 0 of 2' (or 'the best
    epoch so far (0)' of an interrupted run) read as a bug or a head that learned nothing useful,
    when it is the untrained head (a residual head starts as the off-the-shelf ranking) kept
    because no trained epoch beat it on the validation part. Every line reporting a best epoch
    uses it."""
    if best_epoch != 0:
        return ""
    return (": epoch 0 is the untrained head, the off-the-shelf ranking, kept because no epoch "
            "beat it on the validation part")


def report_paths(model_path: str | Path) -> tuple[Path, Path]:
    """(history CSV, plot PNG) beside ``model_path``."""
    stem = Path(model_path).with_suffix("")
    return Path(f"{stem}.history.csv"), Path(f"{stem}.history.png")


def history_report(history: list[dict[str, Any]], raw_val: float, metric: str = "N-S") -> Report:
    """A triplet head's epochs: loss and val/test score per epoch."""
    def draw(plt):
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
        return fig

    return Report(list(history[0]) if history else ["epoch"], history, draw)


def whitening_report(whitening: dict[str, Any]) -> Report:
    """Learned whitening's inner cross-validation table: what each setting gained over raw."""
    table = whitening.get("table") or []

    def draw(plt):
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(table) + 2), 3.6))
        labels = [f"s{r['shrinkage']:g} p{r['power']:g} d{r['dim']}" for r in table]
        chosen = [r["shrinkage"] == whitening.get("shrinkage") and r["power"] == whitening.get("power")
                  and r["dim"] == whitening.get("dim") and not whitening.get("off") for r in table]
        ax.bar(range(len(table)), [r["inner_gain"] for r in table], color=["C1" if c else "C0" for c in chosen])
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(table)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"inner {whitening.get('metric', 'score')} gain over raw")
        ax.set_title(f"learned whitening: {whitening.get('selected_by', '')}"
                     + (" (none chosen)" if whitening.get("off") else ""), fontsize=9)
        return fig

    return Report(["shrinkage", "power", "dim", "inner_gain"], table, draw)


def write_history(history: list[dict[str, Any]], model_path: Path, raw_val: float,
                  metric: str = "N-S") -> tuple[Path, Path | None]:
    """History as CSV next to the model, and a loss / N-S curve PNG a person can look at (each
    whole or not at all; no model saved: ``save_with_report`` does both)."""
    csv_path, png = report_paths(model_path)
    report = history_report(history, raw_val, metric)
    with atomic_write(csv_path) as tmp:
        _write_csv(report, tmp)
    if _pyplot() is None:  # a bare accelerator host: the CSV is still written
        return csv_path, None
    with atomic_write(png) as tmp:
        _write_png(report, tmp)
    return csv_path, png


def save_with_report(model, output: Path, meta: dict[str, Any], report: Report) -> tuple[Path, Path | None]:
    """Save ``model`` with ``meta`` and its report beside it; the model's rename is the commit point.

    Any failure before it leaves the old model and report as they were (temps removed). The report
    is renamed after it; the model's ``ris.json`` holds the report's digests, so a report left from
    an earlier run by a kill in between is told apart (``stale_report``)."""
    from ris.modelio import save_model

    csv_path, png_path = report_paths(output)
    plt = _pyplot()
    with atomic_write(csv_path) as tmp_csv:
        _write_csv(report, tmp_csv)
        with (atomic_write(png_path) if plt is not None else contextlib.nullcontext(None)) as tmp_png:
            if tmp_png is not None:
                _write_png(report, tmp_png)
            files = {csv_path.name: _sha256(tmp_csv), png_path.name: _sha256(tmp_png) if tmp_png else None}
            save_model(model, output, {**meta, REPORT_KEY: {"files": files}})
        # the PNG, then the CSV, are renamed into place as the blocks end
    return csv_path, png_path if plt is not None else None


def stale_report(model_path: str | Path) -> str | None:
    """One line naming the report files beside ``model_path`` that are not the ones its run wrote
    (a run killed between saving the model and its report left the previous run's); None when
    they agree, for a model saved before digests were recorded, for missing files, and for a model
    that cannot be read (its reader says why)."""
    from ris.errors import RisError
    from ris.modelio import read_meta

    model_path = Path(model_path)
    try:
        files = read_meta(model_path).get(REPORT_KEY, {}).get("files")
    except (RisError, OSError, AttributeError):
        return None
    if not isinstance(files, dict):
        return None
    stale = [str(path) for path in report_paths(model_path) if path.name in files and path.exists()
             and _sha256(path, checked=True) not in (None, files[path.name])]
    if not stale:
        return None
    return (f"{' and '.join(stale)} {'belongs' if len(stale) == 1 else 'belong'} to an earlier run of {model_path} "
            "(ris-train was stopped between saving the model and its history; the model's own numbers are in "
            "its ris.json)")


# --- files ---------------------------------------------------------------------------------------

def _pyplot():
    """``matplotlib.pyplot`` drawing to files (Agg), or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=report.fieldnames)
        w.writeheader()
        w.writerows(report.rows)


def _write_png(report: Report, path: Path) -> None:
    plt = _pyplot()
    fig = report.draw(plt)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)


def _sha256(path: Path, checked: bool = False) -> str | None:
    """Hex SHA-256 of a file; ``checked``: only a regular file within ``RIS_MAX_FILE_BYTES``, else None."""
    from ris.errors import BadImage
    from ris.imagefile import open_head

    h = hashlib.sha256()
    try:
        with (open_head(path) if checked else open(path, "rb")) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except (BadImage, OSError):
        if not checked:
            raise
        return None
    return h.hexdigest()
