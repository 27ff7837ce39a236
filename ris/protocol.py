"""Which database rows are scored as queries, and which rows they search (the evaluation protocol).

Two galleries:
- ``all`` (the default, the honest one): held-out queries search every labelled image of the
  database; the images a head was trained on stay in the gallery, only the held-out queries are
  scored. This is how a user meets the system: one collection, searched whole. What those training
  images are to a query depends on the split (``TRAINING_IN_GALLERY``): with an object split they are
  of other objects, distractors; with an image split they include the query's own class, relevant
  items (category retrieval: finding them is right).
- ``split`` (the fold protocol): held-out images search only each other. A 200-image fold has
  far fewer distractors than the collection, so it flatters every score; kept for comparison.

A head applied to a database holds a list of the images it was fitted on (``fit_images`` in its
metadata, with a content sketch of each since 2026-12-02, so that a collection reusing the same file
names is not taken for them; older models only list their held-out ``test_images``). Those images, and for an object
split every image of their objects, are never scored as held-out queries; a database that contains
none of them is a collection the head never saw, and every labelled image is scored.

``--queries FILE`` (Holidays, Oxford, Paris): only the listed images are queries; every other row,
labelled or not, is gallery (unlabelled rows are distractors), the query itself excluded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ris.errors import DatabaseError, RisError

GALLERIES = ("all", "split")
TRAINING_IN_GALLERY = {  # a head's split kind -> what its training images are to a held-out query
    "object": "the head's training images, all of other objects, are distractors",
    "image": "the head's training images of the query's own class count as relevant, of other classes as distractors",
}
MAX_QUERY_FILE_BYTES = 64 << 20


@dataclass
class Protocol:
    query_rows: np.ndarray  # database rows scored as queries (sorted)
    gallery_rows: np.ndarray  # database rows searched (sorted; contains every query row)
    description: str
    training_in_db: int | None = None  # the head's fitted images found in this database (None: no head)

    def positions(self) -> np.ndarray:
        """Query positions inside the gallery rows."""
        return np.searchsorted(self.gallery_rows, self.query_rows)


def read_query_ids(path: str | Path) -> list[str]:
    """One image id per line (as stored in the database: its path relative to the dataset folder);
    blank lines and lines starting with '#' are skipped; UTF-8, or UTF-16 with its byte-order mark
    (as ``ris-index remove --from-file`` reads a list). An id listed twice is refused: merging it
    would score fewer queries than the list holds, and the numbers would no longer be the list's."""
    from ris.imagefile import read_file

    p = Path(path)
    data = read_file(p, MAX_QUERY_FILE_BYTES)
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")  # PowerShell's '>' and Notepad's 'Unicode', as ris-index reads
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")  # an editor's byte-order mark is not an id
    except UnicodeDecodeError as exc:
        raise RisError(f"{p}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte {exc.start}); save the query list "
                       "as UTF-8") from None
    if "\x00" in text:
        raise RisError(f"{p}: holds NUL bytes, which no image id has: save the query list as UTF-8 (UTF-16 is read "
                       "only with its byte-order mark)")
    first: dict[str, int] = {}  # id -> line it is first on
    repeats: list[tuple[int, str]] = []
    for n, ln in enumerate(text.splitlines(), 1):
        if ln.strip() and not ln.lstrip().startswith("#"):
            qid = ln.strip().removeprefix("./")
            if qid in first:
                repeats.append((n, qid))
            else:
                first[qid] = n
    if repeats:
        n, qid = repeats[0]
        raise RisError(f"{p}: line {n} repeats {qid!r} of line {first[qid]} ({len(repeats)} repeated "
                       f"line{'s' if len(repeats) > 1 else ''} in all); list each query once")
    if not first:
        raise RisError(f"{p}: no image ids in the query list (one per line)")
    return list(first)


SKETCH_BITS = 128
SKETCH_TOLERANCE = 3  # differing bits still taken for the same image (float noise across machines)


def _projections(features: np.ndarray) -> np.ndarray:
    """(N, SKETCH_BITS) float32: each row on 128 fixed random directions."""
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    planes = np.random.default_rng(0).standard_normal((x.shape[1], SKETCH_BITS)).astype(np.float32)
    return x @ planes


