"""ris: reverse image search. The flat facade for users who import rather than run commands.

    import ris

    ris.build_database("photos/", "feats.h5", model="mobilenet_v2")   # what ris-extract does
    with ris.open_database("feats.h5") as engine:                      # load once, query often
        for hit in engine.query("query.jpg", k=5):
            print(hit.rank, round(hit.distance, 3), hit.image_id)
    scores = ris.score("feats.h5", split="all")                     # what ris-eval does
    print(scores["raw"]["ns_score"], scores["raw"]["map"])

Every function here is a thin call into the module that owns the work (``ris.extract``,
``ris.search``, ``ris.evaluate``, ``ris.train``), so the commands and the facade cannot drift
apart. Importing ``ris`` loads nothing heavy: Keras and TensorFlow are imported only by the
calls that run a network.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ris.extract import ExtractSummary
    from ris.query_input import QueryImage
    from ris.search import Hit, SearchEngine
    from ris.train import TrainResult

__all__ = [
    "build_database", "open_database", "query", "score", "fit_head",
    # the classes behind them, for users who want every option
    "ExtractConfig", "ExtractOptions", "SearchEngine", "FeatureDB", "TrainConfig", "RisError",
]

_LAZY = {  # name -> module that owns it; imported on first use (fast `import ris`)
    "ExtractConfig": "ris.extractor",
    "ExtractOptions": "ris.extract",
    "SearchEngine": "ris.search",
    "FeatureDB": "ris.featuredb",
    "TrainConfig": "ris.train",
    "RisError": "ris.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ris' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy classes too, so tab completion offers them before their first use."""
    return sorted(set(globals()) | set(_LAZY))


def build_database(folder: str | Path, features_db: str | Path, model: str | None = None, *,
                   weights: str | Path = "imagenet", pooling: str | None = None, input_size: int | str | None = None,
                   scales: tuple[float, ...] | str = (1.0,), layer: str | None = None, dtype: str = "float32",
                   fusion_weights: str | None = None, preset: str | None = None, flip: bool | None = None,
                   aspect: str | None = None, **options: Any) -> "ExtractSummary":
    """Describe every image under ``folder`` into the HDF5 database ``features_db`` (resumable,
    atomic, locked; see ``ris-extract --help``). A fused recipe joins backbones with '+'
    (``model="mobilenet_v2+efficientnet_lite2", input_size="224+384", pooling="gap+gem"``;
    ``ris.fusion``). ``preset`` ('fast', 'accurate'; ``ris.presets``) fills the recipe arguments
    not given (None: model 'vgg16', pooling 'gap', flip False, aspect 'squash' without a preset);
    ``flip``, ``aspect``: as ``ris-extract --flip``, ``--aspect``. ``options`` are ``ExtractOptions`` fields:
    labels, batch_size, workers, append, overwrite, progress, verbose, ..."""
    from ris.extract import ExtractOptions, extract_features
    from ris.featuredb import TargetExists
    from ris.fusion import make_config
    from ris.presets import for_api
    from ris.errors import RisError, yes_no
    from ris.recipe_diff import RecipeRefused, in_api_words

    recipe = for_api(preset, "extract", {"model": model, "resize": input_size, "pool": pooling,
                                         "fusion_weights": fusion_weights, "flip": flip, "aspect": aspect},
                     {"model": "vgg16", "resize": None, "pool": "gap", "fusion_weights": None, "flip": False,
                      "aspect": "squash"})
    model, input_size, pooling, fusion_weights, flip, aspect = (
        recipe[k] for k in ("model", "resize", "pool", "fusion_weights", "flip", "aspect"))
    flip = yes_no("flip", flip)  # flip='no' was true
    weights = str(weights) if isinstance(weights, Path) else weights  # a Path failed the HDF5 attribute write

    try:
        config = make_config(model, weights=weights, layer=layer, input_size=input_size,
                             scales=scales, pooling=pooling, dtype=dtype, fusion_weights=fusion_weights, flip=flip,
                             aspect=aspect)
    except RisError as exc:  # in this API's words, not ris-extract's flags
        exc.args = (in_api_words(str(exc)),)
        raise
    try:
        return extract_features(folder, features_db, config, ExtractOptions(**options))
    except TargetExists as exc:  # in this API's words, not ris-extract's flags
        raise TargetExists(exc.path, f"{exc.path}: already exists; pass append=True to add new images or "
                                     "overwrite=True to replace it") from None
    except RecipeRefused as exc:
        raise RecipeRefused(exc.where, exc.old, exc.new, api=True) from None
    except RisError as exc:  # the extractor's own refusals ('--pool none ... several --scales') too
        exc.args = (in_api_words(str(exc)),)
        raise


