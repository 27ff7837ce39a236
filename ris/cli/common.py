"""What every ris command shares: quiet TensorFlow, one-line errors, exit codes, --json."""
from __future__ import annotations

import argparse
import json
import math
import io
import logging
import os
import re
import sys
from typing import Any, Callable

# Exit status of every ris command (README "Commands"):
EXIT_OK = 0  # done
EXIT_PARTIAL = 1  # done in part (some of several queries unreadable), or a requested check failed (--min-ns)
EXIT_ERROR = 2  # error, nothing done: bad arguments, unreadable or incompatible input, refused database
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C, SIGTERM): run the same command again to resume


# --- argument types: nonsense is refused by argparse (one "error: argument --x: ..." line, exit 2) ---

def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def finite_float(text: str) -> float:
    return _number(text, float)


image_side = int_at_least(32)  # a network input side: below 32 px the last feature map is empty


def ns_threshold(text: str) -> float:
    """An N-S score to require: 0 or more (one above 4, the best there is, always fails: status 1)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"N-S scores are between 0 and 4, not {value:g}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value:g}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value:g}")
    return value


def folds(text: str) -> int:
    """0 (no k-fold) or K >= 2."""
    value = _number(text, int)
    if value != 0 and value < 2:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or at least 2 folds, not {value}")
    return value


def number_list(item: Callable[[str], Any], allow_empty: bool = False) -> Callable[[str], tuple]:
    """Comma-separated values, each checked by ``item`` ('' = empty tuple when ``allow_empty``)."""
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        if parts == [""] and allow_empty:
            return ()
        if any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas")
        try:
            return tuple(item(p) for p in parts)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = "list"
    return parse


def auto_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """'auto' (None: chosen by the program) or a value checked by ``kind``."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "auto" else kind(text)

    parse.__name__ = "auto_or_number"
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it tells the reader something: not for switches and
    unset options, and not twice when the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def quiet_backend() -> None:
    """TensorFlow's C++ start-up chatter (absl, before any log level applies) hides the one line a
    user needs, so TensorFlow is imported and its device initialised with fd 2 silenced; the
    chatter is replayed only if that fails. RIS_VERBOSE=1 keeps it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("RIS_VERBOSE") or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.zeros(1)
        except Exception:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


CLIENT_LOGGERS = ("milvus_lite", "pymilvus")  # log every failure with its traceback; ris says it in one line


CLIENT_LOGS_QUIET = False


def quiet_client_logs() -> None:
    """Milvus Lite and pymilvus log each failed call with its traceback (40 lines for one full disk)
    before raising; the command reports the error itself, in one line. RIS_VERBOSE=1 keeps them.
    pymilvus sets its levels when imported: ``ris.milvus_index`` calls this again after importing it."""
    global CLIENT_LOGS_QUIET
    if not os.environ.get("RIS_VERBOSE"):
        CLIENT_LOGS_QUIET = True
        for name in CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


class _QuietOnFirstImport:
    """A meta-path hook: the first import of Keras or TensorFlow goes through ``quiet_backend``.

    Why: commands that never need the network (evaluation of pooled features or of a whitening
    head, search by database row) must not pay for TensorFlow, yet the ones that do must not
    print its start-up chatter. The hook imports nothing itself and removes itself once used."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("keras", "tensorflow"):
            uninstall_quiet_backend()
            quiet_backend()
        return None  # the ordinary finders load the module


_QUIET_HOOK = _QuietOnFirstImport()


def install_quiet_backend() -> None:
    if _QUIET_HOOK not in sys.meta_path and not {"keras", "tensorflow"} & set(sys.modules):
        sys.meta_path.insert(0, _QUIET_HOOK)


def uninstall_quiet_backend() -> None:
    if _QUIET_HOOK in sys.meta_path:
        sys.meta_path.remove(_QUIET_HOOK)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: object) -> str:
    """``text`` with its control characters escaped as Python writes them (``\\n``, ``\\x1b``): a
    file name holding a newline would split a one-line error, or a results line, in two (and an
    escape sequence in one would reach the terminal)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _escape_unprintable_output() -> None:
    """File names that are not valid UTF-8 (old archives) or not in the terminal's encoding are
    printed escaped (``caf\\udce9.jpg``) instead of ending the command with an encoding error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we can change
            pass


