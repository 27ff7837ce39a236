"""Ctrl-C and SIGTERM as KeyboardInterrupt, never lost where Python drops exceptions.

Python runs a signal handler wherever the main thread is. Where that is a garbage-collector
callback (Keras' JAX backend keeps one, jax's ``_xla_gc_callback``), a weakref callback or
finalizer run by a collection, or a ``__del__``, an exception raised there is printed ('Exception
ignored in ...') and dropped: the command went on as if it had never been interrupted.
``raise_interrupt`` looks at the collector's state and the interrupted frames: in such a place it
does not raise but watches the main thread's calls and returns (``sys.setprofile``), and the first
one outside raises KeyboardInterrupt there, so the command stops as soon as that place is left.
The same while a C extension module is loaded: an exception raised in the Python code its init
runs (jaxlib's makes enums), or before it reached ``sys.modules``, left jaxlib half made or freed,
and Python crashed (status 139 or 134) or reported an ImportError; the interrupt now waits until
the module is loaded. Anywhere else it raises at once, as before. What it cannot tell (a weakref
callback run outside a collection, a C extension's finalizer) reaches ``sys.unraisablehook``, where
``raising_interrupts`` raises the dropped interrupt again the same way instead of printing it.
ris-train's epochs do not raise at all (``ris.train_stop``).
"""
from __future__ import annotations

import contextlib
import gc
import importlib._bootstrap
import importlib.machinery
import signal
import sys
import threading
from types import FrameType
from typing import Any, Iterator

_watching: list[Any] = []  # the profile function to put back while a noted interrupt waits
_collecting = False  # a garbage collection is under way: its weakref callbacks and finalizers drop exceptions


def _note_collection(phase: str, info: dict) -> None:
    global _collecting
    _collecting = phase == "start"


gc.callbacks.insert(0, _note_collection)


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """The handler: KeyboardInterrupt here, or as soon as the callback that would drop it returns."""
    if _unsafe_to_raise(frame):
        _raise_outside()
        return
    raise KeyboardInterrupt


def _raise_outside() -> None:
    """Raise KeyboardInterrupt at the main thread's first call or return outside a dropping callback."""
    if sys.getprofile() is not _raise_when_outside:
        _watching[:] = [sys.getprofile()]
        sys.setprofile(_raise_when_outside)


def _raise_when_outside(frame: FrameType, event: str, arg: Any) -> None:
    if _unsafe_to_raise(frame):
        return
    sys.setprofile(_watching.pop() if _watching else None)
    raise KeyboardInterrupt  # raised into ``frame``'s code: a call, a C call or a return there


# A C extension module's init (``_imp.create_dynamic``, ``exec_dynamic``) may run Python code:
# jaxlib's, built with nanobind, makes Python enums. An exception raised there, or before the module
# made reaches ``sys.modules`` (which frees it), left jaxlib half made or freed: Python then crashed
# (status 139), aborted (134), or reported an ImportError. So an interrupt waits while the import
# system loads an extension module: from ``module_from_spec`` until ``_load_unlocked`` returns.
_EXTENSION_LOAD = {importlib.machinery.ExtensionFileLoader.create_module.__code__,
                   importlib.machinery.ExtensionFileLoader.exec_module.__code__}
_SPEC_LOAD = {f.__code__ for f in (getattr(importlib._bootstrap, name, None)
                                   for name in ("_load_unlocked", "module_from_spec")) if f is not None}


def _loading_extension(frame: FrameType) -> bool:
    """Whether ``frame`` is the import system's loading of a C extension module."""
    if frame.f_code in _EXTENSION_LOAD:
        return True
    if frame.f_code not in _SPEC_LOAD:
        return False
    spec = frame.f_locals.get("spec")
    return isinstance(getattr(spec, "loader", None), importlib.machinery.ExtensionFileLoader)


def _unsafe_to_raise(frame: FrameType | None) -> bool:
    """Whether a garbage collection is under way, or ``frame`` or a caller of it is a gc callback,
    a ``__del__`` or this module's unraisable hook (places whose exceptions Python prints and drops),
    or the loading of a C extension module (which may not survive one)."""
    if _collecting:
        return True
    codes = {_keep_dropped_interrupt.__code__}
    for callback in list(gc.callbacks):
        code = getattr(getattr(callback, "__func__", callback), "__code__", None)
        if code is not None:
            codes.add(code)
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__" or _loading_extension(frame):
            return True
        frame = frame.f_back
    return False


_saved_hook: Any = None


def _keep_dropped_interrupt(unraisable: Any) -> None:
    """``sys.unraisablehook`` while inside ``raising_interrupts``: a KeyboardInterrupt that Python
    was about to drop is raised again outside (and not printed); anything else goes to the hook
    before. Only the main thread's: an interrupt is raised there, and only there can it be again."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        _raise_outside()
        return
    (_saved_hook or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def raising_interrupts(sigterm: bool = True) -> Iterator[None]:
    """While inside: SIGTERM (with ``sigterm``) and Ctrl-C raise KeyboardInterrupt through
    ``raise_interrupt``, and a dropped one is sent again. Only the main thread may set handlers
    (elsewhere nothing changes); Ctrl-C is left alone where it is ignored (a background job) or
    handled by someone else, and everything is put back as it was on the way out."""
    global _saved_hook
    previous: dict[int, Any] = {}
    hooked = False
    if threading.current_thread() is threading.main_thread():
        if sigterm:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, raise_interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, raise_interrupt)
        if sys.unraisablehook is not _keep_dropped_interrupt:
            _saved_hook, sys.unraisablehook, hooked = sys.unraisablehook, _keep_dropped_interrupt, True
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
        if hooked:
            if sys.unraisablehook is _keep_dropped_interrupt:
                sys.unraisablehook = _saved_hook
            _saved_hook = None
