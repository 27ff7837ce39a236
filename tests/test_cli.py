"""Each command end to end on a tiny generated dataset (random-init VGG16 at 64 px: no network)."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ris.cli import demo as demo_cli
from ris.cli import eval as eval_cli
from ris.cli import extract as extract_cli
from ris.cli import search as search_cli
from ris.cli import train as train_cli
from ris.cli.common import run
from ris.testing import ODD_REASONS, call_with_fifo_guard, committed_rows, make_bad_images, make_odd_files, make_tiny_dataset

FAST = ["--model", "vgg16", "--weights", "none", "--resize", "64", "--no-progress"]


def cli(capsys, module, prog, *args):
    code = run(prog, module.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_tiny_dataset(root / "images", n_objects=6, views=4, size=96)
    query = make_tiny_dataset(root / "queries", n_objects=1, views=1, size=96, seed=7) / "ukbench00000.jpg"
    return root, data, query


@pytest.fixture(scope="module")
def db(tiny):
    root, data, _ = tiny
    path = root / "feats.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(path), *FAST]) == 0
    return path


@pytest.fixture(scope="module")
def model(tiny, db):
    root, _, _ = tiny
    out = root / "head.keras"
    code = run("ris-train", train_cli.main, ["--features-db", str(db), "--output", str(out), "--quiet",
                                             "--test-fraction", "0.34", "--val-fraction", "0.34"])
    assert code == 0
    return out


def _with_subcommands(parser):
    """The parser and, for ris-index, each subcommand's (`ris-index build --help` is what a user reads)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _with_subcommands(sub)


def test_help_explains_every_flag():
    """README: every flag is explained by --help. ris-serve and ris-index were not checked, and
    `ris-index build --help` (remove, info) printed the usage and flags without saying what it does."""
    from ris.cli import index as index_cli
    from ris.cli import serve as serve_cli

    for module in (extract_cli, train_cli, search_cli, eval_cli, demo_cli, serve_cli, index_cli):
        for parser in _with_subcommands(module.build_parser()):
            assert parser.description, f"{parser.prog} --help has no description"
            for action in parser._actions:
                assert action.help, f"{parser.prog} {action.option_strings} has no help"
            text = parser.format_help()
            assert "(default: None)" not in text and "(default: False)" not in text, parser.prog
            if parser.prog == "ris-extract":  # real defaults, zero included, are still shown
                assert "(default: 32)" in text
            if parser.prog == "ris-eval":
                assert "(default: 0)" in text


@pytest.mark.parametrize("module", ["extract", "train", "search", "eval", "index", "demo", "serve"])
def test_every_command_runs_as_a_python_module(module):
    """`python -m ris.cli.extract --help` exited 0 printing nothing (no __main__ guard): a user
    without the console scripts on PATH (a venv not activated) saw a command that silently did nothing."""
    done = subprocess.run([sys.executable, "-m", f"ris.cli.{module}", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: ris-{module}"), done.stdout[:200]


def test_the_recipe_a_refusal_shows_can_be_typed_back():
    """Refusals name a fused database's recipe as '--pool gap+hist' (the colour part's pooling is
    'hist'), but --pool refused 'hist': the recipe shown could not be typed. A CNN part still refuses it."""
    from ris import presets
    from ris.errors import RisError

    def recipe(*argv):
        parser = extract_cli.build_parser()
        argv = ["--dataset", "d", "--features-db", "f.h5", *argv]
        return extract_cli.recipe_of(presets.apply(parser.parse_args(argv), parser, "extract", argv)).to_attrs()

    typed = recipe("--model", "mobilenet_v2+hsv_hist", "--pool", "gap+hist", "--resize", "224+224",
                   "--fusion-weights", "1+0.35")
    assert typed == recipe("--preset", "fast")
    with pytest.raises(RisError, match="hist"):
        recipe("--model", "mobilenet_v2", "--pool", "hist")
    with pytest.raises(RisError, match="hist"):
        recipe("--model", "mobilenet_v2+hsv_hist", "--pool", "hist+hist")


def test_extract_writes_labelled_database(db):
    with h5py.File(db) as f:
        assert f["features"].shape == (24, 512)
        assert f["labels"][:].tolist() == [i // 4 for i in range(24)]
        assert f.attrs["model"] == "vgg16" and f.attrs["input_size"] == 64 and f.attrs["pooling"] == "gap"
        assert "keras_version" in f.attrs and "preprocessing" in f.attrs
        norms = np.linalg.norm(f["features"][:], axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-4)


def test_extract_json_and_refuses_to_clobber(tiny, db, capsys):
    _, data, _ = tiny
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_extract_skips_bad_images_and_lists_them(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=80)
    bad = make_bad_images(tmp_path / "d" / "odd")
    out_db = tmp_path / "f.h5"
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", out_db, "--json",
                         "--labels", "none", *FAST)
    assert code == 0, err
    summary = json.loads(out)
    skipped = {Path(s["image"]).name for s in summary["skipped"]}
    assert skipped == {"truncated.jpg", "corrupt.jpg", "zero_byte.jpg", "text_as_jpg.jpg", bad["huge"].name}
    assert summary["extracted"] == 8 + len(bad) - len(skipped)
    with h5py.File(out_db) as f:
        assert {Path(s.decode()).name for s in f["failed_ids"][:]} == skipped
        ids = [s.decode() for s in f["image_ids"][:]]
        assert any("日本" in i for i in ids)


@pytest.mark.parametrize("setup,needle", [("missing", "does not exist"), ("empty", "no images found")])
def test_extract_missing_or_empty_dataset(tmp_path, capsys, setup, needle):
    d = tmp_path / "data"
    if setup == "empty":
        d.mkdir()
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", d, "--features-db", tmp_path / "x.h5", *FAST)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_extract_survives_kill_9(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n_objects=40, views=4, size=200)
    out_db = tmp_path / "f.h5"
    cmd = [sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
           "--features-db", str(out_db), "--model", "vgg16", "--weights", "none", "--resize", "96",
           "--batch-size", "4", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = Path(str(out_db) + ".partial")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if committed_rows(out_db) >= 8:  # kill once batches are committed, however slow the machine
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("extraction finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out_db.exists() and partial.exists()
    done = subprocess.run(cmd + ["--json", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed"] + summary["extracted"] == 160
    assert summary["resumed"] >= 8
    with h5py.File(out_db) as f:
        assert len(set(x.decode() for x in f["image_ids"][:])) == 160 and f.attrs["complete"]


def test_append_adds_only_new_images(tiny, db, tmp_path, capsys):
    _, data, _ = tiny
    work = tmp_path / "data"
    shutil.copytree(data, work)
    copy = tmp_path / "feats.h5"
    shutil.copy(db, copy)
    extra = make_tiny_dataset(tmp_path / "extra", n_objects=1, views=2, size=96, seed=3)
    shutil.copy(extra / "ukbench00000.jpg", work / "new_0.jpg")
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", work, "--features-db", copy,
                         "--append", "--json", "--labels", "none", *FAST)
    assert code == 0, err
    s = json.loads(out)
    assert s["resumed"] == 24 and s["extracted"] == 1
    with h5py.File(copy) as f:
        assert f["features"].shape[0] == 25


def test_train_writes_model_history_and_scores(model):
    stem = str(model)[: -len(".keras")]
    assert model.exists() and Path(stem + ".history.csv").exists() and Path(stem + ".history.png").exists()
    from ris.modelio import load_model
    from ris.whiten import WhiteningHead

    head, meta = load_model(model)
    assert isinstance(head, WhiteningHead)  # the default head is applied without Keras
    assert {"train", "val", "test", "test_images", "by"} <= set(meta["split"])
    assert len(meta["split"]["test_images"]) == 4 * len(meta["split"]["test"])
    assert not set(meta["split"]["train"]) & set(meta["split"]["test"])
    assert "raw" in meta["test_scores"] and "head" in meta["test_scores"]
    assert meta["config"]["arch"] == "whiten"  # the default head
    w = meta["whitening"]
    assert head.output_dim == (512 if w.get("off") else min(int(w["dim"]), 512))


def test_eval_reports_raw_and_head_on_held_out(db, model, capsys):
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--model", model, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["split"] == "test" and r["objects"] == 2 and r["images"] == 8
    from ris.embed import embed_features
    from ris.featuredb import FeatureDB
    from ris.metrics import evaluate_retrieval
    from ris.modelio import load_model

    head, meta = load_model(model)
    with FeatureDB(db) as f:  # the scores are those of the model's held-out images, and of no others
        rows = np.sort([f.image_ids.index(i) for i in meta["split"]["test_images"]])
        feats, lab = f.read_rows(rows), f.labels[rows]
    expected = {"raw": evaluate_retrieval(feats / np.linalg.norm(feats, axis=1, keepdims=True), lab).to_dict(),
                "head": evaluate_retrieval(embed_features(head, feats), lab).to_dict()}
    for key in ("raw", "head"):
        for metric in ("ns_score", "top4_accuracy", "map"):
            assert r[key][metric] == pytest.approx(expected[key][metric], abs=1e-6), (key, metric)
            assert r[key][metric] == pytest.approx(meta["test_scores"][key][metric], abs=1e-6)  # as training scored it
        assert set(r[key]["recall_at"]) == {"1", "4", "10"}
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--min-ns", "4.01")
    assert code == 1 and "below" in err
    assert "off-the-shelf" in out


def test_search_any_image_with_montage(tiny, db, model, tmp_path, capsys):
    _, _, query = tiny
    png = tmp_path / "r.png"
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "--model", model,
                         "-k", "5", "--output", png, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert len(r["results"]) == 5 and [h["rank"] for h in r["results"]] == [1, 2, 3, 4, 5]
    d = [h["distance"] for h in r["results"]]
    assert d == sorted(d)
    assert png.exists() and png.stat().st_size > 1000
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "3")
    assert code == 0 and "rank" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3


def test_search_with_a_database_image_finds_it_first(tiny, db, capsys):
    """The query is described exactly as the database was (here even with --weights none)."""
    _, data, _ = tiny
    image = sorted(Path(data).glob("*.jpg"))[5]
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", image, "--features-db", db, "-k", "2", "--json")
    assert code == 0, err
    top = json.loads(out)["results"][0]
    assert top["image_id"] == image.name and top["distance"] < 1e-3


def test_search_json_names_failed_queries_and_what_its_numbers_are(tiny, db, tmp_path, capsys):
    """--json printed [] for one query that failed (an object when it worked), left failed queries
    out of a list without a word, and gave re-ranking scores under "distance" unlabelled."""
    _, data, query = tiny
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", bad, "--features-db", db, "--json")
    r = json.loads(out)
    assert code == 2 and r["query"] == str(bad) and "notes.jpg" in r["error"] and "results" not in r
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, bad, "--features-db", db, "-k", "2",
                         "--rerank", "qe", "--json")
    first, second = json.loads(out)
    assert code == 1 and len(first["results"]) == 2 and first["score"] == "re-ranking score (smaller = better)"
    assert second["query"] == str(bad) and second["error"]
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2",
                         "--rerank", "qe")
    assert code == 0 and "score" in out.splitlines()[1] and "distance" not in out.splitlines()[1]
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2", "--json")
    assert json.loads(out)["score"] == "distance"


def test_a_montage_name_without_a_picture_format_is_refused_before_searching(tiny, db, tmp_path, capsys):
    _, _, query = tiny
    for name in ("res.txt", "noext"):
        code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db,
                             "--output", tmp_path / name)
        assert code == 2 and name in err and ".png" in err and ".jpg" in err and not (tmp_path / name).exists()
        assert "rank" not in out


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_a_montage_that_cannot_be_written_there_is_refused_before_the_set_up(tiny, db, tmp_path, capsys, monkeypatch,
                                                                              where):
    """--output under a plain file, or where no file can be made (/proc), failed only after the
    model, the database and the search had run (a missing folder is made: that is fine)."""
    import ris.search

    _, _, query = tiny
    (tmp_path / "notes.txt").write_text("x")
    out_path = tmp_path / "notes.txt" / "r.png" if where == "under-a-file" else Path("/proc/ris-montage.png")
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")

    def no_set_up(*a, **kw):
        raise AssertionError("the search engine was set up before --output was checked")

    monkeypatch.setattr(ris.search, "SearchEngine", no_set_up)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "--output", out_path)
    assert code == 2 and str(out_path.parent) in err and len(err.strip().splitlines()) == 1, err
    assert out == "" and not out_path.exists()