def _one_line_warnings(prog: str) -> Callable:
    """Show ris' own warnings as the commands' warning lines, ``prog: warning: message``, instead
    of Python's two lines naming ris' source file and quoting its code; others (a library's), and
    every warning with RIS_VERBOSE=1, as Python shows them. Returns the previous ``showwarning``."""
    import warnings

    previous, package = warnings.showwarning, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def show(message, category, filename, lineno, file=None, line=None):
        if os.environ.get("RIS_VERBOSE") or not os.path.abspath(filename).startswith(package + os.sep):
            return previous(message, category, filename, lineno, file, line)
        print(f"{prog}: warning: {one_line(message)}", file=file or sys.stderr)

    warnings.showwarning = show
    return previous


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None,
        sigterm_interrupts: bool = True) -> int:
    """Run ``main`` (which returns EXIT_OK or EXIT_PARTIAL) and turn how it ends into one line and
    an exit status: ``Interrupted`` and Ctrl-C -> EXIT_INTERRUPTED; ``RisError`` and a system error
    (``OSError`` naming a file or an errno) -> 'prog: error: message', EXIT_ERROR. Anything else is a
    bug, not bad input: one line saying so, the traceback with RIS_VERBOSE=1, EXIT_ERROR.
    ``sigterm_interrupts``: SIGTERM stops the command as Ctrl-C does (its clean-up runs, exit 130),
    not Python's default death by signal (143, nothing cleaned up); servers handle it themselves.
    Both raise through ``ris.interrupts``, which never lets a garbage-collector callback drop them."""
    from ris.interrupts import raising_interrupts

    args = sys.argv[1:] if argv is None else argv
    _escape_unprintable_output()
    from ris.errors import Interrupted, RisError

    interrupts = raising_interrupts(sigterm=sigterm_interrupts)
    interrupts.__enter__()
    shown = _one_line_warnings(prog)
    try:
        if not ({"-h", "--help"} & set(args)):
            install_quiet_backend()  # TensorFlow is imported (quietly) only if the command needs it
            quiet_client_logs()
        return int(main(argv) or 0)
    except Interrupted as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RisError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        if _hdf5_write_failed():  # HDF5 would retry the failed write when the process ends, and crash
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_ERROR)
        return EXIT_ERROR
    except BrokenPipeError:  # the reader of the output left (`| head`): end quietly, as Unix tools do
        _stdout_to_devnull()
        return EXIT_PARTIAL
    except OSError as exc:
        if exc.filename is None and exc.errno is None:  # raised by code, not by the system: treat as a bug
            return _internal_error(prog, exc)
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"{prog}: error: {one_line(where)}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        return _internal_error(prog, exc)
    finally:
        import warnings

        warnings.showwarning = shown
        uninstall_quiet_backend()
        interrupts.__exit__(None, None, None)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def _hdf5_write_failed() -> bool:
    """Whether this process left an HDF5 file open after a failed write (``ris.h5write.HDF5_UNCLOSED``)."""
    h5write = sys.modules.get("ris.h5write")
    return bool(h5write is not None and h5write.HDF5_UNCLOSED)


def _internal_error(prog: str, exc: BaseException) -> int:
    """A bug: say so in one line (what it was, and how to see where), never as if the input were bad."""
    verbose = bool(os.environ.get("RIS_VERBOSE"))
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    what = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    hint = "" if verbose else "; set RIS_VERBOSE=1 for the traceback"
    print(f"{prog}: internal error (a bug in ris, not in your input): {what}{hint}", file=sys.stderr)
    return EXIT_ERROR


def given_options(args: Any, parser: Any, keys: Any) -> list[str]:
    """'--key value' for each of ``keys`` the command line set away from its default (string
    defaults converted by the option's type first, as argparse converts them): what a refusal names
    when an option would otherwise be silently ignored."""
    actions = {a.dest: a for a in parser._actions}
    shown = []
    for key in keys:
        action, value = actions[key], getattr(args, key)
        default = action.default
        if isinstance(default, str) and action.type is not None:
            default = action.type(default)
        if value != default:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            shown.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {text}"))
    return shown


def json_text(text: str) -> str:
    """``text`` as strict UTF-8 JSON can carry it. A file name that is not valid UTF-8 reaches
    Python with its bad bytes as lone surrogates ('\\udcff'), which strict parsers (Rust's, Go's)
    refuse or mangle; each such byte is written as the four characters '\\xff' instead (as
    ``bytes.decode(errors='backslashreplace')`` writes it), the rest of the name unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file system gave: escaped as Python writes it
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_safe(obj: Any) -> Any:
    """``obj`` with every string in it, keys too, through ``json_text``."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, dict):
        return {json_text(k) if isinstance(k, str) else k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """What every command's --json prints: strict UTF-8 JSON (``json_text``), ASCII-escaped."""
    json.dump(_json_safe(obj), sys.stdout, indent=2, default=lambda o: json_text(str(o)))
    sys.stdout.write("\n")
