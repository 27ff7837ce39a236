"""The k-fold loop: one head per fold at its own path, and the summary's means and paired deltas."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ris.kfold
from ris.kfold import fold_path, format_summary, summarize_folds, train_folds
from ris.train import TrainConfig, TrainResult


def _result(raw_ns: float, head_ns: float, raw_map: float, head_map: float) -> TrainResult:
    def scores(ns, m):
        return {"ns_score": ns, "map": m, "top4_accuracy": ns * 25, "recall_at": {"1": m}}

    return TrainResult("m.keras", None, None, 1.0, None, {"train": 8, "val": 1, "test": 3},
                       {"raw": scores(raw_ns, raw_map), "head": scores(head_ns, head_map)})


def test_fold_paths_keep_the_suffix():
    assert fold_path("out/model.keras", 0) == Path("out/model.fold1.keras")
    assert fold_path(Path("m.keras"), 4).name == "m.fold5.keras"


def test_train_folds_trains_each_fold_once_at_its_path(monkeypatch, tmp_path):
    calls = []

    def fake_train(db, output, cfg, progress=True, log=None):
        calls.append((Path(output).name, cfg.fold, cfg.folds, cfg.arch, progress))
        return _result(3.0, 3.0 + cfg.fold, 0.5, 0.5)

    monkeypatch.setattr(ris.kfold, "train_head", fake_train)
    lines: list[str] = []
    results = train_folds("f.h5", tmp_path / "h.keras", TrainConfig(arch="mlp", fold=None), 3, progress=False,
                          log=lines.append)
    assert calls == [(f"h.fold{k + 1}.keras", k, 3, "mlp", False) for k in range(3)]
    assert [r.scores["head"]["ns_score"] for r in results] == [3.0, 4.0, 5.0]
    assert lines == ["== fold 1/3", "== fold 2/3", "== fold 3/3"]


def test_summary_is_mean_and_std_over_folds_with_paired_deltas():
    results = [_result(3.0, 3.5, 0.5, 0.6), _result(3.5, 3.4, 0.7, 0.7), _result(2.5, 3.0, 0.6, 0.8)]
    s = summarize_folds(results)
    assert s["raw"]["ns_score"] == {"mean": 3.0, "std": round(float(np.std([3.0, 3.5, 2.5])), 4)}
    assert s["head"]["recall_at_1"]["mean"] == pytest.approx(0.7)
    d = s["delta"]["ns_score"]
    assert d["mean"] == pytest.approx(round((0.5 - 0.1 + 0.5) / 3, 4))
    assert (d["folds_better"], d["folds_worse"]) == (2, 1)
    assert (s["delta"]["map"]["folds_better"], s["delta"]["map"]["folds_worse"]) == (2, 0)  # one tie
    text = format_summary(s, 3)
    assert "raw: N-S 3.0000" in text and "(better in 2, worse in 1 of 3)" in text


def test_summary_of_folds_without_test_scores_is_empty():
    empty = TrainResult("m.keras", None, None, 1.0, None, {}, {})
    assert summarize_folds([empty, empty]) == {} and format_summary({}, 2) == ""


def test_a_fold_output_that_would_be_refused_is_refused_before_the_first_fold(tmp_path, capsys):
    """ris-train --folds 3 with someone's own file at model.fold3.keras trained folds 1 and 2 (their
    time spent) before refusing it: every fold's --output is checked before any work."""
    from ris.cli.common import run
    from ris.cli.train import main
    from ris.kfold import fold_path
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(120, 16), labels=[f"o{i // 4}" for i in range(120)])
    out = tmp_path / "model.keras"
    fold_path(out, 2).write_text("not a model")
    assert run("ris-train", main, ["--features-db", str(db), "--output", str(out), "--folds", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(fold_path(out, 2)) in err and "not a ris model" in err, err
    assert not fold_path(out, 0).exists() and fold_path(out, 2).read_text() == "not a model"


def test_a_fold_cut_short_by_ctrl_c_keeps_its_best_epoch_and_stops_the_folds(monkeypatch, tmp_path):
    """Ctrl-C or SIGTERM in fold 2's epochs: that fold saved its best epoch so far (``train_head``);
    the folds after it are not started and no summary is made of an unfinished run."""
    from dataclasses import replace

    from ris.errors import Interrupted

    calls = []

    def fake_train(db, output, cfg, progress=True, log=None):
        calls.append(cfg.fold)
        r = replace(_result(3.0, 3.5, 0.5, 0.6), model_path=str(output), best_epoch=2, epochs_run=3)
        return replace(r, interrupted_by="SIGTERM") if cfg.fold == 1 else r

    monkeypatch.setattr(ris.kfold, "train_head", fake_train)
    with pytest.raises(Interrupted) as caught:
        train_folds("f.h5", tmp_path / "h.keras", TrainConfig(arch="mlp"), 3, progress=False, log=lambda s: None)
    assert calls == [0, 1]
    msg = str(caught.value)
    assert "fold 2/3" in msg and str(fold_path(tmp_path / "h.keras", 1)) in msg and "best epoch so far (2)" in msg, msg


def test_summary_on_groups_smaller_than_4_says_what_a_perfect_search_scores():
    """Holidays-style scenes of 2-3 images: a fold N-S of 2.9 may be a perfect search; the summary
    says so with the same value and wording as ris-eval --folds."""
    from ris.metrics import ns_note

    results = [_result(2.5, 2.7, 0.6, 0.7), _result(2.6, 2.8, 0.6, 0.7)]
    for r, p in zip(results, (2.8, 3.0)):
        r.scores["raw"]["ns_perfect"] = r.scores["head"]["ns_perfect"] = p
    s = summarize_folds(results)
    assert s["ns_perfect"] == 2.9
    text = format_summary(s, 2)
    assert f"{ns_note(2.9)} (mean over the folds)" in text and "N-S 2.900" in text
    four = summarize_folds([_result(3.0, 3.5, 0.5, 0.6)])  # groups of 4 (UKBench): no note
    assert "perfect search" not in format_summary(four, 1)


def test_a_fold_cut_short_at_epoch_0_says_what_epoch_0_is(monkeypatch, tmp_path):
    """'its best epoch so far (0) is saved' did not say what epoch 0 is: a residual head's untrained
    start, the off-the-shelf ranking, which no complete epoch beat on the validation part."""
    from dataclasses import replace

    from ris.errors import Interrupted

    def fake_train(db, output, cfg, progress=True, log=None):
        r = replace(_result(3.0, 3.0, 0.5, 0.5), model_path=str(output), best_epoch=0, epochs_run=2)
        return replace(r, interrupted_by="SIGINT")

    monkeypatch.setattr(ris.kfold, "train_head", fake_train)
    with pytest.raises(Interrupted) as caught:
        train_folds("f.h5", tmp_path / "h.keras", TrainConfig(arch="residual"), 2, progress=False, log=lambda s: None)
    msg = str(caught.value)
    assert "best epoch so far (0)" in msg and "untrained head" in msg and "off-the-shelf ranking" in msg, msg