def test_a_query_opencv_warns_about_is_one_line(tiny, db, tmp_path, capsys):
    """A 32-bit float TIFF query printed OpenCV's '[ WARN:0@9.9] global grfmt_tiff.cpp ...' line
    before ris' own one-line refusal or answer."""
    import subprocess
    import sys

    tif = tmp_path / "float.tif"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((40, 40), np.float32), mode="F").save(tif)
    done = subprocess.run([sys.executable, "-c", "from ris.cli.search import entry; entry()", "--image", str(tif),
                           "--features-db", str(db), "-k", "2"], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "float.tif" in lines[0], done.stderr


def test_search_refuses_features_from_another_backbone(tiny, model, tmp_path, capsys):
    _, data, query = tiny
    other = tmp_path / "other.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(other), "--model",
                                                 "vgg16", "--weights", "none", "--resize", "96", "--no-progress"]) == 0
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", other, "--model", model)
    assert code == 2 and "made differently" in err and "--resize 64 for the model, 96 in the database" in err


def test_search_bad_query_image(tiny, db, tmp_path, capsys):
    bad = make_bad_images(tmp_path)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", bad["truncated"], "--features-db", db)
    assert code == 2 and "truncated" in err and str(bad["truncated"]) in err  # nothing done: an error


def test_installed_entry_points_exist():
    bindir = Path(sys.executable).parent
    for name in ("ris-extract", "ris-train", "ris-search", "ris-eval", "ris-demo"):
        exe = shutil.which(name, path=str(bindir)) or shutil.which(name)
        if exe is None:
            pytest.skip("package not installed (pip install .)")
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--" in r.stdout


@pytest.mark.parametrize("command", ["extract", "train", "search", "eval", "demo"])
def test_help_does_not_load_keras_or_tensorflow(command):
    """--help lists the registries' choices (backbones, poolings, heads, miners, re-rankers) without
    importing Keras: the registry modules import it only inside functions."""
    code = (f"import sys; from ris.cli.{command} import build_parser; build_parser().format_help(); "
            "loaded = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules]; "
            "assert not loaded, loaded")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_image_split_with_unseen_classes(tmp_path, capsys):
    from ris.testing import make_tiny_folders_dataset

    data = make_tiny_folders_dataset(tmp_path / "d", classes=("a", "b", "c", "d", "e"), per_class=12, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, train_cli, "ris-train", "--features-db", db, "--output", tmp_path / "m.keras",
                         "--split-by", "image", "--test-fraction", "0.5", "--val-fraction", "0.2", "--unseen-classes", "1",
                         "--quiet", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert "unseen_classes" in r["scores"] and r["scores"]["unseen_classes"]["head"]["queries"] == 12
    from ris.modelio import load_model

    _, meta = load_model(tmp_path / "m.keras")
    # every image the head was not fitted on is held out: 6 of each of the 4 seen classes, all 12 of the unseen one
    assert meta["split"]["by"] == "image" and len(meta["split"]["test_images"]) == 36
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--model", tmp_path / "m.keras", "--json")
    assert code == 0 and json.loads(out)["images"] == r["scores"]["raw"]["queries"] == 36


@pytest.mark.parametrize("method", ["qe", "dba+qe"])
def test_search_with_reranking(tiny, db, capsys, method):
    _, _, query = tiny
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "4",
                         "--rerank", method, "--json")
    assert code == 0, err
    r = json.loads(out)["results"]
    assert len(r) == 4 and [h["distance"] for h in r] == sorted(h["distance"] for h in r)


