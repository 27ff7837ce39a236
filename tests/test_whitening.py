"""Learned whitening: the closed form, its choice by inner cross-validation, the NumPy head, and the default head."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ris.errors import TooFewGroups
from ris.whiten import WhiteningHead, choose_whitening, fit_whitening, learned_whitening
from ris.metrics import evaluate_retrieval


def _objects(n_obj: int, views: int, dim: int, seed: int):
    """Object centres plus a strong nuisance confined to 8 directions shared by every object: raw
    retrieval confuses objects, whitening that learns the nuisance directions does not."""
    rng = np.random.default_rng(seed)
    nuisance = np.linalg.qr(rng.normal(size=(dim, 8)))[0]
    centres = rng.normal(size=(n_obj, dim))
    x = np.repeat(centres, views, 0) + 6.0 * rng.normal(size=(n_obj * views, 8)) @ nuisance.T \
        + 0.3 * rng.normal(size=(n_obj * views, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_obj), views)


def _ns(x, lab):
    return evaluate_retrieval(x, lab, "euclidean", recall_ks=(), precision_ks=()).ns_score


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_db(path, x, lab):
    """A labelled feature database as ris-extract writes it, from synthetic vectors."""
    from ris.featuredb import FeatureWriter

    n_obj = int(lab.max()) + 1
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (x.shape[1],), [f"o{i}" for i in range(n_obj)])
    w.add([f"{i:04d}.jpg" for i in range(len(x))], _l2(x), [f"o{g}" for g in lab])
    w.finish({})
    return path


def test_scatter_equals_the_pair_list_formula():
    x, lab = _objects(6, 5, 12, 0)
    mean, proj = learned_whitening(x, lab, 12, shrinkage=0.0)
    pairs = np.array([x[a] - x[b] for g in range(6) for a, b in itertools.combinations(np.nonzero(lab == g)[0], 2)],
                     np.float64)
    cov = pairs.T @ pairs / len(pairs)
    white = (pairs @ proj.astype(np.float64))
    # whitened pair differences have identity covariance (full whitening, no shrinkage)
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(12), atol=1e-3)
    assert np.allclose(mean, x.mean(0), atol=1e-5) and np.linalg.matrix_rank(cov) == 12


def test_a_shared_decomposition_gives_each_shrinkage_its_own_fit():
    """The grid reuses one eigendecomposition of the within-object scatter per fold: shrinkage
    shifts the eigenvalues only, so every (shrinkage, power) fit equals one made from scratch,
    which decomposes cov + shrinkage * trace / D * I itself."""
    from ris.whiten import _within_scatter, within_basis

    x, lab = _objects(10, 4, 24, 1)
    basis = within_basis(x, lab)
    xd = np.asarray(x, np.float64)
    for shrink, power in itertools.product((0.0, 0.1, 3.0), (0.5, 0.25)):
        mean, proj = learned_whitening(x, lab, 16, shrink, power, basis=basis)
        cov = _within_scatter(xd, lab)
        w, v = np.linalg.eigh(cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov)))
        pw = v / np.maximum(w, 1e-12) ** power
        w2, v2 = np.linalg.eigh(np.cov(((xd - xd.mean(0)) @ pw).T))
        ref = pw @ v2[:, np.argsort(w2)[::-1][:16]]
        # eigenvectors are defined up to sign: compare the projections column by column
        got = (xd - xd.mean(0)) @ proj.astype(np.float64)
        want = (xd - xd.mean(0)) @ ref
        np.testing.assert_allclose(np.abs(np.sum(got * want, 0)) / np.linalg.norm(got, axis=0) / np.linalg.norm(want, axis=0),
                                   1.0, atol=1e-4)
        np.testing.assert_allclose(mean, x.mean(0), atol=1e-5)


def test_choice_helps_on_new_objects_and_is_recorded():
    x, lab = _objects(60, 4, 64, 1)
    train, test = lab < 40, lab >= 40
    choice = choose_whitening(_l2(x[train]), lab[train], _ns, folds=3, seed=0)
    assert not choice["off"] and choice["inner_gain"] > 0.1
    assert {"shrinkage", "power", "dim"} <= set(choice) and len(choice["table"]) == 8  # 4 x 2 settings; 256 and 512 dims exceed 64
    mean, proj = learned_whitening(_l2(x[train]), lab[train], choice["dim"], choice["shrinkage"], choice["power"])
    raw = _ns(_l2(x[test]), lab[test])
    head = _ns(_l2((_l2(x[test]) - mean) @ proj), lab[test])
    assert head > raw + 0.2, (raw, head)


def test_choice_says_off_when_nothing_beats_raw():
    x, lab = _objects(30, 4, 16, 2)
    choice = choose_whitening(_l2(x), lab, lambda f, l: 1.0, folds=3)
    assert choice["off"] is True


def test_too_few_groups_is_an_error_for_the_caller():
    x, lab = _objects(2, 4, 8, 3)
    with pytest.raises(TooFewGroups, match="too few groups"):
        choose_whitening(_l2(x), lab, _ns, folds=3)
    with pytest.raises(TooFewGroups, match="two or more training images"):
        learned_whitening(x, np.arange(len(x)), 4)  # no group has a pair


def test_fit_falls_back_to_the_defaults_when_the_groups_are_too_few(monkeypatch):
    x, lab = _objects(2, 4, 8, 3)
    lines: list[str] = []
    w = fit_whitening(_l2(x), lab, dim=4, log=lines.append)
    assert w["selected_by"].startswith("defaults") and (w["shrinkage"], w["power"], w["dim"]) == (1.0, 0.5, 4)
    assert w["projection"].shape == (8, 4) and "too few training groups" in lines[0]


def test_fit_does_not_hide_a_bug_as_too_few_groups(monkeypatch):
    """Only the too-few-groups condition falls back to defaults; any other error is raised."""
    import ris.whiten

    def broken(*a, **k):
        raise ValueError("a bug, not a shortage of groups")

    monkeypatch.setattr(ris.whiten, "choose_whitening", broken)
    x, lab = _objects(12, 4, 8, 3)
    with pytest.raises(ValueError, match="a bug"):
        fit_whitening(_l2(x), lab, log=lambda s: None)


def test_numpy_head_applies_the_fitted_whitening():
    x, lab = _objects(12, 4, 16, 8)
    mean, proj = learned_whitening(_l2(x), lab, 6)
    head = WhiteningHead.from_fit(mean, proj)
    assert (head.input_dim, head.output_dim) == (16, 6)
    np.testing.assert_allclose(head(x), _l2((_l2(x) - mean) @ proj), atol=1e-5)
    raw = WhiteningHead.from_fit(mean, proj, l2_normalize=False)(x)
    np.testing.assert_allclose(raw, (_l2(x) - mean) @ proj, atol=1e-5)
    with pytest.raises(ValueError, match=r"takes \(n, 16\) features"):
        head(x[:, :8])


def test_default_head_is_whitening_and_keeps_its_choice(tmp_path):
    pytest.importorskip("keras")
    from ris.modelio import load_model
    from ris.train import TrainConfig, train_head

    db = _write_db(tmp_path / "f.h5", *_objects(40, 4, 64, 4))
    r = train_head(db, tmp_path / "h.keras", TrainConfig(seed=0), progress=False, log=lambda s: None)
    _, meta = load_model(r.model_path)
    assert meta["config"]["arch"] == "whiten"
    assert meta["whitening"]["selected_by"].startswith("3-fold") and "inner_gain" in meta["whitening"]
    assert r.scores["head"]["ns_score"] > r.scores["raw"]["ns_score"]


def test_train_folds_report_paired_deltas(tmp_path, capsys):
    pytest.importorskip("keras")
    import json

    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5", *_objects(30, 4, 32, 5))
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--folds", "3",
                           "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    d = summary["delta"]["ns_score"]
    assert d["folds_better"] + d["folds_worse"] <= 3
    assert d["mean"] == pytest.approx(summary["head"]["ns_score"]["mean"] - summary["raw"]["ns_score"]["mean"], abs=2e-4)
    assert d["folds_better"] == 3  # the nuisance directions are learnable: every fold gains


def test_large_held_out_parts_are_scored_on_a_capped_subset():
    x, lab = _objects(90, 4, 32, 6)
    seen = []

    def score(f, l):
        seen.append(len(l))
        return _ns(f, l)

    choice = choose_whitening(_l2(x), lab, score, folds=3, max_eval=40)
    assert max(seen) <= 40 and not choice["off"]


def test_whitening_decompositions_run_on_one_blas_thread(monkeypatch):
    """Small eigh calls on many OpenBLAS threads crawl when the cores are busy (50 calls took 58 s)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    seen = []
    real_eigh = np.linalg.eigh

    def spy_eigh(a, *args, **kwargs):
        seen.append(blas_threads())
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "eigh", spy_eigh)
    x, lab = _objects(12, 4, 16, 7)
    learned_whitening(x, lab, 8)
    choose_whitening(_l2(x), lab, lambda f, l: seen.append(blas_threads()) or _ns(f, l), folds=3,
                     grid={"shrinkage": (1.0,), "power": (0.5,), "dim": (8,)})
    assert seen and all(s <= {1} for s in seen), seen


