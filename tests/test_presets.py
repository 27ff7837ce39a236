"""ris.presets: --preset fills only the options left at their defaults, on every command that has it."""
import pytest

from ris import presets
from ris.fusion import FusionConfig


@pytest.mark.parametrize("module, command", [("eval", "eval"), ("search", "search"), ("extract", "extract")])
def test_preset_fills_defaults_and_never_overrides_a_given_option(module, command):
    import importlib

    cli = importlib.import_module(f"ris.cli.{module}")
    p = cli.build_parser()
    base = ["--image", "q.jpg"] if module == "search" else []
    args = presets.apply(p.parse_args(base + ["--preset", "accurate"]), p, command)
    for key, value in presets.PRESETS["accurate"][command].items():
        assert getattr(args, key) == value
    if command != "extract":
        args = presets.apply(p.parse_args(base + ["--preset", "accurate", "--rerank", "qe", "--verify", "7"]), p, command)
        assert args.rerank == "qe" and args.verify == 7
        fast = presets.apply(p.parse_args(base + ["--preset", "fast"]), p, command)
        assert fast.rerank == "none" and fast.verify == 0
    else:
        args = presets.apply(p.parse_args(["--preset", "fast", "--model", "efficientnet_lite0"]), p, command)
        assert args.model == "efficientnet_lite0" and args.pool == "gap" and args.fusion_weights is None


def _extracted_by(preset: str):
    """The recipe `ris-extract --preset PRESET` extracts with (the command's own parsing)."""
    from ris.cli import extract as extract_cli

    p = extract_cli.build_parser()
    return extract_cli.recipe_of(presets.apply(p.parse_args(["--preset", preset]), p, "extract"))


def test_fast_extracts_mobilenet_v2_with_a_light_colour_part():
    """bench/quality.md, 2026-12-02: the colour weight chosen on training objects so that relit
    copies lose nothing without re-ranking."""
    cfg = _extracted_by("fast")
    assert isinstance(cfg, FusionConfig)
    assert [(c.model, c.input_size, c.pooling) for c in cfg.parts] == [("mobilenet_v2", 224, "gap"),
                                                                      ("hsv_hist", 224, "hist")]
    assert cfg.weights == (1.0, 0.35)
    assert not any(c.flip for c in cfg.parts)  # --flip would halve fast's speed


def test_accurate_extracts_the_fusion_measured_in_bench_quality():
    cfg = _extracted_by("accurate")
    assert isinstance(cfg, FusionConfig)
    assert [(c.model, c.input_size, c.pooling) for c in cfg.parts] == [("mobilenet_v2", 224, "gap"),
                                                                      ("efficientnet_lite2", 384, "gem"),
                                                                      ("hsv_hist", 224, "hist")]
    assert cfg.weights == (1.0, 0.5, 0.5)
    assert [c.flip for c in cfg.parts] == [True, True, False]  # --flip: each CNN part (bench/quality.md)


def test_a_fused_presets_per_part_values_stay_with_its_own_model():
    """--preset accurate --model X: X is one backbone, so the preset's 'gap+gem' and fusion weights
    do not apply (they would make an impossible recipe); its single values still do."""
    from ris.cli import extract as extract_cli
    from ris.fusion import make_config

    p = extract_cli.build_parser()
    args = presets.apply(p.parse_args(["--preset", "accurate", "--model", "efficientnet_lite0"]), p, "extract")
    assert args.model == "efficientnet_lite0" and args.pool == "gap" and args.fusion_weights is None
    assert args.resize == p.get_default("resize")  # '224+384' is per part: the other model's own size
    cfg = make_config(args.model, input_size=args.resize, scales=args.scales, pooling=args.pool,
                      fusion_weights=args.fusion_weights)
    assert cfg.model == "efficientnet_lite0" and cfg.pooling == "gap"