@pytest.mark.parametrize("method", ["qe", "dba+qe"])
def test_reranking_a_one_image_database_is_one_error_not_a_crash(tmp_path, capsys, method):
    """Too few images to re-rank is the user's database, not a bug: one line, exit 2."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=1, size=64)
    db = tmp_path / "one.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", data / "ukbench00000.jpg",
                         "--features-db", db, "--rerank", method)
    assert code == 2 and err.startswith("ris-search: error: ") and len(err.strip().splitlines()) == 1, err
    assert "at least two" in err and "--rerank" in err


def test_dba_database_is_cached_beside_the_database_and_rebuilt_when_it_changes(db, tmp_path, monkeypatch):
    import shutil

    import ris.rerank
    from ris.search import SearchEngine

    copy = tmp_path / "feats.h5"
    shutil.copy(db, copy)
    with h5py.File(copy, "r") as f:  # a fixed query vector: the test features come from random weights
        query = f["features"][3:4]
    first = SearchEngine(copy, rerank="dba+qe").reranker.search(query, 5)[1].tolist()
    caches = list(tmp_path.glob("feats.h5.dba-*.h5"))
    assert len(caches) == 1

    def no_knn(*a, **k):
        raise AssertionError("the cached DBA database should have been used")

    monkeypatch.setattr(ris.rerank, "neighbours_without_self", no_knn)
    assert SearchEngine(copy, rerank="dba+qe").reranker.search(query, 5)[1].tolist() == first
    from ris.featuredb import FeatureWriter

    with h5py.File(copy, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    w = FeatureWriter(copy, attrs, tuple(attrs["feature_shape"]), [], append=True)  # as --append does
    w.add(["new.jpg"], query, [""])
    w.finish()
    with pytest.raises(AssertionError, match="cached DBA"):
        SearchEngine(copy, rerank="dba+qe")


def test_eval_folds_and_rerank(db, capsys):
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--folds", "3", "--rerank", "qe", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert len(r["per_fold"]) == 3 and r["rerank"] == "qe"
    assert sum(f["queries"] for f in r["per_fold"]) == 24  # the folds' test parts partition the 24 images
    assert r["summary"]["ns_score"]["mean"] == round(float(np.mean([f["ns_score"] for f in r["per_fold"]])), 4)


def test_shallow_branch_trains_evaluates_and_searches(tiny, db, tmp_path, capsys):
    _, _, query = tiny
    out = tmp_path / "shallow.keras"
    code, o, err = cli(capsys, train_cli, "ris-train", "--features-db", db, "--output", out, "--arch", "residual", "--shallow", "16",
                       "--epochs", "2", "--hidden", "32", "--p", "4", "--quiet", "--test-fraction", "0.34",
                       "--val-fraction", "0.34", "--json")
    assert code == 0, err
    assert Path(str(db) + ".thumbs16.h5").exists()
    from ris.modelio import load_model

    head, meta = load_model(out)
    assert head.input_shape[-1] == 512 + 16 * 16 * 3 and meta["config"]["shallow"] == 16
    code, o, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--model", out, "--json")
    assert code == 0, err
    # ris-eval feeds the head the same features + thumbnails as training did: the same held-out scores
    assert json.loads(o)["head"]["map"] == pytest.approx(meta["test_scores"]["head"]["map"], abs=1e-6)
    code, o, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "--model", out,
                       "-k", "3", "--json")
    assert code == 0, err
    assert len(json.loads(o)["results"]) == 3


def test_list_layers_names_what_layer_accepts(capsys):
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--model", "mobilenet_v2", "--list-layers", "--json")
    assert code == 0, err
    r = json.loads(out)
    layers = {row["layer"]: row["channels"] for row in r["layers"]}
    assert r["default"] == "head_relu6" and layers["head_relu6"] == 1280 and layers["block16_add"] == 160
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--model", "mobilenet_v2")
    assert code == 2 and "--dataset is required" in err and len(err.strip().splitlines()) == 1


# --- the database and the files beside it ---------------------------------------------------------

MOBILE = ["--model", "mobilenet_v2", "--weights", "none", "--resize", "32", "--no-progress"]


def _extract_cmd(data, out_db, *extra):
    return [sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
            "--features-db", str(out_db), *MOBILE, "--batch-size", "2", "--workers", "1", "--json", *extra]


def _holder_pid(lock: Path, procs, timeout=120) -> int:
    """The pid written in the lock file once some process holds it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            text = lock.read_text()
        except FileNotFoundError:
            text = ""
        if "pid " in text:
            return int(text.split("pid ")[1].split()[0])
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    pytest.fail(f"no process took {lock}: " + " | ".join(p.communicate()[1] for p in procs))


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.5, "running"])
def test_two_writers_on_one_database(tmp_path, gap):
    """A second ris-extract on the same --features-db is refused, naming the holder, and touches none of
    its files; the holder finishes with every image. gap: the second starts 0.5 s after the first, or
    once the first is writing its .partial (seconds later). The holder is paused (SIGSTOP) while the
    other runs so that it is certainly still writing."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=10, views=4, size=64)
    out_db = tmp_path / "f.h5"
    lock, partial = Path(f"{out_db}.lock"), Path(f"{out_db}.partial")
    first = subprocess.Popen(_extract_cmd(data, out_db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [first]
    if gap == "running":
        deadline = time.time() + 120
        while not partial.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
    else:
        time.sleep(gap)
    second = subprocess.Popen(_extract_cmd(data, out_db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(second)
    pid = _holder_pid(lock, procs)
    holder = next(p for p in procs if p.pid == pid)
    other = next(p for p in procs if p.pid != pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        before = partial.stat() if partial.exists() else None
        out, err = other.communicate(timeout=300)
        assert other.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"pid {pid}" in lines[0] and str(out_db) in lines[0], err
        after = partial.stat() if partial.exists() else None
        if before is not None:  # not deleted, not rewritten
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    finally:
        os.kill(pid, signal.SIGCONT)
    out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    summary = json.loads(out)
    assert summary["extracted"] + summary["resumed"] == 40
    with h5py.File(out_db) as f:
        assert f.attrs["complete"] and f["features"].shape[0] == f.attrs["rows_done"] == 40
    assert not lock.exists() and not partial.exists()


def test_readers_refuse_an_incomplete_database(tiny, db, model, tmp_path, capsys):
    _, _, query = tiny
    broken = tmp_path / "f.h5"
    shutil.copy(db, broken)
    with h5py.File(broken, "a") as f:
        f.attrs["complete"] = False
    for args in ((eval_cli, "ris-eval", "--features-db", broken),
                 (search_cli, "ris-search", "--image", query, "--features-db", broken),
                 (train_cli, "ris-train", "--features-db", broken, "--output", tmp_path / "m.keras")):
        code, out, err = cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "incomplete: an extraction was interrupted or is still running" in err and str(broken) in err
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:  # the datasets, no attributes
        for name in ("features", "image_ids", "labels"):
            f[name] = h5py.File(db)[name][:]
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", bare)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bare) in err and "missing attribute(s) model" in err


def test_extract_names_a_directory_and_a_damaged_database(tiny, db, tmp_path, capsys):
    _, data, _ = tiny
    (tmp_path / "dir.h5").mkdir()
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", tmp_path / "dir.h5",
                         *FAST)
    assert code == 2 and "is a directory" in err and "already exists" not in err
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(db.read_bytes()[:5000])
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", damaged, "--append",
                         *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(damaged) in err and "damaged" in err
    assert not Path(f"{damaged}.partial").exists() and not Path(f"{damaged}.lock").exists()


def test_overwrite_clears_caches_and_a_same_size_database_never_gets_stale_vectors(tiny, db, model, tmp_path, capsys):
    from ris.search import SearchEngine
    from ris.embed import embed_features
    from ris.modelio import load_model

    _, data, query = tiny
    copy = tmp_path / "feats.h5"
    shutil.copy(db, copy)
    with SearchEngine(copy, model, rerank="dba+qe") as engine:
        old_vectors = np.asarray(engine.vectors[:])
    caches = sorted(p.name for p in tmp_path.glob("feats.h5.*"))
    assert any(".emb-" in c for c in caches) and any(".dba-" in c for c in caches), caches
    saved = {p.name: p.read_bytes() for p in tmp_path.glob("feats.h5.*")}
    (tmp_path / "feats.h5.notes").write_text("mine")  # not a cache: never deleted
    other = make_tiny_dataset(tmp_path / "other", n_objects=6, views=4, size=96, seed=11)  # same count, new images
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", other, "--features-db", copy, "--overwrite",
                         *FAST)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("feats.h5*")) == ["feats.h5", "feats.h5.notes"]
    for name, data_bytes in saved.items():  # even caches put back by hand are not reused
        (tmp_path / name).write_bytes(data_bytes)
    head, _ = load_model(model)
    with h5py.File(copy) as f:
        expected = embed_features(head, f["features"][:])
    with SearchEngine(copy, model, rerank="dba+qe") as engine:
        np.testing.assert_allclose(np.asarray(engine.vectors[:]), expected, rtol=1e-4, atol=1e-5)
        assert not np.allclose(np.asarray(engine.vectors[:]), old_vectors)
        assert engine.db.f.id.valid
    assert not engine.db.f.id.valid  # closed on exit


NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")


def test_non_utf8_file_names_are_extracted_and_searched(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=80)
    (data / "ukbench00005.jpg").rename(data / NON_UTF8)
    (data / "sub\udcff").mkdir()
    shutil.copy(data / "ukbench00006.jpg", data / "sub\udcff" / "x.jpg")
    (data / "bad\udcfe.jpg").write_bytes(b"")
    out_db = tmp_path / "f.h5"
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", out_db,
                         "--labels", "none", *FAST)
    assert code == 0, err
    assert "bad\\udcfe.jpg" in out or "bad\\xfe.jpg" in out  # printed, escaped, not a crash
    from ris.featuredb import FeatureDB

    with FeatureDB(out_db) as fdb:
        ids = fdb.image_ids
        assert NON_UTF8 in ids and "sub\udcff/x.jpg" in ids
        assert [i for i, _ in fdb.failures] == ["bad\udcfe.jpg"]
    for fmt in ([], ["--output", tmp_path / "r.png", "--json"]):  # the montage captions the names too
        code, out, err = cli(capsys, search_cli, "ris-search", "--image", data / NON_UTF8, "--features-db", out_db,
                             "-k", "2", *fmt)
        assert code == 0, err
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert json.loads(out)["results"][0]["image_id"] == "caf\\xe9.jpg"  # strict JSON: the byte as text
    assert ids.index(NON_UTF8) >= 0


def test_extract_counts_files_not_read_and_verbose_lists_them(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=64)
    odd = make_odd_files(data / "odd")
    out_db = tmp_path / "f.h5"
    args = ["--dataset", data, "--features-db", out_db, *FAST]
    code, out, err = call_with_fifo_guard(lambda: cli(capsys, extract_cli, "ris-extract", *args), odd.get("fifo"))
    assert code == 0, err
    # groundtruth.tsv is read, as the labels: not counted
    assert "not read: 3 files with other extensions, 1 hidden file, 1 hidden folder (--verbose lists them)" in out
    assert "photo.heic" not in out and "groundtruth.tsv" not in out
    assert "skipped: " in out and "not a regular file (FIFO)" in out and "file too large" in out
    code, out, err = call_with_fifo_guard(lambda: cli(capsys, extract_cli, "ris-extract", *args, "--overwrite",
                                                      "--verbose"), odd.get("fifo"))
    assert code == 0, err
    for line in ("  not read (extension): odd/photo.heic", "  not read (extension): odd/vector.svg",
                 "  not read (hidden): odd/.hidden.jpg", "  not read (hidden): odd/.cache/"):
        assert line in out.splitlines()
    code, out, err = call_with_fifo_guard(lambda: cli(capsys, extract_cli, "ris-extract", *args, "--overwrite",
                                                      "--json"), odd.get("fifo"))
    s = json.loads(out)
    assert s["other_files"] == ["odd/notes.txt", "odd/photo.heic", "odd/vector.svg"]
    assert s["hidden_files"] == ["odd/.cache/", "odd/.hidden.jpg"]
    skipped = {Path(k["image"]).name: k["reason"] for k in s["skipped"]}
    assert "anim.gif" not in skipped and "trailing.jpg" not in skipped and s["extracted"] == 8 + 2
    if "fifo" in odd:
        assert "not a regular file (FIFO)" in skipped["fifo.jpg"]


def test_extract_of_a_folder_without_images_names_what_it_holds(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.heic").write_bytes(b"x")
    (tmp_path / "d" / ".b.jpg").write_bytes(b"x")
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", tmp_path / "d", "--features-db",
                         tmp_path / "x.h5", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no images found" in err and ".gif" in err and "1 file with another extension (a.heic)" in err
    assert "1 hidden file" in err


def test_search_refuses_special_query_files(tiny, db, tmp_path, capsys):
    odd = make_odd_files(tmp_path / "odd")
    for name in ("fifo", "urandom", "sparse", "folder_jpg"):
        if name not in odd:
            continue
        code, out, err = call_with_fifo_guard(
            lambda: cli(capsys, search_cli, "ris-search", "--image", odd[name], "--features-db", db), odd.get("fifo"))
        assert code == 2 and ODD_REASONS[name] in err and str(odd[name]) in err, (name, err)
        assert len(err.strip().splitlines()) == 1


def test_search_never_replaces_a_special_file_with_its_montage(tiny, db, tmp_path, capsys):
    """--output naming a FIFO (or a device) is refused before any query runs; the special file stays."""
    import stat

    _, _, query = tiny
    fifo = tmp_path / "montage.png"
    os.mkfifo(fifo)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "--output", fifo)
    assert code == 2 and err == f"ris-search: error: {fifo}: not a regular file (FIFO); give --output a file name\n"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and out == ""


def test_search_never_replaces_a_query_image_with_its_montage(tiny, db, tmp_path, capsys):
    """--output naming a query's own file (or, with several queries, a query named like another
    query's numbered montage) would replace the user's photo with the montage: refused before any
    query runs, the photos unchanged."""
    _, _, query = tiny
    photo = tmp_path / "photo.jpg"
    shutil.copy(query, photo)
    before = photo.read_bytes()
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", photo, "--features-db", db, "--output", photo)
    assert code == 2 and out == ""
    assert err == f"ris-search: error: {photo}: is a query image; give --output another file name\n"
    assert photo.read_bytes() == before
    second = tmp_path / "results-1.jpg"  # the first montage of --output results.jpg with two queries
    shutil.copy(query, second)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", photo, second, "--features-db", db,
                         "--output", tmp_path / "results.jpg")
    assert code == 2 and f"{second}: is a query image" in err and len(err.splitlines()) == 1
    assert second.read_bytes() == before and not (tmp_path / "results-2.jpg").exists()


def test_search_never_replaces_a_database_image_with_its_montage(tmp_path, capsys, monkeypatch):
    """--output naming an image of the database (by its path, through a link, or with '..')
    replaced that collection photo with the montage: refused before the set-up, exit 2, the photo
    unchanged; a new file beside the database's images is still fine."""
    import ris.search

    data = make_tiny_dataset(tmp_path / "images", n_objects=1, views=2, size=64)
    db = tmp_path / "feats.h5"
    assert run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(db), *FAST]) == 0
    capsys.readouterr()
    query = tmp_path / "q.jpg"
    shutil.copy(data / "ukbench00000.jpg", query)
    photo = data / "ukbench00001.jpg"
    before = photo.read_bytes()
    link = tmp_path / "link.jpg"
    link.symlink_to(photo)
    moved = tmp_path / "moved"
    moved.symlink_to(data)  # the database's images, reached through --dataset-root
    real_engine = ris.search.SearchEngine

    def no_set_up(*a, **kw):
        raise AssertionError("the search engine was set up before --output was checked")

    monkeypatch.setattr(ris.search, "SearchEngine", no_set_up)
    for output, extra in ((photo, []), (link, []), (data / "sub" / ".." / photo.name, []),
                          (moved / photo.name, ["--dataset-root", moved])):
        code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db,
                             "--output", output, *extra)
        assert code == 2 and out == "", (output, err)
        assert err == (f"ris-search: error: {output}: is an image of the database ({photo.name}); "
                       "give --output another file name\n")
        assert photo.read_bytes() == before and link.is_symlink()
    monkeypatch.setattr(ris.search, "SearchEngine", real_engine)
    import ris.featuredb

    reads = []
    real_names = ris.featuredb.FeatureDB.row_names
    monkeypatch.setattr(ris.featuredb.FeatureDB, "row_names", lambda self: reads.append(1) or real_names(self))
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "1",
                         "--output", data / "results.png")
    assert code == 0 and (data / "results.png").stat().st_size > 1000, err
    assert reads == [1]  # the engine's: a file still to be made is no database image, its names are not read