def test_a_dimension_above_the_features_is_recorded_as_the_size_fitted():
    """`ris-train --whiten-dim 5000` on 1280-d features kept 1280 dimensions but wrote 5000 into
    the head's metadata and report."""
    x, lab = _objects(12, 4, 8, 3)
    lines: list[str] = []
    w = fit_whitening(_l2(x), lab, shrinkage=1.0, power=0.5, dim=5000, log=lines.append)
    assert w["projection"].shape == (8, 8) and w["dim"] == 8
    assert any("5000" in line and "8" in line for line in lines), lines


def test_features_of_one_dimension_are_whitened_not_an_internal_error():
    """ris-train on a database of dimension 1 died of 'LinAlgError: 0-dimensional array given'
    (NumPy's covariance of one variable is a scalar)."""
    rng = np.random.default_rng(0)
    lab = np.repeat(np.arange(20), 6)
    x = (lab[:, None] + 0.1 * rng.normal(size=(120, 1))).astype(np.float32)
    mean, proj = learned_whitening(x, lab, out_dim=4)
    assert proj.shape == (1, 1) and np.isfinite(proj).all()
    fitted = fit_whitening(x, lab, log=lambda s: None)
    assert fitted["projection"].shape[0] == 1 and np.isfinite(fitted["projection"]).all()


