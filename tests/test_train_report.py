"""A training run's report beside its model: saved with the model's rename as the commit point, and
a report file of another run named, never trusted (``ris.train_report``)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from ris.modelio import read_meta, save_model
from ris.testing import call_with_fifo_guard
from ris.train_report import history_report, report_paths, save_with_report, stale_report

META = {"config": {"arch": "whiten", "l2_normalize": True}, "split": {"by": "object", "test_images": []},
        "feature_fingerprint": {"model": "synthetic"}}
ROWS = [{"epoch": 1, "loss": 0.3, "val_loss": 0.2, "val_score": 3.5, "test_score": 3.4, "seconds": 1.0}]


def _head():
    pytest.importorskip("keras")
    from ris.whiten import build_whitening_head

    rng = np.random.default_rng(0)
    return build_whitening_head(rng.normal(size=8).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32))


def test_a_model_saved_before_report_digests_is_not_checked(tmp_path):
    """Heads trained before the model recorded its report's digests still load and say nothing."""
    model = save_model(_head(), tmp_path / "h.keras", META)
    for path in report_paths(model):
        path.write_text("from some run\n")
    assert stale_report(model) is None


def test_each_report_file_of_another_run_is_named_and_a_missing_one_is_not(tmp_path, monkeypatch):
    """A plot left by an earlier run where this one drew none (matplotlib missing) is another run's;
    a report file the user deleted is no disagreement."""
    import ris.train_report as report

    pytest.importorskip("matplotlib")
    model = tmp_path / "h.keras"
    csv_path, png_path = save_with_report(_head(), model, META, history_report(ROWS, 3.0))
    assert png_path is not None and stale_report(model) is None
    assert read_meta(model)["report"]["files"] == {"h.history.csv": report._sha256(csv_path),
                                                   "h.history.png": report._sha256(png_path)}
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    assert save_with_report(_head(), model, META, history_report(ROWS * 2, 3.0))[1] is None
    assert stale_report(model) == (f"{png_path} belongs to an earlier run of {model} (ris-train was stopped between "
                                   "saving the model and its history; the model's own numbers are in its ris.json)")
    png_path.unlink()
    csv_path.unlink()
    assert stale_report(model) is None


def test_a_save_that_fails_before_the_model_is_renamed_leaves_the_old_run_whole(tmp_path, monkeypatch):
    """Nothing under the final names changes and no temp is left when the model cannot be saved."""
    import ris.modelio

    model = tmp_path / "h.keras"
    save_with_report(_head(), model, META, history_report(ROWS, 3.0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(model))

    monkeypatch.setattr(ris.modelio, "save_model", full)
    with pytest.raises(OSError):
        save_with_report(_head(), model, META, history_report(ROWS * 3, 2.0))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert stale_report(model) is None


def test_a_fifo_named_as_the_history_is_never_opened(tmp_path):
    model = tmp_path / "h.keras"
    csv_path, _ = save_with_report(_head(), model, META, history_report(ROWS, 3.0))
    csv_path.unlink()
    os.mkfifo(csv_path)
    assert call_with_fifo_guard(lambda: stale_report(model), csv_path) is None
