"""The training run: what each head reports about itself, and the configs it refuses before any work."""
from __future__ import annotations

import json
import numpy as np
import pytest

from ris.train import TrainConfig


def _objects(n_obj: int, views: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    nuisance = np.linalg.qr(rng.normal(size=(dim, 8)))[0]
    x = np.repeat(rng.normal(size=(n_obj, dim)), views, 0) + 6.0 * rng.normal(size=(n_obj * views, 8)) @ nuisance.T \
        + 0.3 * rng.normal(size=(n_obj * views, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_obj), views)


def _write_db(path, n_obj=12, views=6, dim=16, seed=0):
    from ris.featuredb import FeatureWriter

    x, lab = _objects(n_obj, views, dim, seed)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (dim,), [f"o{i}" for i in range(n_obj)])
    w.add([f"{i:04d}.jpg" for i in range(len(x))], x, [f"o{g}" for g in lab])
    w.finish({})
    return path


def test_train_cli_folds_by_image_hold_out_different_images(tmp_path, capsys):
    pytest.importorskip("keras")
    from ris.cli import train as train_cli
    from ris.modelio import load_model

    db = _write_db(tmp_path / "f.h5")
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--folds", "3",
                           "--split-by", "image", "--quiet", "--json"]) == 0
    capsys.readouterr()
    held = [set(load_model(tmp_path / f"h.fold{k}.keras")[1]["split"]["test_images"]) for k in (1, 2, 3)]
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    assert len(held[0] | held[1] | held[2]) == 72


def test_whitening_speaks_of_no_epochs_nor_validation_and_reports_its_fit_time(tmp_path, monkeypatch):
    pytest.importorskip("keras")
    import ris.train
    from ris.train import train_head

    clock = {"t": 0.0}
    monkeypatch.setattr(ris.train.time, "perf_counter", lambda: clock["t"])
    real_fit = ris.train.fit_whitening

    def slow_fit(*a, **k):  # the fit "takes" 100 s on the patched clock
        clock["t"] += 100.0
        return real_fit(*a, **k)

    monkeypatch.setattr(ris.train, "fit_whitening", slow_fit)
    db = _write_db(tmp_path / "f.h5")
    lines: list[str] = []
    # val_fraction 0.05 of 12 objects = 1 object: a triplet head would warn about its validation groups
    r = train_head(db, tmp_path / "h.keras", TrainConfig(val_fraction=0.05), progress=True, log=lines.append)
    text = "\n".join(lines).lower()
    assert lines and "epoch" not in text and "validation" not in text and " val" not in text, lines
    assert r.seconds >= 100.0
    assert r.best_epoch is None and r.epochs_run is None and r.seconds_per_epoch is None


def test_triplet_heads_still_report_epochs_and_fit_time(tmp_path, capsys):
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5")
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", "mlp",
                           "--hidden", "8", "--out-dim", "8", "--epochs", "2", "--p", "4", "--quiet", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["epochs_run"] == 2 and r["best_epoch"] in (1, 2) and r["seconds"] > 0 and r["seconds_per_epoch"] > 0


