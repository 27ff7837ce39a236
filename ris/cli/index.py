"""ris-index: build or refresh a search index, remove images, show what is saved beside a database."""
from __future__ import annotations

import argparse
import json
import sys

from ris.cli.common import HelpFormatter, nonnegative_int, one_line, positive_int, print_json, run


def build_parser() -> argparse.ArgumentParser:
    from ris.index import index_arg, index_help, index_metavar

    p = argparse.ArgumentParser(
        prog="ris-index",
        description="Build (or catch up) the index ris-search uses, remove images from a database and its "
                    "indexes, or show the database's ids, removals and saved indexes.",
        formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,remove,info}",
                           help="what to do; 'ris-index COMMAND --help' explains each")
    b_help = "build the index, or catch it up with the database's appends and removals"
    b = sub.add_parser("build", help=b_help, formatter_class=HelpFormatter,
                       description=f"{b_help[0].upper()}{b_help[1:]} (replaying removals, adding newer rows; "
                                   "--rebuild starts over), and save it beside the vectors it indexes, where "
                                   "ris-search, ris-eval and ris-serve --index find it. Exit status 2 when it "
                                   "cannot be saved.")
    b.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    b.add_argument("--index", required=True, type=index_arg, metavar=index_metavar(), help=index_help())
    b.add_argument("--model", default=None, help="index the head embeddings of this model (.keras) instead")
    b.add_argument("--rebuild", action="store_true", help="build from scratch even if a saved index can follow")
    b.add_argument("--nprobe", type=positive_int, default=None, help="ivfpq: cells visited per query (saved with the index)")
    b.add_argument("--rerank", type=nonnegative_int, default=None,
                   help="ivfpq: shortlist re-ranked exactly from the stored vectors, or 4 x the k results asked "
                        "for when that is more (0 = off; saved with the index)")
    b.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    r_help = "remove images (relative paths as stored) from the database; its saved indexes follow"
    r = sub.add_parser("remove", help=r_help, formatter_class=HelpFormatter,
                       description=f"{r_help[0].upper()}{r_help[1:]}. Their files are not touched (a file still "
                                   "in the dataset folder comes back with the next ris-extract --sync or "
                                   "--append). Exit status 1 when some named image is not in the database "
                                   "(the others are removed; each one not found is listed).")
    r.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    r.add_argument("images", nargs="*", help="relative paths as stored in the database (see ris-index info)")
    r.add_argument("--from-file", default=None, help="a text file with one relative path per line")
    r.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    i_help = "rows, ids, removals and the indexes saved beside the database"
    i = sub.add_parser("info", help=i_help, formatter_class=HelpFormatter,
                       description=f"Show the database's {i_help}; reads only.")
    i.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    i.add_argument("--json", action="store_true", help="print as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"build": _build, "remove": _remove, "info": _info}[args.command](args)


def _build(args) -> int:
    import warnings

    from ris.errors import RisError
    from ris.index import IndexNotSaved

    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexNotSaved)  # saving is what this command is for
        try:
            return _build_saved(args)
        except IndexNotSaved as exc:
            raise RisError(str(exc)) from None


def _build_saved(args) -> int:
    from ris.errors import RisError
    from ris.featuredb import FeatureDB
    from ris.index import open_search_index
    from ris.index_state import source_of
    from ris.hnsw_files import meta_path
    from ris.sidecars import hnsw_path, ivfpq_path

    if args.index in ("auto", "exact"):
        raise RisError(f"--index {args.index} has nothing to build; choose hnsw, ivfpq or milvus:...")
    tuning = [f"--{k} {getattr(args, k)}" for k in ("nprobe", "rerank") if getattr(args, k) is not None]
    if tuning and args.index != "ivfpq":
        raise RisError(f"{' and '.join(tuning)} tune an ivfpq index; --index {args.index} has no such setting")
    engine = None
    with FeatureDB(args.features_db) as db:
        if args.model is not None or db.features.ndim != 2:
            from ris.search import SearchEngine

            db.close()
            if args.rebuild:
                raise RisError("--rebuild with --model: delete the index beside the embeddings cache instead")
            engine = SearchEngine(args.features_db, args.model, index=args.index)
            index, vectors_path = engine.index, engine.vectors_path  # the embedding cache, for a head
        else:
            vectors_path, source = str(db.path), source_of(db)
            if args.index == "ivfpq" and not len(db):  # a search answers nothing; a build is asked for
                raise RisError(f"{db.path}: no images to train an IVF-PQ index on (use --index exact or hnsw)")
            index = open_search_index(vectors_path, db.features, "euclidean", kind=args.index, source=source,
                                      rebuild=args.rebuild)
        if tuning:
            index = _retune(index, vectors_path or "", args.nprobe, args.rerank)
        summary = {"features_db": args.features_db, "index": args.index, "type": type(index).__name__,
                   "vectors": len(index), "params": getattr(getattr(index, "params", None), "__dict__", None)
                   or getattr(index, "params", None),
                   # the metadata, the commit point: it names the data file (f.h5.hnsw is no file)
                   "path": {"hnsw": lambda p: meta_path(hnsw_path(p)), "ivfpq": ivfpq_path}.get(
                       args.index, lambda p: None)(vectors_path)
                   if vectors_path else None}
    if engine is not None:
        engine.close()
    if args.json:
        print_json(summary)
    else:
        print(f"{args.features_db}: {summary['type']} with {summary['vectors']} vectors"
              + (f" ({summary['path']})" if summary["path"] else ""))
    return 0


