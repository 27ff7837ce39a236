"""libjpeg's warnings, named by file: 'Corrupt JPEG data: N extraneous bytes before marker 0xd9'.

libjpeg (inside OpenCV) prints its warnings from C straight to file descriptor 2, without the
file's name, and several decoding threads share that descriptor; no decoder at hand reports the
condition otherwise (Pillow drops it). During an extraction (``capture``) descriptor 2 goes to a
file instead, Python's own ``sys.stderr`` keeps the terminal, and each JPEG decode (``watched``)
notes whether anything was written meanwhile. Only then is the image decoded once more, alone
(every other decode waits), to see whether the line is its own: a damaged photo costs one more
decode, the others nothing. libjpeg's lines are dropped from what is passed on; anything else
written there is passed on when the capture ends (with RIS_VERBOSE set, as it comes). Captures may
overlap, from any thread (ris-serve decodes uploads in worker threads): the first redirects
descriptor 2, the last one out restores it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

# libjpeg(-turbo)'s warnings (jerror.h JWRN_*) that a decodable but damaged JPEG gives
_LIBJPEG = re.compile(rb"^(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|"
                      rb"Inconsistent progression sequence|Unknown Adobe color transform|"
                      rb"Warning: unknown JFIF revision number|"
                      rb"Warning: thumbnail image size does not match data length)[^\n]*\n?", re.M)


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
_SETUP = threading.Lock()  # starting and ending a capture: one thread at a time
_USERS = 0  # captures open now; the last one out ends it
_ENDING: Callable[[], None] | None = None  # gives descriptor 2 (and sys.stderr) back
_KEYS = itertools.count()
_NOTING = threading.local()  # paths: {path: libjpeg's lines} of the ``noting`` blocks open in this thread


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
        mine = getattr(_NOTING, "paths", {}).get(str(path))
        if lines and mine is not None:  # this thread's ``noting`` of the file: its own, not another thread's
            mine.extend(lines)
        elif lines:
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
    return phrased(take(path))


def phrased(lines: list[str]) -> list[str]:
    """libjpeg's lines for one file as ris says them, each once (a Ray node's, handed back)."""
    return [_phrase(line) for line in dict.fromkeys(lines)]


def _phrase(line: str) -> str:
    head, _, rest = line.partition(": ")
    if head == "Warning" and rest:  # libjpeg's own 'Warning: ...' would read 'warning: FILE: warning: ...'
        return rest
    if head == "Corrupt JPEG data" and rest:
        return f"corrupt JPEG data ({rest})"
    return line[:1].lower() + line[1:]


def take_all() -> dict[str, list[str]]:
    """Every file's warnings found and not yet taken, phrased (taken)."""
    cap = _ACTIVE
    if cap is None:
        return {}
    with cap.lock:
        found, cap.found = cap.found, {}
    return {path: [_phrase(line) for line in dict.fromkeys(lines)] for path, lines in found.items()}


@contextlib.contextmanager
def noting(path: Any) -> Iterator[list[str]]:
    """A capture around the decodes of one image ``path`` (a query), from any thread; the list it
    yields receives their warnings, phrased and each once, when the block ends without an error
    (a file refused has its reason; libjpeg's lines for it are dropped). Its thread's decodes of
    the file are its own: two threads noting one file at once each get the warning."""
    found: list[str] = []
    key, paths = str(path), _NOTING.__dict__.setdefault("paths", {})
    outer, paths[key] = paths.get(key), []
    with capture():
        try:
            yield found
        except BaseException:
            take(path)
            raise
        finally:
            mine = paths.pop(key)
            if outer is not None:
                paths[key] = outer
        found.extend(phrased(mine + take(path)))


@contextlib.contextmanager
def said(path: Any, log: Callable[[str], None]) -> Iterator[None]:
    """``noting`` for a query file: its warnings are then said through ``log`` as ris-extract says
    them, naming the file as its user gave it ('warning: ./q.jpg: corrupt JPEG data (...)')."""
    from pathlib import Path

    with noting(Path(path)) as found:  # the decoders name it as a Path
        yield
    for warning in found:
        _say(log, path, warning)


@contextlib.contextmanager
def naming(log: Callable[[str], None], but: Any = None) -> Iterator[None]:
    """A capture whose files' warnings not taken meanwhile are said through ``log`` at its end (the
    database images a command decodes again: a montage's tiles, --verify's, --rotations'); ``but``:
    a query file whose warnings its engine said already. For a command's own thread: it takes
    every file's."""
    from pathlib import Path

    with capture():
        yield
        found = take_all()
    for path, warnings in found.items():
        for warning in warnings if but is None or path != str(Path(but)) else ():
            _say(log, path, warning)


