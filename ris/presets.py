"""Named settings: ``--preset fast`` (the quick default path) and ``--preset accurate`` (the best
combination measured in bench/quality.md, slower). A preset fills only the options left at their
defaults: an option given on the command line always wins.

Measured in bench/quality.md (2-core CPU, 1,000 images): fast = MobileNetV2 GAP 224, about 46 img/s
extraction, 5,120 bytes per image, ~8 ms per query. accurate = the same features re-ranked with
dba+qe (its augmented database, another 5,120 bytes per image, is cached beside the database on first
use; ~4 ms per query): UKBench held-out N-S 3.920 -> 3.995, Corel mAP 0.885 -> 0.944. Geometric
verification (--verify) is not in it: on top of dba+qe it did not gain on held-out objects (3.990).
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
        "extract": {"model": "mobilenet_v2", "resize": 224, "pool": "gap"},
        "search": {"rerank": "dba+qe", "verify": 0},
        "eval": {"rerank": "dba+qe", "verify": 0},
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
