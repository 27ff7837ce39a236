"""A refused recipe in command-line terms: which options differ between two feature fingerprints
(``ris.featuredb.fingerprint``), in one line a user can act on."""
from __future__ import annotations

import json
import re
from typing import Any

from ris.errors import DatabaseError

_FLAGS = {"model": "--model", "weights": "--weights", "layer": "--layer", "input_size": "--resize",
          "scales": "--scales", "pooling": "--pool", "fusion": "--fusion-weights", "flip": "--flip",
          "aspect": "--aspect",
          "feature_shape": "features"}
# the same settings as ``ris.build_database``'s arguments, for a Python caller (who cannot pass flags)
_API_ARGS = {"model": "model", "weights": "weights", "layer": "layer", "input_size": "input_size",
             "scales": "scales", "pooling": "pooling", "fusion": "fusion_weights", "flip": "flip", "aspect": "aspect"}


_FLAG_ARGS = {_FLAGS[key]: arg for key, arg in _API_ARGS.items()}


# ris-search's and ris-eval's flags as ``ris.open_database``'s and ``ris.score``'s arguments
# (--labels: ``ris.build_database``'s)
QUERY_ARGS = {"--split": "split", "--gallery": "gallery", "--queries": "queries", "--rerank": "rerank",
              "--rotations": "rotations=True", "--verify": "verify", "--seed": "seed", "--model": "model",
              "--labels": "labels", "--index": "index", "--dataset-root": "dataset_root",
              "--test-fraction": "test_fraction", "--val-fraction": "val_fraction"}


def in_api_words(message: str, flags: dict[str, str] | None = None) -> str:
    """A recipe message with ris-extract's flags written as ``ris.build_database``'s arguments
    ("--resize: 'abc' is not a size" -> "input_size: 'abc' is not a size"), or with ``flags``
    (``QUERY_ARGS``) those flags as that call's arguments: a Python caller never wrote the flags.
    Other flags are left as they are."""
    names = _FLAG_ARGS if flags is None else flags
    return re.sub(r"--[a-z][a-z-]*", lambda found: names.get(found.group(0), found.group(0)), message)


