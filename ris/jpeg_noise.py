"""libjpeg's warnings, named by file: 'Corrupt JPEG data: N extraneous bytes before marker 0xd9'.

libjpeg (inside OpenCV) prints its warnings from C straight to file descriptor 2, without the
file's name, and several decoding threads share that descriptor; no decoder at hand reports the
condition otherwise (Pillow drops it). During an extraction (``capture``) descriptor 2 goes to a
file instead, Python's own ``sys.stderr`` keeps the terminal, and each JPEG decode (``watched``)
notes whether anything was written meanwhile. Only then is the image decoded once more, alone
(every other decode waits), to see whether the line is its own: a damaged photo costs one more
decode, the others nothing. libjpeg's lines are dropped from what is passed on; anything else
written there is passed on when the capture ends.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator

# libjpeg(-turbo)'s warnings (jerror.h JWRN_*) that a decodable but damaged JPEG gives
_LIBJPEG = re.compile(rb"^(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|"
                      rb"Inconsistent progression sequence|Unknown Adobe color transform)[^\n]*\n?", re.M)


class _SharedOrAlone:
    """Many holders at once (``shared``), or one alone (``alone``): the decodes run side by side,
    and the repeat of one whose window saw a warning runs with no other decode."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0  # for ``alone``: new shared holders wait too, or a busy pool would starve it

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._alone and self._shared == 0)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class _Capture:
    def __init__(self, sink: int) -> None:
        self.sink = sink
        self.gate = _SharedOrAlone()
        self.found: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.ended = False

    def size(self) -> int:
        """Bytes written to descriptor 2 so far; -1 once the capture has ended."""
        if self.ended:
            return -1
        try:
            return os.fstat(self.sink).st_size
        except OSError:
            return -1


_ACTIVE: _Capture | None = None


def watched(path: Any, decode: Callable[[], Any]) -> Any:
    """``decode()``, noting libjpeg's warnings for ``path`` while a ``capture`` runs."""
    cap = _ACTIVE
    if cap is None:
        return decode()
    with cap.gate.shared():
        before = cap.size()
        out = decode()
        wrote = before >= 0 and cap.size() > before
    if wrote:  # this decode, or one beside it, or other code wrote: decode it again, alone
        with cap.gate.alone():
            start = cap.size()
            try:
                decode()
            except Exception:
                pass
            end = cap.size()
            try:
                text = os.pread(cap.sink, end - start, start) if 0 <= start < end else b""
            except OSError:  # the capture ended meanwhile
                text = b""
        lines = [m.group(0).decode(errors="replace").strip() for m in _LIBJPEG.finditer(text)]
        if lines:
            with cap.lock:
                cap.found.setdefault(str(path), []).extend(lines)
    return out


def capturing() -> bool:
    """Whether a ``capture`` runs in this process (decoding worker processes then catch their own)."""
    return _ACTIVE is not None


def take(path: Any) -> list[str]:
    """libjpeg's lines found for ``path``, taken (each is said once)."""
    cap = _ACTIVE
    if cap is None:
        return []
    with cap.lock:
        return cap.found.pop(str(path), [])


def note(path: Any, lines: list[str]) -> None:
    """Add libjpeg's lines for ``path`` that a decoding worker process caught."""
    cap = _ACTIVE
    if cap is not None and lines:
        with cap.lock:
            cap.found.setdefault(str(path), []).extend(lines)


def warnings_for(path: Any) -> list[str]:
    """The warnings found for ``path`` (taken), as ris says them: 'corrupt JPEG data (3 extraneous
    bytes before marker 0xd9)'."""
    return [_phrase(line) for line in dict.fromkeys(take(path))]


def _phrase(line: str) -> str:
    head, _, rest = line.partition(": ")
    if head == "Corrupt JPEG data" and rest:
        return f"corrupt JPEG data ({rest})"
    return line[:1].lower() + line[1:]


@contextlib.contextmanager
def capture() -> Iterator[bool]:
    """Catch libjpeg's lines for ``watched``/``warnings_for`` (yields whether it does). Only from
    the main thread (descriptor 2 is the process's), and not with RIS_VERBOSE set; nested: the
    outer capture serves."""
    global _ACTIVE
    if _ACTIVE is not None or os.environ.get("RIS_VERBOSE") or threading.current_thread() is not threading.main_thread():
        yield False
        return
    old_stderr = sys.stderr
    try:
        own_fd = old_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream of its own (a notebook, a test's capture)
        own_fd = False
    try:
        sink = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no descriptor 2, or no room for the file: libjpeg's lines stay as they are
        yield False
        return
    with sink:
        old_stderr.flush()
        if own_fd:  # Python's writes (the progress bar, ris' lines) keep going to the terminal
            sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=old_stderr.encoding,
                              errors=old_stderr.errors or "backslashreplace")
        os.dup2(sink.fileno(), 2)
        _ACTIVE = _Capture(sink.fileno())
        try:
            yield True
        finally:
            _ACTIVE.ended = True
            _ACTIVE = None
            os.dup2(saved, 2)
            os.close(saved)
            if own_fd:
                sys.stderr.close()
                sys.stderr = old_stderr
            sink.seek(0)
            rest = _LIBJPEG.sub(b"", sink.read())
            if rest:
                old_stderr.flush()
                while rest:
                    rest = rest[os.write(2, rest):]
