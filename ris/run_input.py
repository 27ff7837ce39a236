"""What an extraction run reads: the folder's images, their labels, and the files it leaves out.

Why a module of its own: the local run (``ris.extract``) and the Ray engine (``ris.ray_engine``)
must list, label and count the same files, and refuse the same folders, in the same words.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ris.errors import RisError


@dataclass
class RunInput:
    """What a run extracts, as the driver lists it: shared by the local and the Ray engine so that
    both list, label and count the same files."""
    root: Path
    files: list[str]
    label_of: dict[str, str]
    label_names: list[str]
    label_mode: str
    other_files: list[str]  # not read: other extensions (the label file, which is read, left out)
    hidden_files: list[str]
    label_note: str = ""  # --labels holidays: how many images it left unlabelled (distractors)
    unlisted: dict[str, str] | None = None  # folders ('x/') that could not be listed -> why

    def warnings(self) -> list[str]:
        """One line per folder that could not be listed: its images are missing, said rather than silent."""
        from ris.cli.common import one_line

        return [f"warning: {one_line(str(self.root / rel.rstrip('/')))}: cannot list this folder ({why}); "
                "the images in it are not read" for rel, why in (self.unlisted or {}).items()]


def without_unlisted_warnings(log):
    """``log`` without ``RunInput.warnings``' lines (``ris-extract --sync`` says its own on those folders)."""
    return lambda line: None if line.startswith("warning: ") and ": cannot list this folder (" in line else log(line)


def list_input(dataset: str | Path, labels: str, features_db: Path, append: bool, overwrite: bool) -> RunInput:
    """The folder listing, the target check and the labels; refuses a folder without images."""
    from ris.featuredb import check_target
    from ris.images import scan_folder
    from ris.labels import NAME_RULES, holidays_note, make_labels

    root = Path(dataset)
    scan = scan_folder(root)
    files = scan.images
    if not files:
        raise RisError(f"{root}: no images found (looked for {_extension_list()}, any case, recursively"
                       f"{_not_read_note(scan.other, scan.hidden)})")
    check_target(features_db, append=append, overwrite=overwrite)
    label_ids, label_names, label_mode = make_labels(files, labels, root)
    if label_mode not in NAME_RULES and (label_ids < 0).all():  # another collection's file (auto takes any groundtruth.tsv)
        raise RisError(f"{label_mode}: labels none of the {len(files)} images (e.g. {files[0]!r} is not in it); its "
                       f"first column names each image by its path under the dataset folder or its file name; "
                       f"--labels ukbench, holidays or folders label by name, --labels none extracts them unlabelled")
    label_of = {f: (label_names[l] if l >= 0 else "") for f, l in zip(files, label_ids)}
    label_file = Path(label_mode).resolve() if label_mode not in NAME_RULES else None
    not_read = [f for f in scan.other if (root / f).resolve() != label_file]  # the label file is read
    note = holidays_note(files, label_ids) if label_mode == "holidays" else ""
    return RunInput(root, files, label_of, label_names, label_mode, not_read, scan.hidden, note, scan.unlisted)


def _extension_list() -> str:
    from ris.images import IMAGE_EXTENSIONS

    order = [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"]
    return " ".join(sorted(IMAGE_EXTENSIONS, key=lambda e: (order.index(e) if e in order else len(order), e)))


def count_phrase(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def not_read_counts(other: Sequence[str], hidden: Sequence[str], unlisted: Sequence[str] = ()) -> list[str]:
    """['3 files with other extensions', '1 hidden file', '1 hidden folder', '1 folder that could not be
    listed'] (empty counts left out)."""
    folders = sum(1 for h in hidden if h.endswith("/"))
    links = sum(1 for o in other if o.endswith("/"))  # folder links into folders already read (see scan_folder)
    parts = [count_phrase(len(other) - links, "file with another extension", "files with other extensions"),
             count_phrase(links, "folder link into a folder already read", "folder links into folders already read"),
             count_phrase(len(hidden) - folders, "hidden file", "hidden files"),
             count_phrase(folders, "hidden folder", "hidden folders"),
             count_phrase(len(unlisted), "folder that could not be listed", "folders that could not be listed")]
    return [p for p in parts if not p.startswith("0 ")]


def _not_read_note(other: Sequence[str], hidden: Sequence[str]) -> str:
    parts = not_read_counts(other, hidden)
    if other:
        parts[0] += f" ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})"
    return f"; not read: {', '.join(parts)}" if parts else ""