def test_show_without_a_display_says_where_the_montage_is(tiny, db, tmp_path, capsys, monkeypatch):
    """--show with DISPLAY unset (an ssh session, a container) exited 0, opened nothing and said
    nothing: one stderr line says no display was found and where the montage was written."""
    import matplotlib.pyplot as plt

    if not sys.platform.startswith("linux"):
        pytest.skip("DISPLAY / WAYLAND_DISPLAY decide only on Linux")
    _, _, query = tiny
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **kw: shown.append(1))
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2", "--show")
    assert code == 0 and shown == [] and "montage: results.png" in out
    assert err == ("ris-search: --show: no display found (DISPLAY and WAYLAND_DISPLAY are unset); "
                   "the montage is in results.png\n")
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_the_default_results_png_never_replaces_a_file_ris_did_not_write(tiny, db, tmp_path, capsys, monkeypatch):
    """--show without --output replaced an existing results.png in the current folder (a user's own
    picture) with the montage, silently. Refused before the set-up naming --output; a montage ris
    wrote there before is replaced; --output results.png replaces any regular file, as documented."""
    from PIL import Image

    _, _, query = tiny
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (30, 20), (200, 10, 10)).save("results.png")
    before = Path("results.png").read_bytes()
    args = ["--image", query, "--features-db", db, "-k", "2", "--show"]
    code, out, err = cli(capsys, search_cli, "ris-search", *args)
    assert code == 2 and out == "" and Path("results.png").read_bytes() == before
    assert err == ("ris-search: error: results.png: exists and is not a montage ris-search wrote; give --output "
                   "results.png to replace it, or another file name\n")
    code, out, err = cli(capsys, search_cli, "ris-search", *args, "--output", "results.png")
    assert code == 0 and Path("results.png").read_bytes() != before
    code, out, err = cli(capsys, search_cli, "ris-search", *args)  # its own montage: replaced
    assert code == 0 and "montage: results.png" in out