def test_the_cross_validated_choice_reports_progress_per_inner_fold():
    """ris-train's default head sat silent through its whole inner cross-validation (102.8 s on
    UKBench 1000 with MobileNetV2, minutes on larger databases): no sign it was running."""
    x, lab = _objects(30, 4, 32, 0)
    lines: list[str] = []
    fit_whitening(x, lab, log=lambda s: None, progress=lines.append)
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == [f"inner fold {i}/3" for i in (1, 2, 3)]
    quiet: list[str] = []
    fit_whitening(x, lab, log=quiet.append)  # no progress asked: only the choice is logged
    assert len(quiet) == 1 and "fold" not in quiet[0]


def test_with_fewer_images_than_dimensions_the_rotation_is_not_a_dimension_square_decomposition(monkeypatch):
    """ris-train on the accurate preset's 3,560-dimensional features of 1,000 images sat over 10
    minutes in its first inner fold: every setting decomposed a 3,560 x 3,560 covariance whose rank
    is below the image count. The rotation comes from the images' side; the ranking is the same."""
    x, lab = _objects(10, 4, 64, 3)  # 40 images, 64 dimensions
    reference = learned_whitening(x, lab, 16)  # before: eigh of the 64 x 64 covariance
    sizes = []
    real_eigh = np.linalg.eigh

    def spy_eigh(a, *args, **kwargs):
        sizes.append(np.shape(a)[0])
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "eigh", spy_eigh)
    basis = __import__("ris.whiten", fromlist=["within_basis"]).within_basis(x, lab)
    sizes.clear()
    mean, proj = learned_whitening(x, lab, 16, basis=basis)
    assert all(s < 64 for s in sizes), sizes  # the within-basis (one per fold) is the only 64 x 64 one
    assert proj.shape == reference[1].shape
    # the same axes up to sign: |cos| of matching columns is 1
    cos = np.abs(np.sum(proj * reference[1], 0)) / (np.linalg.norm(proj, axis=0) * np.linalg.norm(reference[1], axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-3)