@contextlib.contextmanager
def naming_these(paths: Callable[[], list[Any]], log: Callable[[str], None]) -> Iterator[None]:
    """A capture whose warnings about the files ``paths()`` gives are said through ``log`` at its end
    (the database images a thumbnail cache is made of, decoded in a thread pool); captures beside it
    (ris-serve's queries in other threads) keep theirs."""
    with capture():
        try:
            yield
        except BaseException:
            for path in paths():
                take(path)
            raise
        found = [(path, warnings_for(path)) for path in paths()]
    for path, warnings in found:
        for warning in warnings:
            _say(log, path, warning)


def _say(log: Callable[[str], None], path: Any, warning: str) -> None:
    """One warning line as ris-extract says it; a name holding a newline stays one line."""
    from ris.cli.common import one_line

    log(f"warning: {one_line(path)}: {warning}")


def decoded_noting(decode: Callable[[], T]) -> tuple[T, list[str]]:
    """``decode()`` of an image held in memory (an upload), from any thread, and libjpeg's warnings
    it gave, phrased: keyed by this decode, so two uploads of one name at once keep their own."""
    key = f"<decode {next(_KEYS)}>"
    with noting(key) as found:
        out = watched(key, decode)
    return out, found


@contextlib.contextmanager
def capture() -> Iterator[bool]:
    """Catch libjpeg's lines for ``watched``/``warnings_for`` (yields whether it does). From any
    thread: a capture open already is joined, and the last one to end ends it. Python's
    ``sys.stderr`` keeps the terminal when the main thread starts it; otherwise Python's lines
    written meanwhile are passed on at the end (a thread swapping ``sys.stderr`` would close a
    stream other threads may still hold), or as they come with RIS_VERBOSE set, like C code's."""
    global _USERS
    with _SETUP:
        on = _ACTIVE is not None or _start()
        _USERS += on
    if not on:
        yield False
        return
    try:
        yield True
    finally:
        with _SETUP:
            _USERS -= 1
            if _USERS == 0 and _ENDING is not None:
                _ENDING()


def _start() -> bool:
    """Descriptor 2 to a file (``_ACTIVE``); False where that cannot be done."""
    global _ACTIVE, _ENDING
    old_stderr = sys.stderr
    try:  # the main thread's own stream on descriptor 2 keeps the terminal; a notebook's, a test's stay as they are
        swap = threading.current_thread() is threading.main_thread() and old_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        swap = False
    try:
        sink = tempfile.TemporaryFile()
    except OSError:  # no room for the file: libjpeg's lines stay as they are
        return False
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2
        sink.close()
        return False
    try:
        old_stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    if swap:  # Python's writes (the progress bar, ris' lines) keep going to the terminal
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=old_stderr.encoding,
                          errors=old_stderr.errors or "backslashreplace")
    os.dup2(sink.fileno(), 2)
    _ACTIVE = _Capture(sink.fileno())
    passed = [0]  # bytes of the file passed on (RIS_VERBOSE: whole lines as they come, by ``pump``)
    stop = threading.Event()

    def pump() -> None:  # what RIS_VERBOSE is for (TensorFlow's lines, say) must not wait for the end
        while not stop.wait(0.1):
            try:
                end_at = os.fstat(sink.fileno()).st_size
                text = os.pread(sink.fileno(), end_at - passed[0], passed[0]) if end_at > passed[0] else b""
                text = text[: text.rfind(b"\n") + 1]
                passed[0] += len(text)
                text = _LIBJPEG.sub(b"", text)
                while text:
                    text = text[os.write(saved, text):]
            except OSError:
                return

    pumping = None
    if os.environ.get("RIS_VERBOSE"):
        pumping = threading.Thread(target=pump, name="ris-stderr", daemon=True)
        pumping.start()

    def end() -> None:
        global _ACTIVE, _ENDING
        _ACTIVE.ended = True
        _ACTIVE = _ENDING = None
        if pumping is not None:
            stop.set()
            pumping.join()
        os.dup2(saved, 2)
        os.close(saved)
        if swap:
            sys.stderr.close()
            sys.stderr = old_stderr
        with sink:
            sink.seek(passed[0])
            rest = _LIBJPEG.sub(b"", sink.read())
        if rest:
            try:
                old_stderr.flush()
            except (AttributeError, OSError, ValueError):
                pass
            while rest:
                rest = rest[os.write(2, rest):]

    _ENDING = end
    return True