def test_a_montage_that_cannot_be_written_keeps_the_answered_queries(tiny, db, tmp_path, capsys, monkeypatch):
    """A full disk on the second of three montages ended ris-search with exit 2 ('nothing done') and,
    with --json, printed nothing: the answered queries' results were lost. Each query's results are
    kept; the failed montage is one line and 'montage_error' in its JSON object; exit 1 (done in part)."""
    import errno

    import ris.montage

    _, _, query = tiny
    real = ris.montage.write_png

    def full_disk(path, rgb):
        if str(path).endswith("-2.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, rgb)

    monkeypatch.setattr(ris.montage, "write_png", full_disk)
    out_png = tmp_path / "m.png"
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, query, query, "--features-db", db,
                         "-k", "2", "--output", out_png, "--json")
    assert code == 1
    assert err == f"ris-search: error: {tmp_path}/m-2.png: cannot write the montage (No space left on device)\n"
    results = json.loads(out)
    assert [len(r["results"]) for r in results] == [2, 2, 2] and all("error" not in r for r in results)
    assert [r["montage"] for r in results] == [f"{tmp_path}/m-1.png", None, f"{tmp_path}/m-3.png"]
    assert results[1]["montage_error"] == "No space left on device" and "montage_error" not in results[0]
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2",
                         "--output", tmp_path / "n.png")
    assert code == 0 and "montage: " in out


def test_extract_ukbench_labels_on_other_names_is_one_error(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=64)
    (data / "groundtruth.tsv").unlink()
    (data / "ukbench00001.jpg").rename(data / "IMG_1000.jpg")
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", tmp_path / "u.h5",
                         "--labels", "ukbench", *FAST)
    assert code == 2 and "IMG_1000.jpg" in err and "ukbench" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "u.h5").exists() and not (tmp_path / "u.h5.partial").exists()


def test_search_warns_once_about_rows_that_are_not_finite_and_never_returns_them(tiny, db, tmp_path, capsys):
    _, data, _ = tiny
    copy = tmp_path / "feats.h5"
    shutil.copy(db, copy)
    with h5py.File(copy, "r+") as f:
        f["features"][2] = np.nan
        bad_id = f["image_ids"][2].decode()
    images = sorted(Path(data).glob("*.jpg"))[:2]
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", *images, "--features-db", copy, "-k", "30",
                         "--json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "not finite" in line]
    assert len(warnings) == 1 and bad_id in warnings[0] and "1 row" in warnings[0]
    for q in json.loads(out):
        assert len(q["results"]) == 23 and bad_id not in [h["image_id"] for h in q["results"]]
        assert all(np.isfinite(h["distance"]) for h in q["results"])