def describe_difference(old: dict[str, Any], new: dict[str, Any], here: str = "here", asked: str = "asked",
                        old_text: dict[str, str] | None = None, new_text: dict[str, str] | None = None,
                        api: bool = False) -> str:
    """Two fingerprints' differences as the command line spells them, in one line: '--model a
    here, b asked; --resize 224+384 here, 224+384+224 asked'. Why: the stored values (JSON recipes,
    per-part lists) are unreadable in an error message. Settings that follow from a different
    --model (its weights' source, its default layer, the feature size) are left out then.
    ``old_text``/``new_text``: how to write a key's value instead (a preset's, as --help says it).
    ``api``: as ``ris.build_database``'s arguments are written instead ("model='a' here, 'b' asked;
    input_size=224 here, '224+384' asked; flip=False here, True asked")."""
    def show(key: str, value: Any) -> str:
        if key == "flip":  # heads saved before numpy booleans were made plain hold it as 'True'
            return "on" if value in (True, "True") else "off"
        if key == "aspect":
            return str(value or "squash")
        if key == "fusion":
            try:
                value = json.loads(value)["weights"]
            except (TypeError, ValueError, KeyError):
                return "none" if value in (None, "none") else "?"
        if isinstance(value, list):
            return "+".join(",".join(f"{x:g}" for x in v) if isinstance(v, list) else
                            (f"{v:g}" if isinstance(v, float) else str(v)) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    def differs(key: str) -> bool:  # flip/aspect: absent is off (compared as shown)
        if key in ("flip", "aspect"):
            return show(key, old.get(key)) != show(key, new.get(key))
        return old.get(key) != new.get(key)

    keys = [k for k in _FLAGS if differs(k)]
    if "model" in keys:  # a part more or less changes these lists' lengths: shown only if not all 1
        def flat(v: Any) -> list:
            return [y for x in v for y in flat(x)] if isinstance(v, (list, tuple)) else [v]

        single = all(x in (1, 1.0, None, "none") for v in (old.get("scales"), new.get("scales")) for x in flat(v))
        keys = [k for k in keys if k not in ("weights", "layer", "feature_shape") and not (k == "scales" and single)]
    elif len(keys) > 1:
        keys = [k for k in keys if k != "feature_shape"]
    same_weights = "fusion" in keys and show("fusion", old.get("fusion")) == show("fusion", new.get("fusion"))
    if same_weights:  # the parts' own recipes differ, not the weights: said by the other keys, or plainly
        keys = [k for k in keys if k != "fusion"]
        if not keys:
            return "the fused parts' own settings differ"
    def shown(key: str, fp: dict, text: dict[str, str] | None) -> str:
        return (text or {}).get(key) or show(key, fp.get(key))

    # '--resize 224 here, 224 asked' (one value for every part against per-part ones) says nothing
    keys = [k for k in keys if shown(k, old, old_text) != shown(k, new, new_text)] or keys

    def one(key: str) -> str:
        was, now = shown(key, old, old_text), shown(key, new, new_text)
        if api and key in _API_ARGS:
            return f"{_API_ARGS[key]}={_as_argument(key, was)} {here}, {_as_argument(key, now)} {asked}"
        return f"{_FLAGS[key]} {was} {here}, {now} {asked}"

    return "; ".join(one(k) for k in keys)


def _as_argument(key: str, text: str) -> str:
    """A value as shown on the command line ('on', 'none', '224', '224+384') as a Python caller
    passes it (True, None, 224, '224+384')."""
    if key == "flip":
        return str(text == "on")
    if key in ("layer", "input_size", "fusion") and text in ("none", "None"):
        return "None"
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text


class RecipeRefused(DatabaseError):
    """The one-line refusal to add features made with recipe ``new`` to those made with ``old``,
    in ris-extract's flags, or with ``api`` in ``ris.build_database``'s arguments (which catches
    it and raises it again so: the refusal is made deep in the extraction, the same for both)."""

    def __init__(self, where: Any, old: dict, new: dict, api: bool = False):
        self.where, self.old, self.new = where, old, new
        if api:
            what = ("build_database with the database's own recipe and append=True adds new images; or pass "
                    "another features_db path, or overwrite=True to replace it")
        else:
            what = ("ris-extract --sync adds new images with the database's own recipe; or use a new "
                    "--features-db, or --overwrite to replace it")
        super().__init__(f"{where}: existing features were made differently "
                         f"({describe_difference(old, new, api=api)}); {what}")


class HeadRefused(RecipeRefused):
    """A head trained on features made with recipe ``old`` refused on a database made with ``new``
    (``ris.modelio.check_compatible``), in ris-extract's flags or, with ``api``, in
    ``ris.build_database``'s arguments: the facade raises it again so, as it does ``RecipeRefused``."""

    def __init__(self, where: Any, old: dict, new: dict, api: bool = False):
        self.where, self.old, self.new = where, old, new
        pretty = describe_difference(old, new, "for the model", "in the database", api=api)
        DatabaseError.__init__(self, f"{where}: features were made differently from the model's training "
                                     f"features ({pretty})")


def recipe_refusal(where, old: dict, new: dict) -> RecipeRefused:
    """The one-line refusal to add features made with recipe ``new`` to those made with ``old``."""
    return RecipeRefused(where, old, new)


_OPTION_KEYS = {"weights": "weights_arg", "layer": "layer", "resize": "input_size", "scales": "scales",
                "pool": "pooling", "fusion_weights": "fusion", "flip": "flip", "aspect": "aspect", "dtype": "dtype"}


def sync_recipe_difference(features_db, config, given: set[str]) -> str | None:
    """How the recipe options ``given`` on a command line (``config`` is the recipe they describe)
    differ from the recipe stored in ``features_db``, in command-line terms: "" when they name the
    database's own, None when the database cannot be read (the sync then says why). With --model or
    --preset the whole recipe is compared (their defaults are part of what they ask); otherwise only
    the settings given. The layer the network resolves is compared only when --layer is given."""
    import h5py

    from ris.extractor import ExtractConfig
    from ris.featuredb import fingerprint

    try:
        with h5py.File(features_db, "r") as f:
            attrs = dict(f.attrs)
        stored = ExtractConfig.from_attrs(attrs).to_attrs()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    asked = config.to_attrs()
    whole = bool({"model", "preset"} & given)
    keys = None if whole else {_OPTION_KEYS[k] for k in given if k in _OPTION_KEYS}

    def comparable(recipe: dict) -> dict:
        out = {k: v for k, v in recipe.items() if k not in ("recipe_version", "scale_sizes")}
        if "fusion" in out:
            fusion = json.loads(out["fusion"])
            fusion["parts"] = [comparable(part) for part in fusion["parts"]]
            out["fusion"] = fusion if whole else fusion["weights"]
        if "layer" not in given:
            out.pop("layer", None)
        return out if keys is None else {k: out.get(k) for k in keys}

    if comparable(stored) == comparable(asked):
        return ""
    old = fingerprint(attrs)
    old["weights"] = stored.get("weights_arg")  # as typed (the stored 'weights' is a description)
    new = fingerprint(asked)
    if stored.get("weights_arg") == asked.get("weights_arg"):
        new["weights"] = old.get("weights")
    else:
        new["weights"] = asked.get("weights_arg")
    for k in _FLAGS:  # what was not given, or is resolved by the network, is not part of the difference
        if (k == "layer" and "layer" not in given) or k == "feature_shape" or (keys is not None and k not in keys and
                                                                             not (k == "weights" and "weights_arg" in keys)):
            new[k] = old.get(k)
    return describe_difference(old, new, "in the database", "asked") or None