def test_json_says_what_learned_whitening_chose_as_the_printed_report_does(tmp_path, capsys):
    """The printed report names the chosen shrinkage, power and size; --json had none of them."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5")
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--whiten-power", "0.25",
                           "--quiet", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    chosen = r["whitening"]
    assert chosen["power"] == 0.25 and chosen["shrinkage"] > 0 and chosen["dim"] >= 1 and chosen["selected_by"]


def _maps_db(path, n_obj=6, views=4):
    from ris.featuredb import FeatureWriter

    x = np.random.default_rng(1).random((n_obj * views, 2, 2, 8)).astype(np.float32)
    w = FeatureWriter(path, {"model": "synthetic", "pooling": "none"}, (2, 2, 8), [f"o{i}" for i in range(n_obj)])
    w.add([f"{i:04d}.jpg" for i in range(len(x))], x, [f"o{g}" for g in np.repeat(np.arange(n_obj), views)])
    w.finish({})
    return path


@pytest.mark.parametrize("cfg,needle", [
    (TrainConfig(), "--arch whiten needs pooled features"),
    (TrainConfig(shallow=8), "--shallow trains a CNN branch"),
    (TrainConfig(arch="residual", shallow=8), "--shallow needs pooled features, not conv maps"),
    (TrainConfig(arch="mlp", distance="manhattan"), "unknown distance 'manhattan'"),
    # ris.fit_head(db, out, arch="bogus") said "unknown head 'bogus' or mining 'batch-hard'": the default
    # mining named as if it were wrong too
    (TrainConfig(arch="bogus"), r"^unknown head 'bogus'; heads: mlp, residual, whiten; minings: random, "),
    (TrainConfig(arch="mlp", mining="hard"), r"^unknown mining 'hard'; heads: mlp, residual, whiten; minings: "),
    (TrainConfig(fold=3, folds=3), "fold 3 is not one of the 3 folds"),
    (TrainConfig(split_by="pixel"), "--split-by must be one of object, image"),
])
def test_configs_that_cannot_train_are_refused_before_any_work(tmp_path, cfg, needle):
    pytest.importorskip("keras")
    from ris.errors import RisError
    from ris.train import train_head

    db = _maps_db(tmp_path / "f.h5")
    with pytest.raises(RisError, match=needle):
        train_head(db, tmp_path / "h.keras", cfg, progress=False, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no model, no thumbnails read


@pytest.mark.parametrize("cfg", [TrainConfig(), TrainConfig(arch="mlp", epochs=1)], ids=["whiten", "mlp"])
def test_groups_of_one_image_are_too_few_to_train_on(tmp_path, cfg):
    """Every object has one view: there is no positive pair to whiten or to draw triplets from."""
    pytest.importorskip("keras")
    from ris.errors import TooFewGroups
    from ris.featuredb import FeatureWriter
    from ris.train import train_head

    x = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap"}, (8,), [f"o{i}" for i in range(20)])
    w.add([f"{i:04d}.jpg" for i in range(20)], x / np.linalg.norm(x, axis=1, keepdims=True), [f"o{i}" for i in range(20)])
    w.finish({})
    with pytest.raises(TooFewGroups, match="two or more"):
        train_head(tmp_path / "f.h5", tmp_path / "h.keras", cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "h.keras").exists()


@pytest.mark.parametrize("extra,named", [
    (["--epochs", "5", "--margin", "0.3"], "--margin 0.3 and --epochs 5 do not apply to --arch whiten"),
    (["--mining", "random"], "--mining random does not apply to --arch whiten"),
    (["--arch", "mlp", "--whiten-dim", "8"], "--whiten-dim 8 does not apply to --arch mlp"),
    (["--arch", "residual", "--out-dim", "64"], "--out-dim 64 does not apply to --arch residual"),
    (["--unseen-classes", "2"], "--unseen-classes 2 applies to --split-by image"),  # was ignored, exit 0
])
def test_ris_train_refuses_options_its_head_would_ignore(tmp_path, extra, named):
    """ris-train --arch whiten (the default) fitted its closed form whatever --epochs, --margin or
    --mining said: a user thought they set them. Refused in one line before any work."""
    from ris.cli.train import main
    from ris.errors import RisError

    db = _write_db(tmp_path / "f.h5")
    with pytest.raises(RisError, match=named):
        main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--quiet", *extra])
    assert not (tmp_path / "h.keras").exists()


def test_history_files_are_written_whole_or_not_at_all_and_a_failure_names_the_file(tmp_path, monkeypatch):
    """A full disk left a torn .history.png under its name, and the error said only "File too large"."""
    import errno
    import os

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from ris.train_report import write_history

    history = [{"epoch": 1, "loss": 0.3, "val_loss": 0.2, "val_score": 3.5, "test_score": 3.4, "seconds": 1.0}]

    def full(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG torn")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError) as caught:
        write_history(history, tmp_path / "head.keras", 3.0)
    assert caught.value.filename == str(tmp_path / "head.history.png")
    assert sorted(os.listdir(tmp_path)) == ["head.history.csv"]  # the CSV was written whole before
    monkeypatch.undo()
    csv_path, png = write_history(history, tmp_path / "head.keras", 3.0)
    assert png.read_bytes()[:4] == b"\x89PNG" and csv_path.read_text().startswith("epoch,loss")
    assert sorted(os.listdir(tmp_path)) == ["head.history.csv", "head.history.png"]


def test_without_a_validation_part_the_best_epoch_is_the_lowest_training_loss(tmp_path, capsys):
    """Too few objects for a validation part: the best epoch is chosen by training loss. Its start
    was -1.0 (an N-S floor), so with a loss above 1 no epoch ever beat it and the head kept its
    untrained weights, saying nothing; the log printed "val N-S nan (raw nan)" for every epoch."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5", n_obj=6)
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", "mlp",
                           "--hidden", "8", "--out-dim", "8", "--epochs", "3", "--p", "4", "--margin", "4",
                           "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    history = [float(line.split(",")[1]) for line in open(r["history_path"]).read().splitlines()[1:]]
    assert min(history) > 1.0  # the case: every training loss above 1
    assert r["best_epoch"] == 1 + int(np.argmin(history))
    assert "nan" not in captured.err and "best by training loss" in captured.err