@pytest.mark.parametrize("model", ["mobilenet_v2", "vgg16"])
def test_a_text_file_as_weights_is_one_line_naming_the_file(tiny, tmp_path, capsys, model):
    _, data, _ = tiny
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not weights\n")
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", tmp_path / "x.h5",
                         "--model", model, "--weights", notes, "--resize", "64", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(notes) in err and "cannot load weights" in err and "Traceback" not in err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("module,args,flag", [
    (extract_cli, ["--batch-size", "0"], "--batch-size"),
    (extract_cli, ["--batch-size", "-1"], "--batch-size"),
    (extract_cli, ["--workers", "0"], "--workers"),
    (extract_cli, ["--resize", "0"], "--resize"),
    (extract_cli, ["--scales", "0"], "--scales"),
    (extract_cli, ["--scales", "1,-0.5"], "--scales"),
    (extract_cli, ["--scales", "nan"], "--scales"),
    (extract_cli, ["--scales", "1,,0.5"], "--scales"),
    (extract_cli, ["--scales", "inf"], "--scales"),
    (search_cli, ["--image", "q.jpg", "-k", "-1"], "-k"),
    (search_cli, ["--image", "q.jpg", "-k", "0"], "-k"),
    (train_cli, ["--folds", "1"], "--folds"),
    (train_cli, ["--folds", "-2"], "--folds"),
    (train_cli, ["--test-fraction", "1.5"], "--test-fraction"),
    (train_cli, ["--test-fraction", "1"], "--test-fraction"),
    (train_cli, ["--val-fraction", "-0.1"], "--val-fraction"),
    (train_cli, ["--epochs", "0"], "--epochs"),
    (train_cli, ["--patience", "0"], "--patience"),
    (train_cli, ["--batch-size", "0"], "--batch-size"),
    (train_cli, ["--p", "1"], "--p"),
    (train_cli, ["--k", "1"], "--k"),
    (train_cli, ["--lr", "0"], "--lr"),
    (train_cli, ["--margin", "nan"], "--margin"),
    (train_cli, ["--dropout", "1"], "--dropout"),
    (train_cli, ["--out-dim", "0"], "--out-dim"),
    (train_cli, ["--hidden", "512,0"], "--hidden"),
    (train_cli, ["--shallow", "-1"], "--shallow"),
    (train_cli, ["--unseen-classes", "-1"], "--unseen-classes"),
    (train_cli, ["--whiten-shrinkage", "-1"], "--whiten-shrinkage"),
    (train_cli, ["--whiten-power", "0"], "--whiten-power"),
    (train_cli, ["--whiten-dim", "0"], "--whiten-dim"),
    (train_cli, ["--whiten-dim", "big"], "--whiten-dim"),
    (eval_cli, ["--folds", "1"], "--folds"),
    (eval_cli, ["--test-fraction", "1.5"], "--test-fraction"),
    (eval_cli, ["--min-ns", "nan"], "--min-ns"),
])
def test_nonsense_arguments_are_refused_by_argparse_with_exit_2(module, args, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        module.build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{module.build_parser().prog}: error: argument {flag}") and "Traceback" not in err


def test_sensible_arguments_still_parse():
    a = extract_cli.build_parser().parse_args(["--scales", "0.707, 1", "--batch-size", "1", "--workers", "2"])
    assert a.scales == (0.707, 1.0) and a.batch_size == 1 and a.workers == 2
    a = train_cli.build_parser().parse_args(["--folds", "0", "--test-fraction", "0", "--whiten-dim", "auto",
                                             "--whiten-shrinkage", "0.3", "--hidden", ""])
    assert a.folds == 0 and a.test_fraction == 0.0 and a.whiten_dim is None and a.whiten_shrinkage == 0.3
    assert a.hidden == ()
    assert train_cli.build_parser().parse_args(["--folds", "5"]).folds == 5
    assert search_cli.build_parser().parse_args(["--image", "q.jpg", "-k", "1"]).top_k == 1


def test_exit_codes_of_search_follow_the_rule(tiny, db, tmp_path, capsys):
    from ris.cli.common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL

    _, _, query = tiny
    bad = make_bad_images(tmp_path)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, bad["corrupt"], "--features-db", db,
                         "-k", "2", "--json")
    assert code == EXIT_PARTIAL == 1 and str(bad["corrupt"]) in err
    results = json.loads(out)
    assert [r["query"] for r in results] == [str(query), str(bad["corrupt"])] and len(results[0]["results"]) == 2
    assert "results" not in results[1] and "corrupt.jpg" in results[1]["error"]  # in its place, saying why
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", bad["corrupt"], bad["zero_byte"],
                         "--features-db", db)
    assert code == EXIT_ERROR == 2
    assert cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db)[0] == EXIT_OK == 0
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", tmp_path / "none.h5")
    assert code == EXIT_ERROR and "not found" in err


def test_file_names_with_newlines_stay_on_their_own_line(tiny, db, tmp_path, capsys):
    """A file name holding a newline (or another control character) split the one-line error in
    two and broke the results table; such characters are written escaped, as Python writes them."""
    _, _, query = tiny
    good = tmp_path / "new\nline.jpg"
    shutil.copy(query, good)
    bad = tmp_path / "bad\nname\x1b[2J.jpg"
    bad.write_text("not an image")
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", good, bad, "--features-db", db, "-k", "2")
    assert code == 1
    assert err.splitlines() == [f"ris-search: error: {tmp_path}/bad\\nname\\x1b[2J.jpg: not a readable image "
                                "(unknown or damaged format)"]
    assert out.splitlines()[0] == f"query: {tmp_path}/new\\nline.jpg" and len(out.splitlines()) == 2 + 2
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", bad, "--features-db", db, "--json")
    assert code == 2 and len(err.splitlines()) == 1 and json.loads(out)["query"] == str(bad)  # JSON keeps the name


def test_run_writes_an_error_naming_a_control_character_on_one_line(capsys):
    from ris.errors import RisError

    def main(argv):
        raise RisError("a\nb\rc\td: bad")

    assert run("ris-x", main, []) == 2
    assert capsys.readouterr().err == "ris-x: error: a\\nb\\rc\\td: bad\n"


def test_exit_codes_of_eval_when_the_required_score_is_not_met(db, capsys):
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--folds", "3", "--min-ns", "4.01")
    assert code == 1 and "below" in err
    assert cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--min-ns", "0")[0] == 0


@pytest.mark.parametrize("raised,code", [(None, 0), ("partial", 1), ("error", 2), ("oserror", 2), ("errno", 2),
                                         ("interrupt", 130), ("interrupted", 130), ("bug", 2), ("valueerror", 2),
                                         ("bare-oserror", 2)])
def test_run_maps_outcomes_to_the_documented_exit_codes(raised, code, capsys, monkeypatch):
    from ris.cli import common
    from ris.errors import Interrupted, RisError

    monkeypatch.delenv("RIS_VERBOSE", raising=False)

    def main(argv):
        if raised == "partial":
            return common.EXIT_PARTIAL
        if raised == "error":
            raise RisError("x.h5: broken")
        if raised == "oserror":
            raise FileNotFoundError(2, "No such file or directory", "x.h5")
        if raised == "errno":
            raise OSError(28, "No space left on device")
        if raised == "interrupt":
            raise KeyboardInterrupt
        if raised == "interrupted":
            raise Interrupted("interrupted after 3 images; run the same command again to resume")
        if raised == "bug":
            return 1 // 0
        if raised == "valueerror":
            raise ValueError("not a user error: a bug")
        if raised == "bare-oserror":
            raise OSError("raised by code, no errno, no file")
        return common.EXIT_OK

    assert run("ris-x", main, ["--json"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 1
    if raised == "oserror":
        assert err == "ris-x: error: x.h5: No such file or directory\n"
    if raised == "errno":
        assert err == "ris-x: error: No space left on device\n"
    if raised == "interrupted":
        assert err.startswith("ris-x: interrupted after 3 images")
    if raised in ("bug", "valueerror", "bare-oserror"):  # a bug is never passed off as bad input
        assert err.startswith("ris-x: internal error") and "RIS_VERBOSE=1" in err and "Traceback" not in err
        assert {"bug": "ZeroDivisionError", "valueerror": "ValueError", "bare-oserror": "OSError"}[raised] in err


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("where", ["gc-callback", "finalizer", "weakref-callback", "code"])
def test_a_signal_is_never_lost_where_python_drops_exceptions(where, signame, capsys):
    """Keras' JAX backend keeps a garbage-collector callback (jax's _xla_gc_callback) running all
    through a command. A Ctrl-C or SIGTERM whose handler ran inside it raised KeyboardInterrupt
    there; Python printed 'Exception ignored in ...', dropped it, and the command went on to exit 0
    (the same inside a __del__ or a weakref callback). Now it is raised again once that callback has
    returned: exit 130, one line; anywhere else it stops the command at once, as before."""
    import gc
    import weakref

    sig = getattr(signal, signame)
    sent: list[str] = []

    def in_gc(phase, info):
        if not sent:
            sent.append(phase)
            signal.raise_signal(sig)  # the handler runs here, inside the collector's callback

    class Finalized:
        def __del__(self):
            sent.append("__del__")
            signal.raise_signal(sig)

    class Plain:
        pass

    def main(argv):
        if where == "gc-callback":
            gc.callbacks.append(in_gc)
            try:
                gc.collect()
            finally:
                gc.callbacks.remove(in_gc)
        elif where == "finalizer":
            Finalized()  # freed at once: its __del__ runs here
        elif where == "weakref-callback":
            target = Plain()
            ref = weakref.ref(target, lambda r: (sent.append("weakref"), signal.raise_signal(sig)))
            del target  # the callback runs here
        else:
            sent.append("code")
            signal.raise_signal(sig)
        for _ in range(10):  # the points where a signal sent again is handled
            len(sent)
        return 0

    hooks = (sys.unraisablehook, signal.getsignal(signal.SIGTERM))
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the suite runs with SIGINT ignored
    try:
        code = run("ris-x", main, [])
    finally:
        signal.signal(signal.SIGINT, saved)
    assert (code, capsys.readouterr().err) == (130, "ris-x: interrupted\n") and sent
    assert (sys.unraisablehook, signal.getsignal(signal.SIGTERM)) == hooks


def test_a_message_that_starts_with_interrupted_is_not_an_interruption(capsys):
    """The exit status comes from the error's type, not from its text."""
    from ris.errors import RisError

    def main(argv):
        raise RisError("interrupted: a file name that starts with the word")

    assert run("ris-x", main, []) == 2
    assert capsys.readouterr().err.startswith("ris-x: error: interrupted")


def test_an_internal_error_shows_its_traceback_with_ris_verbose(capsys, monkeypatch):
    def main(argv):
        return {}["missing"]

    monkeypatch.setenv("RIS_VERBOSE", "1")
    assert run("ris-x", main, []) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].startswith("ris-x: internal error")


def test_a_command_that_fails_with_a_bug_exits_2_in_one_line(tmp_path):
    """The whole path, as a user runs it: a real process, its stderr and its exit status."""
    code = ("import sys\nfrom ris.cli.common import run\n"
            "def main(argv):\n    return 1 / 0\n"
            "sys.exit(run('ris-x', main, []))")
    env = {k: v for k, v in os.environ.items() if k != "RIS_VERBOSE"}
    env["KERAS_BACKEND"] = "numpy"  # no TensorFlow start-up needed for this check
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ris-x: internal error (a bug in ris, not in your input): ZeroDivisionError: division by zero; "
        "set RIS_VERBOSE=1 for the traceback"]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "RIS_VERBOSE": "1"})
    assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr


