"""ris.interrupts: where a Ctrl-C or SIGTERM may raise KeyboardInterrupt, and where it must wait."""
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from ris.cli.common import run
from ris.testing import make_tiny_dataset

CANDIDATES = ("xxlimited", "xxlimited_35", "_codecs_tw", "_codecs_hk", "_codecs_kr", "_bz2", "_lzma", "_decimal", "_csv")


def _unloaded_extension() -> str:
    """A standard-library module that is a shared library and not imported yet."""
    for name in CANDIDATES:
        spec = importlib.util.find_spec(name) if name not in sys.modules else None
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return name
    pytest.skip(f"none of {', '.join(CANDIDATES)} is an unloaded extension module in this Python")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_an_interrupt_during_an_extension_modules_init_waits_until_the_init_returns(signame, capsys, monkeypatch):
    """A C extension's init may run Python code (jaxlib's, built with nanobind, creates Python
    enums). A Ctrl-C or SIGTERM handled there raised KeyboardInterrupt inside the init: jaxlib's
    half-made module then crashed Python (status 139 after 'interrupted', or 134, or a hang), or came
    out as 'internal error: ImportError' (status 2). Now the interrupt waits until the init returns,
    then stops the command: one line, status 130. Here the init is stood in for by Python code
    around the real one, which sends the signal and must run to its end."""
    import _imp

    name = _unloaded_extension()
    sig = getattr(signal, signame)
    real = _imp.create_dynamic
    steps: list[str] = []

    def create_dynamic(spec, *args):
        if spec.name != name:
            return real(spec, *args)
        steps.append("init started")
        signal.raise_signal(sig)  # the handler runs at the next bytecode: inside the init
        for _ in range(10):
            len(steps)
        module = real(spec, *args)
        steps.append("init finished")
        return module

    def main(argv):
        __import__(name)
        steps.append("went on after the import")
        return 0

    monkeypatch.setattr(_imp, "create_dynamic", create_dynamic)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the suite runs with SIGINT ignored
    try:
        code = run("ris-x", main, [])
    finally:
        signal.signal(signal.SIGINT, saved)
        sys.modules.pop(name, None)
    assert (code, capsys.readouterr().err) == (130, "ris-x: interrupted\n")
    assert steps == ["init started", "init finished"]


_SIGNAL_IN_JAXLIB_INIT = """
__file__ = "<string>"
import os, signal, sys, importlib.machinery
K = int(sys.argv.pop(1))
loader, seen = importlib.machinery.ExtensionFileLoader, [0]

def count(frame, event, arg):  # the K-th Python event inside jaxlib._jax's load sends SIGTERM
    if frame.f_code.co_filename == __file__:
        return  # not in this script's own code (its sys.setprofile(None) would undo ris' own)
    seen[0] += 1
    if seen[0] == K:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGTERM)

def watched(load, name_of):
    def wrapper(self, what):
        if name_of(what) != "jaxlib._jax" or seen[0] >= K:
            return load(self, what)
        sys.setprofile(count)
        try:
            return load(self, what)
        finally:
            if seen[0] < K:  # not sent: count goes (sent: it went itself, and ris may be watching)
                sys.setprofile(None)
    return wrapper

loader.create_module = watched(loader.create_module, lambda spec: spec.name)
loader.exec_module = watched(loader.exec_module, lambda module: module.__name__)
from ris.cli.extract import entry
sys.argv[0] = "ris-extract"
entry()
"""


@pytest.mark.parametrize("k", [5, 12, 50, 400])
def test_sigterm_while_jaxlib_initialises_ends_ris_extract_with_one_line_and_130(tmp_path, k):
    """The real case: SIGTERM to ris-extract on Keras' JAX backend while jaxlib._jax loads (some
    40 ms, about 1 s after the start). Depending on where in the load it came, the command ended
    in a segmentation fault after 'ris-extract: interrupted' (status 139; K=5), went on as if never
    interrupted (K=12), said 'internal error: ImportError: Encountered an error while initializing
    the extension' (status 2; K=50), or aborted ('terminate called after throwing an instance of
    nanobind::python_error', 134; K=400). The signal is sent at the K-th Python call of that load,
    so each case comes every time."""
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("jaxlib") is None:
        pytest.skip("jax is not installed (the JAX backend's leg runs this)")
    data = make_tiny_dataset(tmp_path / "data", n_objects=2)
    env = {**os.environ, "KERAS_BACKEND": "jax", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _SIGNAL_IN_JAXLIB_INIT, str(k),
                           "--dataset", str(data), "--features-db", str(tmp_path / "f.h5"), "--model", "mobilenet_v2",
                           "--weights", "none", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode, proc.stderr) == (130, "ris-extract: interrupted\n"), proc.stderr[-3000:]
    assert not (tmp_path / "f.h5").exists()