def _retune(index, vectors_path: str, nprobe: int | None, rerank: int | None):
    """Search settings change without rebuilding: re-save the index with them."""
    from ris.faiss_index import IvfPqIndex
    from ris.sidecars import ivfpq_path

    path = ivfpq_path(vectors_path)
    writable = IvfPqIndex.load(path, mmap=False)
    if nprobe is not None:
        writable.params.nprobe, writable.params.nprobe_chosen = int(nprobe), True  # kept at every load
    if rerank is not None:
        writable.params.rerank = int(rerank)
    writable.save(path)
    index.params = writable.params
    index._apply_search_params()
    return index


def _remove(args) -> int:
    from ris.errors import RisError
    from ris.index import follow_saved_indexes
    from ris.sync import names_in_list, remove_images

    names = list(args.images)
    if args.from_file:  # a regular file within RIS_MAX_FILE_BYTES, as every input (a FIFO blocked)
        names += names_in_list(args.from_file)
    if not names:
        raise RisError("nothing to remove: give relative paths, or --from-file")
    s = remove_images(args.features_db, names)
    follow_saved_indexes(args.features_db)
    if args.json:
        print_json(s.to_dict())
    else:
        print(f"{args.features_db}: removed {len(s.removed)} image(s) and {len(s.removed_failed)} failed "
              f"entr(ies); {s.rows} images left")
        stored = _stored_names(args.features_db, s.not_found)
        for n in s.not_found:
            hint = (f" (it is stored as {one_line(stored[n][0])}, relative to its images' folder "
                    f"{one_line(stored[n][1])})" if n in stored else "")
            print(f"  not in the database: {one_line(n)}{hint}")
    return 1 if s.not_found else 0


def _stored_names(features_db: str, names: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (stored name, images' folder) for the names given as paths (``photos/x.jpg``, an
    absolute path) to images the database holds under their name relative to its folder."""
    import os

    from ris.featuredb import FeatureDB

    with FeatureDB(features_db) as db:
        root, held = db.dataset_root, set(db.image_ids) | {i for i, _ in db.failures}
    if not root or not names:
        return {}
    found = {}
    for n in names:
        rel = os.path.relpath(os.path.abspath(n), root)
        if rel != n and rel.replace(os.sep, "/") in held:
            found[n] = (rel.replace(os.sep, "/"), root)
    return found


def _info(args) -> int:
    from ris.featuredb import FeatureDB
    from ris.sidecars import sidecar_files

    with FeatureDB(args.features_db) as db:
        ids = db.row_ids
        info = {"features_db": args.features_db, "rows": len(db), "lineage": db.lineage, "content_id": db.content_id,
                "next_id": db.next_id, "removed": int(len(db.removed_ids)),
                "first_id": int(ids[0]) if len(ids) else None, "last_id": int(ids[-1]) if len(ids) else None,
                "indexes": {}}
        for p in sidecar_files(db.path):
            if p.name.endswith((".hnsw.json", ".ivfpq")):
                try:
                    meta = json.loads(p.read_text())
                    info["indexes"][p.name] = {k: meta.get(k) for k in ("kind", "count", "next_id", "removed_seen",
                                                                       "metric", "dim", "params")}
                except (OSError, ValueError) as exc:
                    info["indexes"][p.name] = {"error": str(exc)}
    if args.json:
        print_json(info)
    else:
        ids = f", ids {info['first_id']}..{info['last_id']}" if info["rows"] else ""
        print(f"{info['features_db']}: {info['rows']} images{ids}, next id "
              f"{info['next_id']}, {info['removed']} removed so far, lineage {info['lineage']}")
        for name, m in info["indexes"].items():
            print("\n".join(_lines({name: m}, 1)))
    return 0


def _lines(values: dict, depth: int) -> list[str]:
    """``key: value`` lines, a nested dict's under its key, indented (``--json`` has the same data)."""
    out = []
    for key, value in values.items():
        pad = "  " * depth
        if isinstance(value, dict):
            out += [f"{pad}{one_line(str(key))}:"] + _lines(value, depth + 1)
            continue
        if value is None or isinstance(value, bool):
            value = {None: "none", True: "yes", False: "no"}[value]
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        out.append(f"{pad}{one_line(str(key))}: {one_line(str(value))}")
    return out


def entry() -> None:
    sys.exit(run("ris-index", main))


if __name__ == "__main__":
    entry()