def test_search_says_when_the_results_image_files_are_gone(tmp_path, capsys):
    """The dataset folder moved: ris-search listed paths that no longer exist and drew 'missing'
    tiles without a word; it now says so once, naming --dataset-root (exit 0: the ranking stands)."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    query = tmp_path / "q.jpg"
    shutil.copy(data / "ukbench00001.jpg", query)
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2")
    assert code == 0 and "warning" not in err, err
    data.rename(tmp_path / "moved")
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2")
    assert code == 0 and err.count("\n") == 1, err
    assert "ris-search: warning: 2 result image file(s) are not there (e.g. " in err and "--dataset-root" in err
    code, out, err = cli(capsys, search_cli, "ris-search", "--image", query, "--features-db", db, "-k", "2",
                         "--dataset-root", tmp_path / "moved", "--json")
    assert code == 0 and "warning" not in err and json.loads(out)["results"][0]["image_id"] == "ukbench00001.jpg"


def test_readme_documents_the_exit_codes():
    from ris.cli import common

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for value in (common.EXIT_OK, common.EXIT_PARTIAL, common.EXIT_ERROR, common.EXIT_INTERRUPTED):
        assert f"| {value} |" in readme


def test_eval_reports_queries_without_relevant_and_scores_them_nowhere(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    (data / "groundtruth.tsv").unlink()
    (data / "labels.tsv").write_text("ukbench00000.jpg\ta\nukbench00001.jpg\ta\nukbench00002.jpg\tb\n")
    (data / "ukbench00003.jpg").unlink()
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, "--labels",
               data / "labels.tsv", *FAST)[0] == 0
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["queries_without_relevant"] == 1 and r["raw"]["queries"] == 2
    assert r["raw"]["map"] == 1.0 and r["raw"]["recall_at"]["1"] == 1.0
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db)
    assert "1 query without another image of its group" in out


def test_eval_with_no_query_that_can_be_scored_is_an_error_not_zeros(tmp_path, capsys):
    """Every label unique: no query has another image of its group. ris-eval printed N-S 0.000,
    mAP 0.000 (and JSON zeros), exit 0, and --min-ns blamed the score."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    (data / "groundtruth.tsv").unlink()
    (data / "labels.tsv").write_text("".join(f"ukbench{i:05d}.jpg\t{i}\n" for i in range(4)))
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, "--labels",
               data / "labels.tsv", *FAST)[0] == 0
    for extra in ([], ["--json"], ["--min-ns", "3"]):
        code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, *extra)
        assert code == 2 and "no query" in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert "0.000" not in out


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_negative_seed_is_bad_input_not_a_bug(tmp_path, capsys, command):
    module = {"eval": eval_cli, "train": train_cli}[command]
    args = ["--features-db", tmp_path / "f.h5", "--seed", "-1"] + (["--output", tmp_path / "h.keras"]
                                                                  if command == "train" else [])
    with pytest.raises(SystemExit) as caught:
        module.main([str(a) for a in args])
    assert caught.value.code == 2 and "--seed" in capsys.readouterr().err


def test_a_triplet_head_is_saved_only_under_a_keras_name(tmp_path, capsys):
    """``--output head.model`` trained, exited 0, and left a file nothing could load (Keras 3
    loads only .keras files); refused before training."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=4, views=3, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, train_cli, "ris-train", "--features-db", db, "--output", tmp_path / "h.model",
                         "--arch", "mlp", "--epochs", "1", "--quiet")
    assert code == 2 and ".keras" in err and "h.model" in err and not (tmp_path / "h.model").exists()


def _train_until_line(tmp_path, ready: str, sig: int, *extra: str) -> tuple[int, str, str]:
    """Run ris-train in a subprocess (epochs without end), send ``sig`` once a stderr line starts with
    ``ready``, and return (exit status, stdout, stderr). Waits on lines, not on time; the limits
    are there only so that a hang fails instead of blocking the suite."""
    import threading

    db = tmp_path / "f.h5"
    if not db.exists():
        from ris.featuredb import FeatureWriter

        x = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32)
        w = FeatureWriter(db, {"model": "synthetic", "pooling": "gap"}, (64,), [f"o{i}" for i in range(100)])
        w.add([f"{i:04d}.jpg" for i in range(400)], x, [f"o{i // 4}" for i in range(400)])
        w.finish({})
    # Ctrl-C's usual handler even where the suite runs with SIGINT ignored (a background job)
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from ris.cli.train import entry; entry()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--features-db", str(db), "--output",
                             str(tmp_path / "h.keras"), "--arch", "mlp", "--epochs", "100000", "--patience", "100000",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    out: list[str] = []
    seen = threading.Event()

    def read_err():
        for line in proc.stderr:
            err.append(line)
            if line.startswith(ready):
                seen.set()
        seen.set()  # ended before the line came: the assertions below say how

    readers = [threading.Thread(target=read_err, daemon=True),
               threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        assert seen.wait(600), "".join(err)[-2000:]
        proc.send_signal(sig)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # a hang: fail, never block the suite
            proc.kill()
            proc.wait()
    for t in readers:
        t.join(60)
    return proc.returncode, "".join(out), "".join(err)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_after_an_epoch_saves_the_best_epoch_so_far(tmp_path, signame):
    """SIGTERM (a scheduler's time limit) or Ctrl-C to a real ris-train after its first epoch: the
    epochs were thrown away (exit 130, nothing saved); now the best complete epoch is saved, whole
    and loadable, with one line saying so, exit 130. On Keras' JAX backend a SIGTERM raised as
    KeyboardInterrupt inside JAX's garbage-collector callback was dropped ('Exception ignored in
    _xla_gc_callback') and training never stopped: the signal is now only noted, never raised."""
    from ris.modelio import load_model

    code, out, err = _train_until_line(tmp_path, "epoch   1 ", getattr(signal, signame))
    assert code == 130, (code, err[-2000:])
    assert f"interrupted ({signame}) after" in err and "best epoch so far" in err, err[-2000:]
    assert f"saved {tmp_path / 'h.keras'}" in out, out
    _, meta = load_model(tmp_path / "h.keras")
    assert meta["best_epoch"] >= 1 and meta["test_scores"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name], list(tmp_path.iterdir())


def test_a_signal_before_any_epoch_completes_saves_nothing(tmp_path, capsys):
    """Before the first epoch is complete there is nothing better to keep: exit 130, and an
    earlier model at --output stays as it was."""
    data_db = tmp_path / "f.h5"
    _train_until_line(tmp_path, "epoch   1 ", signal.SIGTERM)  # makes f.h5 and an earlier h.keras
    before = (tmp_path / "h.keras").read_bytes()
    code, out, err = _train_until_line(tmp_path, "split by", signal.SIGTERM)
    assert data_db.exists() and code == 130 and "interrupted" in err, (code, err[-2000:])
    assert "saved" not in out and "best epoch so far" not in err, (out, err[-2000:])
    assert (tmp_path / "h.keras").read_bytes() == before


@pytest.mark.parametrize("extra, refused", [
    (["--seed", "3"], True),  # --split all (the default without --model): no split to seed
    (["--test-fraction", "0.5"], True),
    (["--split", "test", "--seed", "3", "--test-fraction", "0.5"], False),
    (["--folds", "2", "--seed", "3"], False),
    (["--folds", "2", "--test-fraction", "0.5"], True),  # each fold holds out 1/k
    (["--model", "{model}", "--seed", "3"], True),  # the model's own split is scored
    (["--queries", "{queries}", "--seed", "3"], True),
])
def test_a_seed_or_test_fraction_that_would_be_ignored_is_refused(tiny, db, model, tmp_path, capsys, extra, refused):
    """ris-eval --model head.keras --seed 5 --test-fraction 0.5 scored the model's split and said
    '(seed 0)'; --queries FILE --seed 3 ignored the seed: both exit 0, as if they had been used."""
    queries = tmp_path / "q.txt"
    queries.write_text("ukbench00000.jpg\n")
    args = [a.format(model=model, queries=queries) for a in extra]
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, *args)
    if refused:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert ("--seed" in err if "--seed" in args else "--test-fraction" in err), err
    else:
        assert code == 0, err


