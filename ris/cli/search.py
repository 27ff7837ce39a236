"""ris-search: find the images of a database most similar to any query image."""
from __future__ import annotations

import argparse
import os
import sys

from ris.cli.common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, HelpFormatter, one_line, positive_int, print_json, run


def build_parser() -> argparse.ArgumentParser:
    from ris.rerank import RERANKERS
    from ris.verify import SETTINGS_HELP as VERIFY_SETTINGS_HELP
    from ris.verify import parse_settings as verify_settings
    from ris.index import index_arg, index_help, index_metavar

    p = argparse.ArgumentParser(
        prog="ris-search",
        description="Rank a feature database by similarity to a query image (any image file, in the "
                    "database or not). The query's features are made exactly as the database's attributes "
                    "say; with --model they go through the trained head and are ranked by its distance. "
                    "Exit status: 0 = every query answered, 1 = some of several queries unreadable, or a montage "
                    "that could not be written (its results still given), "
                    "2 = error (no query answered, bad arguments, unusable database), 130 = interrupted.",
        formatter_class=HelpFormatter)
    p.add_argument("--image", required=True, nargs="+", help="query image file(s)")
    p.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    p.add_argument("--model", default=None, help="trained head (.keras from ris-train)")
    p.add_argument("-k", "--top-k", type=positive_int, default=12, help="number of results")
    p.add_argument("--output", default=None, help="montage picture (query first, then the results): .png, .jpg or .webp, encoded as named; with "
                   "several queries, a -N suffix is added")
    p.add_argument("--index", default="auto", type=index_arg, metavar=index_metavar(), help=index_help())
    p.add_argument("--rerank", default="none", choices=list(RERANKERS),
                   help="; ".join(f"{name} = {m.help}" for name, m in RERANKERS.items())
                        + ". Re-rankers hold the database in memory and report "
                        "re-ranking scores (smaller = better) instead of distances; dba+qe builds its augmented "
                        "database on the first run and caches it beside the vectors (rebuilt when they change)")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="geometric verification: re-rank the top K with RootSIFT + RANSAC inliers (local features "
                        "of the database's images built on first use and kept beside it); distances shown stay the "
                        "global ones; 0 = off")
    p.add_argument("--verify-settings", type=verify_settings, default={}, metavar="KEY=VALUE[,...]",
                   help=VERIFY_SETTINGS_HELP)
    p.add_argument("--rotations", action="store_true",
                   help="also describe each query turned by 90, 180 and 270 degrees; every database image keeps "
                        "its best distance over the four (phone photos that arrive turned). Costs 4 forward passes "
                        "per query; works with every --index, --verify and --rerank none, qe, dba+qe (diffusion and "
                        "kreciprocal are refused: their scores are normalised per query)")
    from ris import presets

    presets.add_argument(p, "search")
    p.add_argument("--dataset-root", default=None, help="where the database's images are now, if moved")
    p.add_argument("--show", action="store_true", help="open the montage in a window (needs a display; without one, one line says where the "
                        "montage was written); without --output it is written to results.png")
    p.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    from ris import presets

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = presets.apply(parser.parse_args(argv), parser, "search", argv)
    from ris.errors import BadImage
    from ris.jpeg_noise import naming
    from ris.montage import make_montage, write_png
    from ris.search import SearchEngine, hits_to_dicts

    montages = _montage_paths(args.image, args.output, args.show)  # refused before the slow set-up
    for path in filter(None, montages):
        _not_a_database_image(path, args.features_db, args.dataset_root)
    presets.warn_other_recipe("ris-search", args.preset, args.features_db)
    engine = SearchEngine(args.features_db, args.model, index=args.index, dataset_root=args.dataset_root,
                          rerank=args.rerank, rotations=args.rotations)
    verifier = None
    if args.verify > 0:
        from ris.verify import Verifier

        verifier = Verifier.for_database(engine.db, args.features_db, dataset_root=engine.root, k=args.verify,
                                         **args.verify_settings)
    out_json: list[dict] = []
    failed = failed_montages = 0
    display = _has_display()
    shown_nowhere: list[str] = []  # montages --show could not open (no display): named at the end
    gone: set[str] = set()  # result files not there (the folder moved): said once at the end
    # what each result's "distance" holds: re-ranking ranks by its own score (smaller = better), as ris-serve says
    score_kind = "distance" if engine.reranker is None else "re-ranking score (smaller = better)"
    for n, image in enumerate(args.image, 1):
        # the engine says the query's warnings, once; the montage's tiles and --verify's are named after it
        with naming(lambda line: print(line, file=sys.stderr), but=image):
            try:
                hits = engine.query(image, max(args.top_k, args.verify))
                if verifier is not None:
                    from ris.verify import verify_hits

                    hits = verify_hits(hits, image, verifier, engine.image_ids, args.top_k)
            except BadImage as exc:
                print(f"ris-search: error: {one_line(exc)}", file=sys.stderr)
                failed += 1
                out_json.append({"query": str(image), "error": str(exc)})  # in its place, as scripts expect
                continue
            montage_path = montage_error = None
            if montages[n - 1] is not None:
                rgb = make_montage(image, hits)
                try:
                    montage_path = str(write_png(montages[n - 1], rgb))
                except OSError as exc:  # a full disk: this query's results are still given, the run is done in part
                    montage_error = exc.strerror or str(exc)
                    print(f"ris-search: error: {one_line(montages[n - 1])}: cannot write the montage ({montage_error})",
                          file=sys.stderr)
                if args.show and display:
                    _show(rgb)
                elif args.show and montage_path:
                    shown_nowhere.append(montage_path)
            failed_montages += montage_error is not None
            gone.update(str(h.path) for h in hits if not os.path.lexists(h.path))
            if args.json:
                out_json.append({"query": str(image), "montage": montage_path, "score": score_kind,
                                 "results": hits_to_dicts(hits)}
                                | ({"montage_error": montage_error} if montage_error else {}))
                continue
            print(f"query: {one_line(image)}")
            print(f"{'rank':>4}  {'distance' if engine.reranker is None else 'score':>9}  path")
            for h in hits:
                print(f"{h.rank:>4}  {h.distance:>9.4f}  {one_line(h.path)}")
            if montage_path:
                print(f"montage: {one_line(montage_path)}")
    if args.json:
        print_json(out_json if len(args.image) > 1 else out_json[0])
    if gone:
        print(f"ris-search: warning: {len(gone)} result image file(s) are not there (e.g. {one_line(min(gone))}): "
              "if the dataset folder moved, give --dataset-root DIR (or ris-extract --sync --dataset DIR)",
              file=sys.stderr)
    if shown_nowhere:
        where = (f"the montage is in {shown_nowhere[0]}" if len(shown_nowhere) == 1
                 else f"the montages are in {', '.join(shown_nowhere)}")
        print(f"ris-search: --show: no display found (DISPLAY and WAYLAND_DISPLAY are unset); {one_line(where)}",
              file=sys.stderr)
    if failed == len(args.image):
        return EXIT_ERROR  # nothing done
    return EXIT_PARTIAL if failed or failed_montages else EXIT_OK


