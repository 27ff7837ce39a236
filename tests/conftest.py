import importlib.util
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A suite started in the background by a non-interactive shell (`python -m pytest &`, a CI step)
# inherits Ctrl-C ignored, and ris rightly leaves an ignored Ctrl-C alone: the tests of Ctrl-C
# handling, in this process (each xdist worker imports this file) and in the commands they start,
# need it delivered as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)



def pytest_configure(config: pytest.Config) -> None:
    """With ``-n N`` (pytest-xdist), each test file runs whole on one worker unless ``--dist`` says
    otherwise: module fixtures (a Ray cluster, a built database) are made once, and no two workers
    start one file's clusters at once. Set here, not in addopts, so plain pytest without xdist runs."""
    given = config.invocation_params.args + tuple(os.environ.get("PYTEST_ADDOPTS", "").split())
    if getattr(config.option, "dist", "no") == "load" and not any(
            str(a).startswith("--dist") or str(a) == "-d" for a in given):
        config.option.dist = "loadfile"


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A reference dataset beside the checkout, or a skip that says why."""
    path = SHARED / name
    if not (path / "groundtruth.tsv").is_file():
        pytest.skip(f"reference data {path} not found (it lives in ../shared/data beside the checkout; "
                    f"see README 'Getting UKBench')")
    return path


def _only_loopback() -> bool:
    import socket

    return all(name == "lo" for _, name in socket.if_nameindex())


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """'HOST:PORT' of a Milvus server, or a skip naming what is missing (tests/test_milvus_index.py
    says how one is named or started)."""
    import os

    wanted = os.environ.get("RIS_MILVUS_SERVER", "")
    if wanted and wanted != "start":
        yield wanted
        return
    if wanted != "start":
        pytest.skip("no Milvus server: RIS_MILVUS_SERVER=HOST:PORT names one, =start starts one (.ci/run does)")
    if importlib.util.find_spec("milvus") is None:
        pytest.skip("RIS_MILVUS_SERVER=start needs the milvus wheel (pip install --no-deps milvus==2.3.5)")
    if not _only_loopback():
        pytest.skip("RIS_MILVUS_SERVER=start: Milvus 2.3 listens on every interface, so it is started only in a "
                    "network namespace with nothing but loopback (unshare -n, as .ci/run does)")
    import socket

    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus-server")))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        server.listen_port = probe.getsockname()[1]
    server.start()
    try:
        yield f"127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _close_hdf5_files_a_test_abandoned():
    """A file whose write failed is left open (``ris.h5write.abandon_hdf5``); a CLI error after
    that ends the process without HDF5's shutdown (``os._exit``), which would end pytest. In tests
    the disk is not full, so those files can be closed after each test (and h5py's noise heard again)."""
    yield
    import sys

    h5write = sys.modules.get("ris.h5write")
    if h5write is not None:
        h5write.release_abandoned()