def test_without_a_validation_part_early_stopping_names_the_training_loss(tmp_path, capsys):
    """Every epoch said "no validation part: best by training loss", then the stop said "early stop:
    val N-S has not improved for 10 epochs", a score that was never computed."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5", n_obj=6)
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", "mlp",
                           "--hidden", "8", "--out-dim", "8", "--epochs", "30", "--patience", "1", "--p", "4",
                           "--lr", "1e-9"]) == 0
    err = capsys.readouterr().err
    assert "best by training loss" in err
    (stop,) = [line for line in err.splitlines() if line.startswith("early stop")]
    assert stop == "early stop: the training loss has not improved for 1 epoch"


@pytest.mark.parametrize("arch", ["whiten", "mlp"])
def test_a_head_trained_without_a_validation_part_is_saved(tmp_path, arch):
    """``--val-fraction 0`` fitted, then failed saving the split's content sketches (an internal
    error reshaping zero rows) and wrote no model."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5")
    extra = ["--hidden", "8", "--out-dim", "8", "--epochs", "1", "--p", "4"] if arch == "mlp" else []
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", arch,
                           "--val-fraction", "0", "--quiet", *extra]) == 0
    assert (tmp_path / "h.keras").is_file()


def test_a_head_is_never_saved_over_its_own_database(tmp_path, capsys):
    """``--output`` naming the feature database replaced it with the model's zip, silently."""
    from ris.cli.common import run
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5")
    before = db.read_bytes()
    assert run("ris-train", train_cli.main, ["--features-db", str(db), "--output", str(tmp_path / "." / "f.h5")]) == 2
    assert "f.h5" in capsys.readouterr().err and db.read_bytes() == before