def test_eval_folds_can_hold_out_images_as_ris_train_folds_by_image_does(tiny, db, capsys):
    """ris-train --folds 5 --split-by image holds out each class's images by fold; ris-eval --folds
    promised "the folds of ris-train --folds" but had only object folds (--split-by: unrecognized)."""
    from ris.evaluate import evaluate_folds

    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--folds", "2", "--split-by", "image",
                         "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["split_by"] == "image" and r["per_fold"] == evaluate_folds(db, 2, split_by="image")["per_fold"]
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--split-by", "image")
    assert code == 2 and "--split-by" in err and "--folds" in err


def test_outputs_in_folders_that_do_not_exist_yet_are_created(tiny, tmp_path, capsys):
    """``--features-db out/feats.h5`` failed with "out/feats.h5.lock: No such file or directory"."""
    _, data, _ = tiny
    db = tmp_path / "out" / "feats.h5"
    code, _, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)
    assert code == 0 and db.is_file(), err


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """``ris-index info | head -1``: the reader leaves, the next write fails with EPIPE; it said
    "ris-index: error: Broken pipe" and exit 2, as if the command had failed."""
    import subprocess
    import sys

    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 4, seed=1))
    code = ("import sys; from ris.cli.common import run; from ris.cli.index import main\n"
            "sys.stdout.write('x' * 200000); sys.exit(run('ris-index', main, ['info', '--features-db', sys.argv[1]]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()  # the reader leaves after one line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and "Broken pipe" not in err and "Traceback" not in err, err


def test_json_names_a_file_whose_name_is_not_utf8_in_strict_utf8(tmp_path, capsys):
    """Such a name reaches Python with surrogate escapes, and --json wrote them as lone '\\udcff'
    escapes, which strict JSON parsers (Rust's, Go's) refuse or mangle. Every --json writer now
    writes the undecodable byte as the text '\\xff' (README "Commands")."""
    from ris.cli import index as index_cli

    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=64)
    with open(os.fsencode(data) + b"/caf\xff.jpg", "wb") as fh:
        fh.write(b"not a picture")
    db = tmp_path / "f.h5"
    code, out, err = cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, "--json",
                         "--labels", "none", *FAST)
    assert code == 0, err
    assert "\\ud" not in out and out.isascii()
    skipped = json.loads(out)["skipped"]
    assert [Path(s["image"]).name for s in skipped] == ["caf\\xff.jpg"] and "caf\\xff.jpg" in skipped[0]["reason"]
    listed = tmp_path / "gone.txt"
    listed.write_bytes(b"caf\xff.jpg\n")
    code, out, err = cli(capsys, index_cli, "ris-index", "remove", "--features-db", db, "--from-file", listed, "--json")
    assert code == 0, err
    assert "\\ud" not in out and json.loads(out)["removed_failed"] == ["caf\\xff.jpg"]


def test_min_ns_on_groups_smaller_than_four_says_what_a_perfect_search_scores(tmp_path, capsys):
    """Scenes of two photos: N-S cannot pass 2.0, and --min-ns 3 failed with only 'N-S 2.0000 is
    below the required 3.0', as if the search were poor."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=2, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--json")
    r = json.loads(out)
    assert code == 0 and r["raw"]["ns_perfect"] == 2.0
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--min-ns", "3")
    assert code == 1 and "a perfect search scores N-S 2.000 here" in out
    assert "below the required 3.0" in err and "a perfect search scores 2.0000 on these groups" in err


def test_train_says_what_a_perfect_search_scores_on_groups_smaller_than_four(tmp_path, capsys):
    """ris-train's held-out lines printed N-S 2.9 -> 3.0 on groups of 3 with nothing saying 3.0 is
    the most any search scores there."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=10, views=3, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, train_cli, "ris-train", "--features-db", db, "--output", tmp_path / "h.keras",
                         "--quiet", "--whiten-shrinkage", "0.5", "--whiten-power", "0.5", "--whiten-dim", "16")
    assert code == 0, err
    held = [ln for ln in out.splitlines() if "N-S raw" in ln or "fold protocol" in ln]
    assert len(held) == 2 and all("a perfect search scores 3.000" in ln for ln in held), out


def test_eval_folds_say_what_a_perfect_search_scores_on_groups_smaller_than_four(tmp_path, capsys):
    """ris-eval --folds on groups of 3 printed 'ns_score 3.0000 +- 0.0000' with nothing saying that
    3.0 is a perfect search there."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=6, views=3, size=64)
    db = tmp_path / "f.h5"
    assert cli(capsys, extract_cli, "ris-extract", "--dataset", data, "--features-db", db, *FAST)[0] == 0
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--folds", "3")
    assert code == 0, err
    assert "a perfect search scores N-S 3.000 here" in out
    code, out, err = cli(capsys, eval_cli, "ris-eval", "--features-db", db, "--folds", "3", "--json")
    assert json.loads(out)["ns_perfect"] == 3.0


def test_a_warning_of_ris_is_one_line_naming_the_command(tmp_path):
    """`ris-index remove` (and `--sync`) beside a damaged saved index printed Python's warning
    format: two lines, the first naming ris' own source file and line ('.../ris/sync.py:395:
    UserWarning: ignoring HNSW index ...'), the second a line of ris' code. A warning is one line,
    'ris-<command>: warning: <message>', as the commands' own warnings are."""
    from ris.testing import clustered_vectors, make_feature_db

    pytest.importorskip("hnswlib", reason="hnswlib not installed (pip install 'ris[ann]')")
    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(20, 8))
    (tmp_path / "f.h5.hnsw.json").write_text('{"kind": "hnsw", "count": 3')  # damaged metadata
    done = subprocess.run([sys.executable, "-c", "from ris.cli.index import entry; entry()", "remove",
                           "--features-db", str(db), "img000003.jpg"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    err = done.stderr.splitlines()
    warned = [line for line in err if "ignoring HNSW index" in line]
    assert len(warned) == 1 and warned[0].startswith("ris-index: warning: ignoring HNSW index "), err
    assert not [line for line in err if "UserWarning" in line or "INDEX_KINDS" in line], err
