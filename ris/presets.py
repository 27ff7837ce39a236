"""Named settings: ``--preset fast`` (the quick default path) and ``--preset accurate`` (the best
combination measured in bench/quality.md, slower). A preset fills only the options left at their
defaults: an option given on the command line always wins.

Costs (bench/quality.md, 2-core CPU): fast = MobileNetV2 GAP 224, about 46 img/s extraction, 5 KiB
per image, under 1 ms per query at 1,000 images; accurate adds local features (about 68 KiB per image,
built once beside the database) and geometric verification of the top 30 (see the report for ms/query).
"""
from __future__ import annotations

import argparse

PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "fast": {
        "extract": {"model": "mobilenet_v2", "resize": 224, "pool": "gap"},
        "search": {"rerank": "none", "verify": 0},
        "eval": {"rerank": "none", "verify": 0},
    },
    "accurate": {
        "extract": {"model": "mobilenet_v2", "resize": 224, "pool": "gap", "local_features": True},
        "search": {"rerank": "dba+qe", "verify": 30},
        "eval": {"rerank": "dba+qe", "verify": 30},
    },
}


def add_argument(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named settings, filling only options left at their defaults: "
                        + "; ".join(f"{name} = " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in s[command].items())
                                    for name, s in PRESETS.items()))


def apply(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> argparse.Namespace:
    """Fill the preset's values into ``args`` where the user left the default."""
    if not getattr(args, "preset", None):
        return args
    for key, value in PRESETS[args.preset][command].items():
        if getattr(args, key, None) == parser.get_default(key):
            setattr(args, key, value)
    return args