@pytest.mark.parametrize("arch", ["whiten", "mlp"])
def test_the_held_out_scores_reported_are_ris_evals_searching_the_whole_collection(tmp_path, capsys, arch):
    """ris-train printed (and stored) its held-out scores with the test images searching only each
    other, the protocol that flatters every score, unlabelled, so they disagreed with ris-eval's
    default (held-out queries searching the whole collection) for the same model: 3.965 -> 3.990
    against 3.920 -> 3.960 on UKBench-1000. Now the same numbers, and the other protocol named."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli
    from ris.evaluate import evaluate_db

    db = _write_db(tmp_path / "f.h5", n_obj=20, views=4)
    extra = ["--epochs", "2"] if arch == "mlp" else []
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", arch,
                           "--quiet", "--json", *extra]) == 0
    reported = json.loads(capsys.readouterr().out)["scores"]
    scored = evaluate_db(db, tmp_path / "h.keras")
    for part in ("raw", "head"):
        for metric in ("ns_score", "map"):
            assert reported[part][metric] == pytest.approx(scored[part][metric], abs=1e-6), (part, metric)
    assert reported["protocol"] == ("held-out queries search the whole collection; the head's training images, "
                                    "all of other objects, are distractors")
    assert reported["test_gallery"]["raw"]["queries"] == reported["raw"]["queries"]  # the other protocol, named
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h2.keras"), "--arch", arch,
                           "--quiet", *extra]) == 0
    printed = capsys.readouterr().out
    assert "whole collection" in printed and f"{reported['head']['ns_score']:.4f}" in printed


@pytest.mark.parametrize("arch", ["whiten", "mlp"])
def test_an_unseen_classes_head_is_scored_on_the_same_queries_and_gallery_by_ris_train_and_ris_eval(tmp_path, capsys,
                                                                                                     arch):
    """With --unseen-classes, ris-train scored (and stored as test_images) only the unseen classes'
    test share and left their other images out of the gallery, while ris-eval --model scored every
    image the head never trained on against every labelled image: 36 queries / 66 gallery images
    against 42 / 72 for the same head (6 classes of 12, test 0.5). Now both score the 42 (the test
    images and all of the unseen class's images) searching all 72, with the same numbers."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli
    from ris.evaluate import evaluate_db
    from ris.modelio import read_meta

    db = _write_db(tmp_path / "f.h5", n_obj=6, views=12)
    extra = ["--epochs", "2", "--p", "4", "--k", "4"] if arch == "mlp" else []
    assert train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", arch,
                           "--split-by", "image", "--test-fraction", "0.5", "--val-fraction", "0.2",
                           "--unseen-classes", "1", "--quiet", "--json", *extra]) == 0
    reported = json.loads(capsys.readouterr().out)["scores"]
    stored = read_meta(tmp_path / "h.keras")["split"]
    scored = evaluate_db(db, tmp_path / "h.keras")
    assert len(stored["test_images"]) == scored["images"] == reported["raw"]["queries"] == 6 * 6 + 6
    assert not set(stored["test_images"]) & set(stored["fit_images"])
    assert len(stored["test_images"]) + len(stored["fit_images"]) == scored["gallery_images"] == 72
    for part in ("raw", "head"):
        for metric in ("queries", "ns_score", "map"):
            assert reported[part][metric] == pytest.approx(scored[part][metric], abs=1e-6), (part, metric)
    assert reported["unseen_classes"]["raw"]["queries"] == 12  # every image of the unseen class


