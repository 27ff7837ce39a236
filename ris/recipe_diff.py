"""A refused recipe in command-line terms: which options differ between two feature fingerprints
(``ris.featuredb.fingerprint``), in one line a user can act on."""
from __future__ import annotations

import json
from typing import Any

from ris.errors import DatabaseError

_FLAGS = {"model": "--model", "weights": "--weights", "layer": "--layer", "input_size": "--resize",
          "scales": "--scales", "pooling": "--pool", "fusion": "--fusion-weights", "flip": "--flip",
          "aspect": "--aspect",
          "feature_shape": "features"}


def describe_difference(old: dict[str, Any], new: dict[str, Any], here: str = "here", asked: str = "asked") -> str:
    """Two fingerprints' differences as the command line spells them, in one line: '--model a
    here, b asked; --resize 224+384 here, 224+384+224 asked'. Why: the stored values (JSON recipes,
    per-part lists) are unreadable in an error message. Settings that follow from a different
    --model (its weights' source, its default layer, the feature size) are left out then."""
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
    return "; ".join(f"{_FLAGS[k]} {show(k, old.get(k))} {here}, {show(k, new.get(k))} {asked}" for k in keys)


def recipe_refusal(where, old: dict, new: dict) -> DatabaseError:
    """The one-line refusal to add features made with recipe ``new`` to those made with ``old``."""
    return DatabaseError(f"{where}: existing features were made differently ({describe_difference(old, new)}); "
                         "ris-extract --sync adds new images with the database's own recipe; or use a new "
                         "--features-db, or --overwrite to replace it")