def _sketch_bits(features: np.ndarray, thresholds: Any = None) -> np.ndarray:
    """(N, 16) uint8: the packed bits 'projection above its threshold' (0 without thresholds)."""
    if len(features) == 0:  # an empty part (--val-fraction 0)
        return np.zeros((0, SKETCH_BITS // 8), np.uint8)
    cut = 0.0 if thresholds is None else np.asarray(thresholds, np.float32)
    return np.packbits(_projections(features) > cut, axis=1)


def sketch_thresholds(*parts: np.ndarray) -> list[float]:
    """Per projection, its median over the head's fitted images (the parts together), so that each
    bit splits them in half. Why: features that differ little between images (an untrained
    network's, all in one narrow cone: cosine 0.93-0.99 between any two photos) fall on one side of
    most planes through the origin, their sketches then differ in a few bits, and photos of another
    collection came within SKETCH_TOLERANCE of a training image by chance."""
    proj = np.concatenate([_projections(p) for p in parts if len(p)])
    return [float(v) for v in np.median(proj, axis=0).astype(np.float32)]


def content_sketch(features: np.ndarray, thresholds: Any = None) -> list[str]:
    """A 128-bit sketch of each row (fixed random projections, each against its threshold from
    ``sketch_thresholds``: 0 in heads saved before they were stored), as hex: equal for the same
    image's features, far apart (128 x angle / pi bits about the thresholds' centre) for others.
    Why: a head's training images are recognised in a database by their content, so another
    collection that reuses the same file names is not taken for them, and a copy under another name is."""
    return [row.tobytes().hex() for row in _sketch_bits(features, thresholds)]


def _same_content(a: str, b: str) -> bool:
    return bin(int(a, 16) ^ int(b, 16)).count("1") <= SKETCH_TOLERANCE


def content_matches(sketches: list[str], read_rows: Any, n_rows: int, block: int = 16384,
                    thresholds: Any = None) -> list[tuple[int, int]]:
    """(database row, sketch index) of every row whose features match one of ``sketches`` (within
    SKETCH_TOLERANCE bits), whatever its name. Split in SKETCH_TOLERANCE + 1 parts, a match shares at
    least one part exactly, so only rows sharing a part with some sketch are compared bit by bit."""
    parts = SKETCH_TOLERANCE + 1
    want = np.frombuffer(bytes.fromhex("".join(sketches)), np.uint8).reshape(len(sketches), -1)
    want_parts = np.array_split(want, parts, axis=1)
    keys = [{p.tobytes(): [] for p in wp} for wp in want_parts]
    for j, wp in enumerate(want_parts):
        for i, p in enumerate(wp):
            keys[j][p.tobytes()].append(i)
    found = []
    for start in range(0, n_rows, block):
        rows = np.arange(start, min(n_rows, start + block), dtype=np.int64)
        bits = _sketch_bits(read_rows(rows), thresholds)
        for r, row_parts in zip(rows, zip(*(p for p in np.array_split(bits, parts, axis=1)))):
            cands = {i for j, p in enumerate(row_parts) for i in keys[j].get(p.tobytes(), ())}
            row = bits[r - start]
            found += [(int(r), i) for i in sorted(cands) if int(np.unpackbits(row ^ want[i]).sum()) <= SKETCH_TOLERANCE]
    return found


def fitted_ids(meta: dict[str, Any], db_ids: list[str], read_rows: Any = None) -> tuple[set[str], str]:
    """The ids of this database's images a head was fitted on (train + validation), and a note.
    With the head's content sketches (``fit_sketches``) and ``read_rows`` (database rows ->
    features), those whose name and content match, and copies under other names matched one to one
    by content (a name with other content is not one); else by name."""
    split = meta.get("split", {})
    if "fit_images" in split:
        names = split["fit_images"]
        sketches = split.get("fit_sketches")
        if read_rows is None or not sketches or len(sketches) != len(names):
            return set(names), ""
        cuts = split.get("fit_sketch_thresholds")
        cuts = cuts if isinstance(cuts, list) and len(cuts) == SKETCH_BITS else None
        pairs = content_matches(sketches, read_rows, len(db_ids), thresholds=cuts)
        found = {db_ids[r] for r, i in pairs if db_ids[r] == names[i]}  # its name and its content
        # a copy under another name: only a one-to-one match counts (features that hardly differ
        # between images, e.g. an untrained network's, match many rows to many sketches)
        rows_per = np.bincount([r for r, _ in pairs], minlength=len(db_ids)) if pairs else np.zeros(0, int)
        sketch_per = np.bincount([i for _, i in pairs], minlength=len(names)) if pairs else np.zeros(0, int)
        renamed = {db_ids[r] for r, i in pairs if db_ids[r] != names[i] and rows_per[r] == 1 and sketch_per[i] == 1
                   and names[i] not in found}
        # a sketch cut at 0 (heads saved before the thresholds) can take look-alikes for copies: said
        doubt = "" if cuts is not None else ("; or look-alikes: this head's sketch, saved before 2026-12-04, cannot "
                                             "tell them apart where features hardly differ; train it again to be sure")
        note = f"{len(renamed)} of them under other names (recognised by content{doubt})" if renamed else ""
        return found | renamed, note
    test = set(split.get("test_images", []))
    if test & set(db_ids):  # the training database, or one that overlaps it
        return set(db_ids) - test, ("the model does not list its training images (trained before they were "
                                    "recorded): every image not among its held-out ones is treated as training")
    return set(), ("the model does not list its training images (trained before they were recorded); none of "
                   "its held-out images is in this database, so it is taken as a collection the head never saw")


def choose(db_ids: list[str], labels: np.ndarray, meta: dict[str, Any] | None = None, split: str = "test",
           gallery: str = "all", seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1,
           queries: list[str] | None = None, queries_file: str = "", read_rows: Any = None) -> Protocol:
    """The rows to score and search; see the module docstring. ``read_rows`` (database rows ->
    features) lets a head's training images be recognised by content as well as by name."""
    if gallery not in GALLERIES:
        raise RisError(f"--gallery must be one of {', '.join(GALLERIES)}, not {gallery!r}")
    labelled = np.nonzero(labels >= 0)[0]
    fit_rows, note, n_fit_total = np.zeros(0, np.int64), "", 0
    if meta is not None:
        fit, note = fitted_ids(meta, db_ids, read_rows)
        n_fit_total = len(meta.get("split", {}).get("fit_images") or fit)
        fit_rows = np.array([r for r, i in enumerate(db_ids) if i in fit], np.int64)
    trained = len(fit_rows) if meta is not None else None
    if queries is not None:
        return _listed(db_ids, labels, queries, queries_file, fit_rows, trained, n_fit_total)

    if split == "all":
        q = labelled
        desc = "all labelled images"
        if meta is not None:
            desc += (f" (includes {len(fit_rows)} of the head's {n_fit_total} training images: not a held-out score)"
                     if len(fit_rows) else f" (none of the head's {n_fit_total} training images is in this database)")
        return Protocol(q, q, _with_note(desc, note), trained)
    if split != "test":
        raise RisError(f"--split must be test or all, not {split!r}")
    if meta is None:
        from ris.splits import rows_of, split_objects

        test_objects = split_objects(labels, test_fraction, val_fraction, seed)["test"]
        q = rows_of(labels, test_objects)
        if not len(q):
            raise RisError(f"the split (seed {seed}, test fraction {test_fraction:g}) holds out no object: "
                           f"nothing to score with --split test (--split all scores every labelled image)")
        desc = f"held-out test objects (seed {seed}, {test_fraction:.0%} of objects)"
    else:
        by = meta.get("split", {}).get("by", "object")
        seen = np.zeros(len(labels), bool)
        seen[fit_rows] = True
        if by == "object" and len(fit_rows):  # every view of a training object is a training image
            seen |= np.isin(labels, np.unique(labels[fit_rows][labels[fit_rows] >= 0])) & (labels >= 0)
        q = labelled[~seen[labelled]]
        if not len(fit_rows):
            desc = (f"every labelled image: a collection the head never saw (none of its {n_fit_total} "
                    f"training images is in this database)")
        else:
            held = "objects" if by == "object" else "images of every class"
            desc = (f"held-out {held} of the model's split (seed {meta.get('config', {}).get('seed', 0)}); "
                    f"{int(seen[labelled].sum())} images of the head's training "
                    f"{'objects' if by == 'object' else 'images'} are not scored")
        if not len(q):
            raise DatabaseError(f"every labelled image of this database is one of the head's training "
                                f"{'objects' if by == 'object' else 'images'}: nothing held out to score "
                                f"(--split all scores them, which is not a held-out score)")
        desc = _with_note(desc, note)
    if gallery == "all":
        role = f"; {TRAINING_IN_GALLERY[by]}" if meta is not None and len(fit_rows) else ""
        return Protocol(q, labelled, desc + f"; they search all {len(labelled)} labelled images "
                        f"(whole-collection protocol{role})", trained)
    return Protocol(q, q, desc + "; they search only each other (fold protocol)", trained)


def for_database(db: Any, features_db: str | Path, model: str | Path | None, split: str, gallery: str,
                 seed: int, test_fraction: float, val_fraction: float,
                 queries: str | Path | None) -> tuple[Protocol, dict[str, Any] | None, np.ndarray]:
    """(protocol, the head's metadata or None, labels) of ``ris-eval`` on an open ``FeatureDB``:
    labels required, a head's metadata read and checked against the database, the query list read.
    Shared by ``ris-eval`` and ``ris-eval --index``, so both score the same queries."""
    from ris.modelio import check_compatible, read_meta

    labels = db.labels
    if len(labels) == 0:
        raise DatabaseError(f"{features_db}: no images to evaluate (the database is empty: were they all removed?)")
    if (labels >= 0).sum() < 2:
        raise DatabaseError(f"{features_db}: no labels to evaluate against; extract again with --labels ukbench "
                            f"(ukbench00042.jpg: object = number // 4), --labels holidays (100301.jpg: scene = "
                            f"number // 100), --labels folders (one folder per class) or --labels FILE.tsv "
                            f"(file<TAB>label lines)")
    distractors = int((labels < 0).sum())
    # every image relevant to every query, every score perfect; unless a query list searches distractors too
    if len(np.unique(labels[labels >= 0])) == 1 and not (queries is not None and distractors):
        name = (getattr(db, "label_names", None) or ["?"])[int(labels[labels >= 0][0])]
        among = (f"; to score it among its {distractors} unlabelled images (distractors), list its queries "
                 f"with ris-eval --queries FILE" if distractors else "")
        raise DatabaseError(f"{features_db}: every labelled image has the same label ({name!r}): each would be "
                            f"relevant to every query and every score would read perfect; extract again with "
                            f"the --labels that tells the objects apart (one folder is not a class: "
                            f"--labels holidays, ukbench or a FILE.tsv){among}")
    meta = None
    if model is not None:
        meta = read_meta(model)
        check_compatible(meta, db.fingerprint(), str(features_db))
    qids = read_query_ids(queries) if queries is not None else None
    plan = choose(db.image_ids, labels, meta, split, gallery, seed, test_fraction, val_fraction, qids,
                  str(queries or ""), read_rows=db.read_rows)
    return plan, meta, labels


def _listed(db_ids: list[str], labels: np.ndarray, queries: list[str], queries_file: str,
            fit_rows: np.ndarray, trained: int | None, n_fit_total: int = 0) -> Protocol:
    index = {i: r for r, i in enumerate(db_ids)}
    missing = [i for i in queries if i not in index]
    if missing:
        raise DatabaseError(f"{queries_file}: {len(missing)} query id(s) are not in the database "
                            f"(e.g. {missing[0]!r}); ids are paths relative to the dataset folder")
    q = np.unique(np.array([index[i] for i in queries], np.int64))
    unlabelled = q[labels[q] < 0]
    if len(unlabelled):
        raise DatabaseError(f"{queries_file}: query {db_ids[unlabelled[0]]!r} has no label: nothing to score it against")
    clash = np.intersect1d(q, fit_rows)
    if len(clash):
        raise DatabaseError(f"{queries_file}: query {db_ids[clash[0]]!r} is one of the head's training images; "
                            f"it cannot be scored as a held-out query")
    gallery = np.arange(len(db_ids), dtype=np.int64)
    n_dis = int((labels < 0).sum())
    desc = (f"the {len(q)} quer{'y' if len(q) == 1 else 'ies'} of {queries_file} "
            f"search{'es' if len(q) == 1 else ''} the other {len(gallery) - 1} images"
            + (f" ({n_dis} unlabelled: distractors)" if n_dis else ""))
    if trained:
        desc += f"; {trained} of the head's training images are in the gallery"
    elif trained == 0:  # a head given, none of its images here: say so, as the held-out line does
        desc += f"; none of the head's {n_fit_total} training images is in this database"
    return Protocol(q, gallery, desc, trained)


def gallery_labels(labels: np.ndarray) -> np.ndarray:
    """Labels with every unlabelled row given a group of its own, so that it stays in the gallery as
    a distractor (the metrics drop label -1 rows) and is never relevant to any query."""
    out = np.asarray(labels).astype(np.int64, copy=True)
    neg = np.nonzero(out < 0)[0]
    if len(neg):
        out[neg] = out.max(initial=-1) + 1 + np.arange(len(neg))
    return out


def _with_note(desc: str, note: str) -> str:
    return f"{desc} [{note}]" if note else desc