def test_an_image_split_head_says_its_training_images_of_the_querys_class_are_relevant(tmp_path, capsys):
    """The whole collection holds the head's training images of each query's own class, which count as
    relevant; ris-train and ris-eval said nothing of it (the README: "as distractors"). Both say it now."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli
    from ris.evaluate import evaluate_db

    db = _write_db(tmp_path / "f.h5", n_obj=6, views=12)
    args = ["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--split-by", "image", "--quiet"]
    assert train_cli.main([*args, "--json"]) == 0
    role = json.loads(capsys.readouterr().out)["scores"]["protocol"].partition("; ")[2]
    assert "of the query's own class count as relevant" in role
    assert role in evaluate_db(db, tmp_path / "h.keras")["split_description"]
    assert train_cli.main(args) == 0
    assert role in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["whiten", "mlp"])
def test_a_database_with_nan_or_inf_rows_is_refused_naming_the_file_and_a_row(tmp_path, capsys, arch):
    """A database with a NaN and an inf row: learned whitening died of 'LinAlgError: Eigenvalues did
    not converge' (an internal error), and --arch mlp saved a head reporting mAP 3.0000."""
    pytest.importorskip("keras")
    from ris.cli.common import run
    from ris.cli import train as train_cli
    from ris.featurewriter import FeatureWriter

    x, lab = _objects(12, 6, 16, 0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[5, 2], x[40, 0] = np.nan, np.inf
    db = tmp_path / "f.h5"
    w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (16,), [f"o{i}" for i in range(12)])
    w.add([f"{i:04d}.jpg" for i in range(len(x))], x, [f"o{g}" for g in lab])
    w.finish({})
    extra = ["--arch", "mlp", "--epochs", "1", "--p", "4", "--hidden", "8", "--out-dim", "8"] if arch == "mlp" else []
    assert run("ris-train", train_cli.main, ["--features-db", str(db), "--output", str(tmp_path / "h.keras"),
                                              "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(db) in err[0] and "2 rows" in err[0] and "0005.jpg" in err[0], err
    assert not (tmp_path / "h.keras").exists()


@pytest.mark.parametrize("lr,size", [("1e30", ["--p", "4", "--hidden", "8", "--out-dim", "8"]), ("1e8", [])],
                         ids=["nan-weights", "overflowing-embeddings"])
def test_a_loss_that_goes_nan_is_reported_and_its_weights_never_saved(tmp_path, capsys, lr, size):
    """--lr 1e8: the loss went NaN after the first batches, the NaN weights' val N-S (2.5, of NaN
    embeddings) was kept as the best epoch and the head saved, 'mAP 0.1160 -> 1.3178', exit 0.
    With the default layers the weights stay finite and their embeddings overflow (val_loss nan)."""
    pytest.importorskip("keras")
    from ris.cli.common import run
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5", n_obj=20)
    code = run("ris-train", train_cli.main, ["--features-db", str(db), "--output", str(tmp_path / "h.keras"),
                                             "--arch", "mlp", "--no-l2", "--epochs", "3", "--lr", lr,
                                             *size, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and "--lr" in err, err
    assert not (tmp_path / "h.keras").exists()


@pytest.mark.parametrize("where", ["parent is a file", "folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, where):
    """--output under a path that is a file trained for the whole run, then failed saving with
    'good.h5: File exists'; a folder as --output was told to use a .keras name of the folder's."""
    from ris.cli.common import run
    from ris.cli import train as train_cli
    import ris.train

    db = _write_db(tmp_path / "f.h5")
    out = tmp_path / "f.h5" / "h.keras" if where == "parent is a file" else tmp_path
    monkeypatch.setattr(ris.train, "_read_data", lambda *a: pytest.fail("read the database before refusing"))
    assert run("ris-train", train_cli.main, ["--features-db", str(db), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(out) in err and ("cannot write" in err if where != "folder" else "is a folder" in err), err


def test_a_missing_output_folder_is_made_before_training(tmp_path, monkeypatch):
    from ris.cli import train as train_cli
    import ris.train

    db = _write_db(tmp_path / "f.h5")
    monkeypatch.setattr(ris.train, "_read_data", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "new" / "sub" / "h.keras"), "--quiet"])
    assert (tmp_path / "new" / "sub").is_dir() and not list((tmp_path / "new" / "sub").iterdir())


@pytest.mark.parametrize("content", [b"notes a user keeps\n", "zip"], ids=["text", "keras-zip-without-ris-json"])
def test_an_existing_file_that_is_not_a_ris_model_is_never_replaced(tmp_path, capsys, content):
    """--output naming someone's own Keras model or any other file replaced it with the new head,
    silently; only an HDF5 file was refused. Only an earlier ris model is replaced."""
    import zipfile

    from ris.cli.common import run
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5")
    out = tmp_path / "h.keras"
    if content == "zip":
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("config.json", "{}")
            zf.writestr("model.weights.h5", b"weights")
    else:
        out.write_bytes(content)
    before = out.read_bytes()
    args = ["--features-db", str(db), "--output", str(out), "--quiet"]
    assert run("ris-train", train_cli.main, args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not a ris model" in err and out.read_bytes() == before, err
    out.unlink()
    assert run("ris-train", train_cli.main, args) == 0
    first = out.read_bytes()
    assert run("ris-train", train_cli.main, args + ["--seed", "1"]) == 0 and out.read_bytes() != first


def test_a_run_that_diverges_after_good_epochs_keeps_the_best_finite_epoch(tmp_path, monkeypatch):
    """The other side of the NaN guard: epochs already trained are not thrown away."""
    keras = pytest.importorskip("keras")
    from ris.modelio import load_model
    from ris.train import train_head

    real_fit, calls = keras.Model.fit, []

    def fit_then_blow_up(self, *args, **kwargs):
        h = real_fit(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.set_weights([np.full_like(w, np.nan) for w in self.get_weights()])
        return h

    monkeypatch.setattr(keras.Model, "fit", fit_then_blow_up)
    lines: list[str] = []
    db = _write_db(tmp_path / "f.h5", n_obj=20)
    r = train_head(db, tmp_path / "h.keras", TrainConfig(arch="mlp", epochs=5, hidden=(8,), out_dim=8, p=4),
                   progress=False, log=lines.append)
    assert r.epochs_run == 2 and r.best_epoch in (1, 2)
    assert any("not finite" in line and "epoch 3" in line for line in lines), lines
    head, _ = load_model(tmp_path / "h.keras")
    assert all(np.isfinite(w).all() for w in head.get_weights())


def test_temps_of_a_killed_save_are_removed_when_the_next_run_starts(tmp_path, monkeypatch):
    """ris-train killed (kill -9) while saving left its temp (h.keras.<hex>.tmp.keras) beside the
    output until a later save there ended, hours of training later. A run now removes the temps of
    its output and history that no live writer holds, before it trains; a live writer's is kept,
    and so are other files' temps."""
    import os

    import ris.train as train
    from ris.sidecars import create_locked

    db = _write_db(tmp_path / "f.h5")
    old = os.stat(db).st_mtime - 3600  # an hour old: past the age a just-created temp is given
    killed = [tmp_path / "h.keras.0123abcd.tmp.keras", tmp_path / "h.history.csv.89abcdef.tmp"]
    kept = [tmp_path / "other.keras.0123abcd.tmp.keras", tmp_path / "h.keras.notatemp"]
    for p in killed + kept:
        p.write_bytes(b"x" * 1000)
        os.utime(p, (old, old))
    live = tmp_path / "h.keras.fedcba98.tmp.keras"
    held = create_locked(live)  # a save still running in another process
    os.utime(live, (old, old))
    seen = {}
    real_fit = train._fit_whitening_head

    def fit(*a, **k):
        seen.update({p.name: p.exists() for p in killed + kept + [live]})
        return real_fit(*a, **k)

    monkeypatch.setattr(train, "_fit_whitening_head", fit)
    lines: list[str] = []
    try:
        train.train_head(db, tmp_path / "h.keras", TrainConfig(), progress=False, log=lines.append)
    finally:
        os.close(held)
    assert seen == {**{p.name: False for p in killed}, **{p.name: True for p in kept + [live]}}
    assert sum("left by a killed save" in line for line in lines) == 2, lines


def _signal_during_fit(monkeypatch, at_call: int, *signals: int) -> list[int]:
    """Ctrl-C or SIGTERM (really raised, handled by whatever handler is installed) as the
    ``at_call``-th epoch starts; returns the list that counts the epochs started."""
    import signal

    keras = pytest.importorskip("keras")
    real_fit, calls = keras.Model.fit, []

    def fit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            for s in signals or (signal.SIGINT,):
                signal.raise_signal(s)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return calls


TINY = ["--arch", "mlp", "--hidden", "8", "--out-dim", "8", "--quiet"]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_during_training_keeps_the_best_epoch_so_far(tmp_path, monkeypatch, capsys, signame):
    """Ctrl-C (or a scheduler's SIGTERM) after hours of epochs threw every epoch away ('ris-train:
    interrupted', exit 130, nothing saved): the epoch it cuts short is dropped, the best complete
    epoch is scored and saved as a finished run's is, one line says so, exit 130."""
    import signal

    from ris.cli.common import EXIT_INTERRUPTED, run
    from ris.cli.train import main
    from ris.modelio import load_model

    db = _write_db(tmp_path / "f.h5", n_obj=20)
    calls = _signal_during_fit(monkeypatch, 4, getattr(signal, signame))
    out = tmp_path / "h.keras"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = run("ris-train", main, ["--features-db", str(db), "--output", str(out), "--epochs", "20", *TINY])
    captured = capsys.readouterr()
    assert code == EXIT_INTERRUPTED, captured.err
    assert len(calls) == 4  # stopped in the epoch the signal came in
    assert f"saved {out}" in captured.out and "of 3" in captured.out and "held-out" in captured.out, captured.out
    assert f"interrupted ({signame}) after 3 complete epochs" in captured.err, captured.err
    assert "best epoch so far" in captured.err and str(out) in captured.err, captured.err
    head, meta = load_model(out)
    assert meta["best_epoch"] in (1, 2, 3) and meta["test_scores"]
    assert all(np.isfinite(w).all() for w in head.get_weights())
    assert len((tmp_path / "h.history.csv").read_text().splitlines()) == 1 + 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_ctrl_c_in_the_first_epoch_saves_nothing_and_keeps_the_old_model(tmp_path, monkeypatch, capsys):
    from ris.cli.common import EXIT_INTERRUPTED, run
    from ris.cli.train import main

    db = _write_db(tmp_path / "f.h5", n_obj=20)
    out = tmp_path / "h.keras"
    args = ["--features-db", str(db), "--output", str(out), "--epochs", "2", *TINY]
    assert run("ris-train", main, args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    _signal_during_fit(monkeypatch, 1)
    assert run("ris-train", main, args) == EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert out.read_bytes() == before
    assert "saved" not in captured.out and "nothing saved" in captured.err, captured


def test_a_second_ctrl_c_stops_at_once_saving_nothing(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for the best epoch so far to be saved; a second one means 'now'."""
    import signal

    from ris.cli.common import EXIT_INTERRUPTED, run
    from ris.cli.train import main

    db = _write_db(tmp_path / "f.h5", n_obj=20)
    out = tmp_path / "h.keras"
    calls = _signal_during_fit(monkeypatch, 3, signal.SIGTERM, signal.SIGINT)
    handlers = signal.getsignal(signal.SIGINT)
    assert run("ris-train", main, ["--features-db", str(db), "--output", str(out), "--epochs", "20", *TINY]) \
        == EXIT_INTERRUPTED
    assert len(calls) == 3 and not out.exists()
    assert "saved" not in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) == handlers


def test_training_in_another_thread_leaves_the_signal_handlers_alone(tmp_path):
    """Handlers can be set only in the main thread: a head trained in a worker thread (a server,
    a notebook's executor) trains as before, without them."""
    import threading

    pytest.importorskip("keras")
    from ris.train import train_head

    db = _write_db(tmp_path / "f.h5", n_obj=20)
    result: list = []
    t = threading.Thread(target=lambda: result.append(train_head(
        db, tmp_path / "h.keras", TrainConfig(arch="mlp", hidden=(8,), out_dim=8, epochs=2), progress=False,
        log=lambda s: None)))
    t.start()
    t.join(600)
    assert result and result[0].epochs_run == 2 and result[0].interrupted_by is None


class _Killed(BaseException):
    """``kill -9`` at a chosen instant: nothing after it runs (in-process, the temps are removed too)."""


@pytest.mark.parametrize("arch", ["whiten", "mlp"])
def test_a_run_killed_between_saving_the_model_and_its_history_is_named_by_ris_eval(tmp_path, capsys, monkeypatch,
                                                                                      arch):
    """ris-train saved the model, then its history CSV and PNG, each renamed into place on its own:
    killed between the renames, the new model.keras sat beside the previous run's history files, each
    whole, and nothing said so (a user read the old run's curves for the new head). The model now
    records its report files' digests; ris-eval --model names a history file of another run."""
    import os

    pytest.importorskip("keras")
    from ris.cli import eval as eval_cli
    from ris.cli import train as train_cli
    from ris.modelio import read_meta

    db = _write_db(tmp_path / "f.h5", n_obj=20, views=4)
    out = tmp_path / "h.keras"
    args = ["--features-db", str(db), "--output", str(out), "--arch", arch, "--quiet", "--json",
            *(["--epochs", "2", "--hidden", "8", "--out-dim", "8"] if arch == "mlp" else [])]
    assert train_cli.main(args) == 0
    capsys.readouterr()
    assert eval_cli.main(["--features-db", str(db), "--model", str(out), "--json"]) == 0
    assert "earlier run" not in capsys.readouterr().err  # a whole run: model and history agree
    old_csv = (tmp_path / "h.history.csv").read_bytes()
    real_replace = os.replace

    def killed_after_the_model(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if str(dst).endswith(".keras"):
            raise _Killed

    monkeypatch.setattr(os, "replace", killed_after_the_model)
    with pytest.raises(_Killed):
        train_cli.main([*args, "--seed", "1"])
    monkeypatch.undo()
    assert read_meta(out)["config"]["seed"] == 1  # the new model ...
    assert (tmp_path / "h.history.csv").read_bytes() == old_csv  # ... beside the old run's history
    capsys.readouterr()
    assert eval_cli.main(["--features-db", str(db), "--model", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"ris-eval: warning: {tmp_path / 'h.history.csv'} and {tmp_path / 'h.history.png'} belong to an earlier "
        f"run of {out} (ris-train was stopped between saving the model and its history; "), err
    assert train_cli.main([*args, "--seed", "1"]) == 0  # run again: whole, and nothing said
    capsys.readouterr()
    assert eval_cli.main(["--features-db", str(db), "--model", str(out), "--json"]) == 0
    assert "earlier run" not in capsys.readouterr().err


def test_a_residual_head_that_no_epoch_improved_says_what_epoch_0_is(tmp_path, capsys):
    """'saved h.keras (best epoch 0 of 2, ...)' did not say what epoch 0 is: the untrained head,
    which keeps the off-the-shelf ranking, kept because no epoch beat it on the val objects."""
    pytest.importorskip("keras")
    from ris.cli import train as train_cli

    db = _write_db(tmp_path / "f.h5", n_obj=30)
    code = train_cli.main(["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", "residual",
                           "--epochs", "2", "--lr", "1e-30", "--p", "4", "--val-fraction", "0.3", "--quiet"])  # too small a step to gain
    out = capsys.readouterr().out
    assert code == 0 and "best epoch 0 of 2" in out, out
    line = next(s for s in out.splitlines() if s.startswith("saved "))
    assert "untrained" in line and "off-the-shelf ranking" in line and "no epoch" in line, line


def test_shallow_training_names_a_damaged_database_image_once_through_its_log(tmp_path, capfd):
    """ris-train --shallow makes the database's thumbnails: a damaged JPEG among them printed
    libjpeg's unnamed line ('Corrupt JPEG data: 84 extraneous bytes before marker 0xd9'). It is said
    once, through the run's log, as ris-extract says it; the head trains as before."""
    import re

    pytest.importorskip("keras")
    from ris.featuredb import FeatureWriter
    from ris.testing import damage_jpeg, make_tiny_dataset
    from ris.train import train_head

    images = make_tiny_dataset(tmp_path / "images", n_objects=6, views=3, size=32)
    names = sorted(p.name for p in images.glob("*.jpg"))
    bad = damage_jpeg(images / names[4])
    x, lab = _objects(6, 3, 16, 0)
    w = FeatureWriter(tmp_path / "f.h5", {"model": "synthetic", "pooling": "gap", "dataset_root": str(images)},
                      (16,), [f"o{i}" for i in range(6)])
    w.add(names, x / np.linalg.norm(x, axis=1, keepdims=True), [f"o{g}" for g in lab])
    w.finish({})
    lines: list[str] = []
    capfd.readouterr()
    r = train_head(tmp_path / "f.h5", tmp_path / "h.keras", TrainConfig(arch="mlp", shallow=8, epochs=1, hidden=(8,),
                                                                         out_dim=8, p=2, k=2, test_fraction=0.34,
                                                                         val_fraction=0.34), progress=False,
                   log=lines.append)
    assert r.epochs_run == 1
    said = [line for line in lines if "JPEG" in line]
    assert len(said) == 1 and re.fullmatch(rf"warning: {re.escape(str(bad))}: corrupt JPEG data \(\d+ extraneous "
                                           r"bytes before marker 0xd9\)", said[0]), lines
    assert "JPEG" not in capfd.readouterr().err


def test_ctrl_c_when_no_epoch_beat_the_untrained_head_says_what_epoch_0_is(tmp_path, monkeypatch, capsys):
    """Ctrl-C after epochs that did not beat a residual head's start said 'saving the best so far,
    epoch 0' and 'the best epoch so far (0) is saved', not what epoch 0 is: every line that reports
    it says now that it is the untrained head, the off-the-shelf ranking."""
    from ris.cli.common import EXIT_INTERRUPTED, run
    from ris.cli.train import main

    db = _write_db(tmp_path / "f.h5", n_obj=30)
    _signal_during_fit(monkeypatch, 3)
    code = run("ris-train", main, ["--features-db", str(db), "--output", str(tmp_path / "h.keras"), "--arch", "residual",
                                   "--epochs", "5", "--lr", "1e-30", "--p", "4", "--val-fraction", "0.3", "--quiet"])
    captured = capsys.readouterr()
    assert code == EXIT_INTERRUPTED, captured.err
    lines = [s for s in captured.err.splitlines() if "epoch 0" in s or "so far (0)" in s]
    assert len(lines) == 2 and all("untrained head" in s and "off-the-shelf ranking" in s for s in lines), captured.err
