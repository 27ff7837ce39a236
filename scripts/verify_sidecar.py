"""Build (or reuse) the local-feature sidecar of a database and print its cost: seconds, bytes per image."""
import sys
import time

from ris.featuredb import FeatureDB
from ris.verify import database_local_features

db_path = sys.argv[1]
features = int(sys.argv[2]) if len(sys.argv) > 2 else 500
side = int(sys.argv[3]) if len(sys.argv) > 3 else 512
t0 = time.perf_counter()
with FeatureDB(db_path) as db:
    lf = database_local_features(db, db_path, features, side, log=print)
dt = time.perf_counter() - t0
n = len(lf.offsets) - 1
print(f"{db_path}: {n} images, {dt:.1f} s ({n / dt:.1f} img/s), {lf.bytes_per_image():.0f} bytes/image, "
      f"{(lf.offsets[1:] - lf.offsets[:-1]).mean():.0f} keypoints/image")
