"""Named settings: ``--preset fast`` (the quick default path) and ``--preset accurate`` (the best
combination measured in bench/quality.md, slower). A preset fills only the options left at their
defaults: an option given on the command line always wins.

Measured in bench/quality.md (2-core CPU, 1,000 images). fast (since 2026-12-02) = MobileNetV2
GAP 224 with an HSV colour histogram (ris/colour.py) at weight 0.35, no re-ranking: the weight is
the largest of the training grid whose relit training copies (gamma, exposure, white balance) lost
nothing; then, once: UKBench held-out N-S 3.920 -> 3.965, held-out hard copies mAP 0.914 -> 0.956,
relit held-out copies level, Corel mAP 0.885 -> 0.895; extraction as fast as MobileNetV2 alone,
9,120 bytes per image (5,120 before). accurate (since 2026-12-02) = the fusion of MobileNetV2 GAP
224, EfficientNet-Lite2 GeM 384 and the colour histogram, weights 1, 0.5 and 0.5, re-ranked with
dba+qe (its augmented database, as large again, is cached beside the database on first use):
~33 img/s, 14,240 bytes per image, ~64 ms per query from a file. Chosen on UKBench training
objects, full-size and synthetic hard copies (crops, downscales, turns, JPEG 30-50); then, once:
held-out N-S 3.995 -> 4.000 (off the shelf 3.955 -> 3.980), held-out hard copies mAP 0.954 ->
0.988, Corel mAP level (0.953 -> 0.955). Since the third 2026-12-02 round it also describes every
image mirrored (--flip, each CNN part; the rule fixed first: adopt if the 800 training queries gain
off the shelf and do not lose with dba+qe: +0.0005, level); then, once: Corel with dba+qe 0.955 ->
0.960 (+0.0048, 95% +0.0013 .. +0.0105), held-out hard copies with dba+qe 0.988 -> 0.991, held-out
full-size level (saturated); it costs twice the CNN time: extraction 43 -> 21 img/s, a query from
a file ~50 -> ~90 ms (back to back). Geometric verification (--verify) is in neither: on top of
dba+qe it did not gain on held-out objects. fast leaves --flip off: it gains there too (held-out
+0.0024, Corel +0.0041 off the shelf) but halves fast's speed. Neither takes --aspect keep (fourth
round; rule fixed first: the training hard copies must gain in the preset's own search; they lost
with accurate's dba+qe, -0.0043, and were level with fast); it gains on Corel off the shelf only.
"""
from __future__ import annotations

from pathlib import Path

import argparse

PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "fast": {
        "extract": {"model": "mobilenet_v2+hsv_hist", "resize": 224, "pool": "gap", "fusion_weights": "1+0.35"},
        "search": {"rerank": "none", "verify": 0},
        "eval": {"rerank": "none", "verify": 0},
    },
    "accurate": {
        "extract": {"model": "mobilenet_v2+efficientnet_lite2+hsv_hist", "resize": "224+384+224",
                    "pool": "gap+gem+gap", "fusion_weights": "1+0.5+0.5", "flip": True},
        "search": {"rerank": "dba+qe", "verify": 0},
        "eval": {"rerank": "dba+qe", "verify": 0},
    },
}