def _montage_paths(images: list[str], output: str | None, show: bool) -> list:
    """Where each query's montage goes (None: no montage); a path that exists must be a regular
    file, since the montage replaces it (a FIFO or a device is never replaced), and must not be a
    query image (the user's photo would be replaced by the montage, or searched as one); the
    default results.png (no --output) replaces only a montage ris-search wrote."""
    import os
    from pathlib import Path

    from ris.errors import RisError
    from ris.imagefile import file_kind

    if not (output or show):
        return [None] * len(images)
    out = Path(output or "results.png")
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{n}{out.suffix}")
                                            for n in range(1, len(images) + 1)]
    from ris.montage import is_ris_montage, picture_format_problem

    if output and picture_format_problem(output):
        raise RisError(picture_format_problem(output))
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        kind = file_kind(mode)
        if kind != "regular file":
            raise RisError(f"{path}: not a regular file ({kind}); give --output a file name")
        if any(_same_file(path, image) for image in images):
            raise RisError(f"{path}: is a query image; give --output another file name")
        if not output and not is_ris_montage(path):  # the default name: never someone's own picture
            raise RisError(f"{path}: exists and is not a montage ris-search wrote; give --output {path} "
                           "to replace it, or another file name")
    _can_write_in(out.parent)
    return paths


