"""ris.presets: --preset fills only the options left at their defaults, on every command that has it."""
import pytest

from ris import presets


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
        assert args.model == "efficientnet_lite0" and args.pool == "gap"