def add_argument(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named settings, filling only options left at their defaults: "
                        + "; ".join(f"{name} = " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in s[command].items())
                                    for name, s in PRESETS.items()))


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options ``argv`` sets, whatever their value: ``--rerank none`` is given even though
    'none' is its default (comparing with the default cannot tell the two apart)."""
    import copy

    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    for group in probe._mutually_exclusive_groups:
        group.required = False
    return set(vars(probe.parse_known_args(argv)[0]))


def apply(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str,
          argv: list[str] | None = None) -> argparse.Namespace:
    """Fill the preset's values into ``args`` where the user gave no value: options not in
    ``argv`` (the command line; without it, options still at their default).

    A fused preset's per-part values (``pool gap+gem``, ``fusion-weights``) belong to its own
    ``--model``: with another ``--model`` given on the command line they are not filled in.
    """
    if not getattr(args, "preset", None):
        return args
    given = given_on_command_line(parser, argv) if argv is not None else None

    def left_out(key: str) -> bool:
        return key not in given if given is not None else getattr(args, key, None) == parser.get_default(key)

    for key, value in _fills(args.preset, command, getattr(args, "model", None), left_out).items():
        setattr(args, key, value)
    return args


def _fills(preset: str, command: str, model: str | None, left_out) -> dict[str, object]:
    """The preset's values for the options ``left_out(key)`` says were not given; a fused preset's
    per-part values stay with its own model (left out when another ``model`` was given)."""
    values = PRESETS[preset][command]
    other_model = "model" in values and not left_out("model") and model != values["model"]
    return {k: v for k, v in values.items()
            if left_out(k) and not (other_model and (k == "fusion_weights" or (isinstance(v, str) and "+" in v)))}


def for_api(preset: str | None, command: str, given: dict, defaults: dict) -> dict:
    """The Python facade's arguments with a preset filled in, by the rule of ``apply``: only
    arguments not given (None in ``given``); then ``defaults`` for those the preset leaves.
    ``given``/``defaults`` use the command-line names (model, resize, pool, fusion_weights,
    rerank); an unknown preset is a ``RisError``."""
    passed = {k for k, v in given.items() if v is not None}
    given = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    if not preset:
        return dict(given)
    if preset not in PRESETS:
        from ris.errors import RisError

        raise RisError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")

    fills = _fills(preset, command, given.get("model"), lambda key: key not in passed)
    return {k: fills.get(k, v) for k, v in given.items()}


def other_recipe(preset: str, attrs: dict, api: bool = False) -> str | None:
    """How a database's recipe (its ``attrs``) differs from what ``ris-extract --preset`` makes, in
    command-line terms (``api``: in ``ris.build_database``'s arguments); None when it was made so.
    Why: ``--preset`` on ris-search, ris-eval and ris-serve chooses only the re-ranking, so a
    database made otherwise is searched as it was made, and the user should not believe the
    preset's recipe was used."""
    import json

    from ris.featuredb import fingerprint
    from ris.fusion import make_config
    from ris.recipe_diff import describe_difference

    v = PRESETS[preset]["extract"]
    made = make_config(str(v["model"]), input_size=v.get("resize"), pooling=str(v.get("pool", "gap")),
                       fusion_weights=v.get("fusion_weights"), flip=bool(v.get("flip", False))).to_attrs()

    def recipe(a: dict) -> dict:  # the settings a preset sets, and the fused parts' weights only
        fp = fingerprint(a)
        out = {k: fp.get(k) for k in ("model", "input_size", "scales", "pooling", "flip", "aspect")}
        try:
            out["fusion"] = json.dumps({"weights": json.loads(fp["fusion"])["weights"]}) if fp.get("fusion") else None
        except (TypeError, ValueError, KeyError):
            out["fusion"] = fp.get("fusion")
        return out

    asked = f"for preset={preset!r}" if api else f"for --preset {preset}"
    return describe_difference(recipe(attrs), recipe(made), "here", asked, _as_typed(recipe(attrs)),
                               _as_help_says(v), api=api) or None


def _as_help_says(values: dict) -> dict[str, str]:
    """A preset's recipe as ``--help`` and ``PRESETS`` write it ('--resize 224', '--pool gap+gem+gap'),
    not as the database records it ('224+224', 'gap+gem+hist'): options a user can type."""
    keys = {"model": "model", "resize": "input_size", "pool": "pooling", "fusion_weights": "fusion"}
    text = {keys[k]: str(v) for k, v in values.items() if k in keys}
    text["flip"] = "on" if values.get("flip") else "off"
    return text


def _as_typed(recipe: dict) -> dict[str, str]:
    """A database's per-part size and pooling written once when one value gives them all, as a user
    types it ('--resize 224' for [224, 224]; '--pool gap' for 'gap+hist', '--pool gap+gem+gap' for
    'gap+gem+hist': a colour part records 'hist', and is given gap, as --help says)."""
    from ris.colour import POOLING_NAME

    text = {}
    for key, value in (("input_size", recipe.get("input_size")), ("pooling", recipe.get("pooling"))):
        parts = [str(x) for x in value] if isinstance(value, list) else str(value).split("+")
        if len(parts) > 1:
            parts = ["gap" if key == "pooling" and x == POOLING_NAME else x for x in parts]
            text[key] = parts[0] if len(set(parts)) == 1 else "+".join(parts)
    return text


def other_recipe_warning(preset: str | None, features_db: str | Path, named: str | None = None,
                         api: bool = False) -> str | None:
    """The warning owed when ``features_db`` was not made with ``preset``'s recipe, else None;
    ``named``: how the preset was chosen (default "--preset NAME's recipe"); ``api``: the recipe's
    difference in the Python API's arguments, not the commands' flags."""
    import h5py

    if not preset:
        return None
    try:
        with h5py.File(features_db, "r") as f:
            attrs = dict(f.attrs)
    except (OSError, ValueError):
        return None  # the command's own opening says why
    if attrs.get("model") is None:
        return None
    diff = other_recipe(preset, attrs, api)
    if not diff:
        return None
    return (f"{features_db}: not made with {named or f'--preset {preset}' + chr(39) + 's recipe'} ({diff}); searched as it was made (here the "
            "preset chooses only the re-ranking)")


def warn_other_recipe(prog: str, preset: str | None, features_db: str) -> None:
    """One warning line on stderr when ``features_db`` was not made with ``preset``'s recipe."""
    import sys

    message = other_recipe_warning(preset, features_db)
    if message:
        print(f"{prog}: warning: {message}", file=sys.stderr)


