"""Build (or reuse) the local-feature sidecar of a database and print its cost: seconds, bytes per image.

    python scripts/verify_sidecar.py DB [FEATURES [SIDE]]
"""
import argparse
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db", metavar="DB", help="feature database (.h5); the sidecar is written beside it, or reused")
    p.add_argument("features", type=int, nargs="?", default=500, metavar="FEATURES",
                   help="SIFT keypoints kept per image (default: %(default)s)")
    p.add_argument("side", type=int, nargs="?", default=512, metavar="SIDE",
                   help="pixels of the longest image side, scaled to before SIFT (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so --help needs none of them
    from ris.featuredb import FeatureDB
    from ris.verify import database_local_features

    db_path, features, side = args.db, args.features, args.side
    t0 = time.perf_counter()
    with FeatureDB(db_path) as db:
        lf = database_local_features(db, db_path, features, side, log=print)
    dt = time.perf_counter() - t0
    n = len(lf.offsets) - 1
    print(f"{db_path}: {n} images, {dt:.1f} s ({n / dt:.1f} img/s), {lf.bytes_per_image():.0f} bytes/image, "
          f"{(lf.offsets[1:] - lf.offsets[:-1]).mean():.0f} keypoints/image")


if __name__ == "__main__":
    main()