@pytest.mark.parametrize("module, command, given, key, want", [
    ("search", "search", ["--rerank", "none"], "rerank", "none"),
    ("eval", "eval", ["--rerank", "none"], "rerank", "none"),
    ("extract", "extract", ["--model", "vgg16"], "model", "vgg16"),
    ("extract", "extract", ["--no-flip"], "flip", False),
])
def test_an_option_given_with_its_default_value_still_wins_over_the_preset(module, command, given, key, want):
    """``--preset accurate --rerank none`` searched with dba+qe, and ``--preset fast --model vgg16``
    extracted the preset's model: the option was given, but with the value argparse defaults to,
    so the preset could not tell it from an option left out. ``--no-flip`` turns accurate's flip off."""
    import importlib

    cli = importlib.import_module(f"ris.cli.{module}")
    p = cli.build_parser()
    base = ["--image", "q.jpg"] if module == "search" else []
    argv = base + ["--preset", "accurate" if key != "model" else "fast"] + given
    args = presets.apply(p.parse_args(argv), p, command, argv)
    assert getattr(args, key) == want
    if key == "model":
        assert args.pool == "gap" and args.fusion_weights is None  # the preset's per-part values stay its own


def test_the_facade_tells_a_given_argument_from_one_left_out(tmp_path):
    """``ris.score(db, preset='accurate', rerank='none')`` scored with dba+qe."""
    import numpy as np

    import ris
    from ris.testing import clustered_vectors, make_feature_db

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(40, 8, seed=1), labels=[f"o{i // 4}" for i in range(40)])
    assert ris.score(db, preset="accurate", rerank="none", split="all")["rerank"] == "none"
    assert ris.score(db, preset="accurate", split="all")["rerank"] == "dba+qe"
    search = {"rerank": "none"}  # what ris.open_database passes
    assert presets.for_api("accurate", "search", {"rerank": "none"}, search)["rerank"] == "none"
    assert presets.for_api("accurate", "search", {"rerank": None}, search)["rerank"] == "dba+qe"
    assert presets.for_api(None, "search", {"rerank": None}, search)["rerank"] == "none"
    assert np.isfinite(ris.score(db, split="all")["raw"]["map"])


def test_a_preset_on_a_database_made_with_another_recipe_is_said_in_one_line(tmp_path, capsys):
    """``ris-search|ris-eval|ris-serve --preset accurate`` on a database made otherwise (a fast one)
    searched it as it was made with accurate's re-ranking, and said nothing: the user believed the
    preset's recipe was used. A database made by the preset gets no line."""
    from ris.cli.common import run
    from ris.cli.eval import main as eval_main
    from ris.testing import clustered_vectors, make_feature_db

    fast, accurate = _extracted_by("fast").to_attrs(), _extracted_by("accurate").to_attrs()
    assert presets.other_recipe("accurate", accurate) is None and presets.other_recipe("fast", fast) is None
    line = presets.other_recipe("accurate", fast)
    assert "--model mobilenet_v2+hsv_hist here, mobilenet_v2+efficientnet_lite2+hsv_hist for --preset accurate" in line
    assert "--flip off here, on for --preset accurate" in line
    assert presets.other_recipe("fast", {**fast, "aspect": "keep"}) == "--aspect keep here, squash for --preset fast"

    db = make_feature_db(tmp_path / "f.h5", clustered_vectors(40, 8, seed=1), labels=[f"o{i // 4}" for i in range(40)])
    capsys.readouterr()
    assert run("ris-eval", eval_main, ["--features-db", str(db), "--preset", "fast", "--split", "all"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ris-eval: warning: {db}: not made with --preset fast's recipe (--model "
                                               "synthetic here, mobilenet_v2+hsv_hist for --preset fast"), err
    assert err[0].endswith("searched as it was made (here the preset chooses only the re-ranking)"), err


def test_the_other_recipe_warning_writes_options_as_they_are_typed():
    """The warning wrote a preset's recipe as the database records it, '--resize 224+224',
    '--pool gap+gem+hist', which --help does not say (fast = resize 224, pool gap; accurate =
    pool gap+gem+gap). Each side is written now as a user types it: --help's values for the preset."""
    fast, accurate = _extracted_by("fast").to_attrs(), _extracted_by("accurate").to_attrs()
    line = presets.other_recipe("accurate", fast)
    assert "--resize 224 here, 224+384+224 for --preset accurate" in line, line
    assert "--pool gap here, gap+gem+gap for --preset accurate" in line, line
    line = presets.other_recipe("fast", accurate)
    assert "--resize 224+384+224 here, 224 for --preset fast" in line, line
    assert "--pool gap+gem+gap here, gap for --preset fast" in line, line
    assert "+hist " not in line, line
    import argparse

    p = argparse.ArgumentParser()
    presets.add_argument(p, "extract")
    said = next(a.help for a in p._actions if a.dest == "preset")
    assert "resize 224, pool gap" in said and "resize 224+384+224, pool gap+gem+gap" in said, said
