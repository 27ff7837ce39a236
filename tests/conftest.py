import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A reference dataset beside the checkout, or a skip that says why."""
    path = SHARED / name
    if not (path / "groundtruth.tsv").is_file():
        pytest.skip(f"reference data {path} not found (it lives in ../shared/data beside the checkout; "
                    f"see README 'Getting UKBench')")
    return path