def open_database(features_db: str | Path, model: str | Path | None = None, *, index: str = "auto",
                  rerank: str | None = None, dataset_root: str | Path | None = None,
                  rotations: bool = False, preset: str | None = None) -> "SearchEngine":
    """A ``SearchEngine`` over ``features_db`` (and a trained head ``model``): it holds the
    backbone, head and vectors for repeated queries. Use it in a ``with`` block, or ``close()`` it.
    ``rotations``: queries are also described turned by 90/180/270 degrees (4 forward passes).
    ``preset``: its re-ranking where ``rerank`` is not given."""
    from ris.presets import for_api
    from ris.search import SearchEngine

    from ris.errors import RisError
    from ris.recipe_diff import QUERY_ARGS, RecipeRefused, in_api_words

    rerank = for_api(preset, "search", {"rerank": rerank}, {"rerank": "none"})["rerank"]
    _warn_other_recipe(preset, features_db)

    try:
        return SearchEngine(features_db, model, index=index, dataset_root=dataset_root, rerank=rerank,
                            rotations=rotations)
    except RecipeRefused as exc:  # a head made for other features: in this API's words, not ris-extract's flags
        raise type(exc)(exc.where, exc.old, exc.new, api=True) from None
    except RisError as exc:  # 'rotations=True does not work with rerank diffusion', not ris-search's flags
        exc.args = (in_api_words(str(exc), QUERY_ARGS),)
        raise


def _warn_other_recipe(preset: str | None, features_db: str | Path) -> None:
    """A ``UserWarning`` (the commands' warning line) when a preset meets a database made otherwise:
    the preset then chooses only the re-ranking."""
    import sys
    import warnings

    from ris.presets import other_recipe_warning

    message = other_recipe_warning(preset, features_db, named=f"the recipe of preset={preset!r}", api=True)
    if message:  # reported at the caller's line, however many facade calls lie between (ris.query)
        frame, level = sys._getframe(1), 2
        while frame.f_back is not None and frame.f_code.co_filename == __file__:
            frame, level = frame.f_back, level + 1
        warnings.warn(message, UserWarning, stacklevel=level)


def query(features_db: str | Path, image: "QueryImage", k: int = 12, model: str | Path | None = None,
          **engine_options: Any) -> list["Hit"]:
    """One query, start to finish (loads the engine each call: use ``open_database`` for many).
    ``image``: whatever ``SearchEngine.query`` takes: a file name, the file's bytes, a binary file
    object, a PIL Image or an RGB uint8 array; ``engine_options``: ``open_database``'s."""
    with open_database(features_db, model, **engine_options) as engine:
        return engine.query(image, k)


def score(features_db: str | Path, model: str | Path | None = None, preset: str | None = None,
          **options: Any) -> dict[str, Any]:
    """N-S, top-4, mAP, recall@k, precision@k of a labelled database, off the shelf and through
    ``model``; ``options`` as ``ris.evaluate.evaluate_db`` (split, rerank, seed, ...); ``preset``:
    its re-ranking where ``rerank`` is not given."""
    from ris.errors import RisError
    from ris.evaluate import evaluate_db
    from ris.presets import for_api
    from ris.recipe_diff import QUERY_ARGS, RecipeRefused, in_api_words

    options["rerank"] = for_api(preset, "eval", {"rerank": options.get("rerank")}, {"rerank": "none"})["rerank"]
    _warn_other_recipe(preset, features_db)

    try:
        return evaluate_db(features_db, model, **options)
    except RecipeRefused as exc:  # as open_database
        raise type(exc)(exc.where, exc.old, exc.new, api=True) from None
    except RisError as exc:  # in this API's words, not ris-eval's flags ('split must be test or all')
        exc.args = (in_api_words(str(exc), QUERY_ARGS),)
        raise


def fit_head(features_db: str | Path, output: str | Path, progress: bool = False, **config: Any) -> "TrainResult":
    """Fit an embedding head on ``features_db`` (default: learned whitening) and save it to
    ``output``; ``config`` are ``TrainConfig`` fields (arch, mining, epochs, seed, ...). Ctrl-C during
    a triplet head's epochs saves the best complete one and returns: ``interrupted_by`` says so."""
    from dataclasses import fields

    from ris.errors import RisError, yes_no
    from ris.recipe_diff import in_api_words, QUERY_ARGS
    from ris.train import TrainConfig, train_head

    try:
        return train_head(features_db, output, TrainConfig(**config), progress=yes_no("progress", progress))
    except RisError as exc:  # in this API's words, not ris-train's flags ('split_by must be ...')
        named = {f"--{f.name.replace('_', '-')}": f.name for f in fields(TrainConfig)}
        exc.args = (in_api_words(str(exc), {**QUERY_ARGS, **named, "--output": "output", "--lr": "learning_rate"}),)
        raise
