"""A seeded Corel-1k query list for ``ris-eval --queries``: 20 images of each class (files
c*100 .. c*100+99), so that verification's cost stays bounded on a 2-core machine.

    python scripts/corel_queries.py > corel_queries.txt
"""
import argparse

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """No options: the parser is there so that --help explains the script instead of printing the list."""
    return argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    parse_args(argv)
    rng = np.random.default_rng(0)
    print("\n".join(f"{c * 100 + j}.jpg" for c in range(10) for j in sorted(rng.choice(100, 20, replace=False))))


if __name__ == "__main__":
    main()