def _not_a_database_image(path, features_db: str, dataset_root: str | None) -> None:
    """Refuse a montage path that is an image of the database (the collection's photo would be
    replaced by the montage). Both sides resolved with realpath (links, '..'). A file under the
    dataset root: its name looked up in the name column, read in blocks (``RowNames``), never all
    held (one pass over the column: a second or so per 10M rows). A file outside it may still be a
    row's, through a link in the collection (a file or folder link pointing out): ``_linked_row``."""
    import os

    from ris.errors import RisError
    from ris.featuredb import FeatureDB

    try:
        db = FeatureDB(features_db)
    except RisError:  # refused, with its reason, when the engine opens it next
        return
    with db:
        root = os.path.realpath(dataset_root or db.dataset_root or ".")
        real = os.path.realpath(path)
        if real == root or not os.path.isfile(real):
            return  # no file there yet: nothing of the collection is replaced
        if os.path.commonpath([root, real]) != root:
            rel = _linked_row(db, root, real)
        else:
            rel = os.path.relpath(real, root).replace(os.sep, "/")
            rel = rel if rel in db.row_names() else None
        if rel is not None:
            raise RisError(f"{path}: is an image of the database ({rel}); give --output another file name")


def _linked_row(db, root: str, real: str, block: int = 1 << 20) -> str | None:
    """The name of the row whose file is ``real`` (a file outside ``root``, reached from it through
    a link), or None. Neither every name nor any image is read: the candidates are the rows whose
    stamp (size, mtime_ns, ``ris.filestamp``) is the file's now, or unknown (databases older than
    stamps), and each is compared by identity (``os.path.samefile``). A linked file changed since
    its row was written (not yet --sync'ed) has another stamp and is not found."""
    import os

    import numpy as np

    try:
        st = os.stat(real)
    except OSError:
        return None
    names = db.row_names()
    stamps = db.f.get("file_stamp")
    for start in range(0, len(names), block):
        stop = min(start + block, len(names))
        if stamps is None:
            rows = np.arange(start, stop)
        else:
            s = stamps[start:stop]
            rows = start + np.flatnonzero(((s[:, 0] == st.st_size) & (s[:, 1] == st.st_mtime_ns)) | (s[:, 0] < 0))
        for i in range(0, len(rows), 4096):
            for name in names.many(rows[i : i + 4096]):
                if _same_file(os.path.join(root, name), real):
                    return name
    return None


def _same_file(a, b) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # b is missing or unreadable: it is refused as a query later
        return False


def _can_write_in(folder) -> None:
    """A file can be made in ``folder`` (or, where it is still to be made, its nearest existing
    parent): tried with a temp file now, not found out after the model and the search ran."""
    import os
    import tempfile

    from ris.errors import RisError

    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ris-probe-", dir=existing)
    except OSError as exc:
        raise RisError(f"{folder}: cannot write the montage there ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def _has_display() -> bool:
    """Whether --show can open a window: on Linux and the BSDs an X or Wayland display must be
    named (without one matplotlib falls back to a backend that shows nothing, silently)."""
    import os

    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _show(rgb) -> None:
    import matplotlib.pyplot as plt  # OpenCV headless has no windows

    plt.figure("ris-search")
    plt.imshow(rgb)
    plt.axis("off")
    plt.show()


def entry() -> None:
    sys.exit(run("ris-search", main))


if __name__ == "__main__":
    entry()
