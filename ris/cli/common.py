"""What every ris command shares: quiet TensorFlow, one-line errors, exit codes, --json."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


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


def _escape_unprintable_output() -> None:
    """File names that are not valid UTF-8 (old archives) or not in the terminal's encoding are
    printed escaped (``caf\\udce9.jpg``) instead of ending the command with an encoding error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we can change
            pass


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a RisError or OSError becomes 'prog: error: message' and a non-zero exit."""
    args = sys.argv[1:] if argv is None else argv
    _escape_unprintable_output()
    if not ({"-h", "--help"} & set(args)):
        quiet_backend()
    from ris.errors import RisError

    try:
        return int(main(argv) or 0)
    except RisError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if str(exc).startswith("interrupted") else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:
        name = getattr(exc, "filename", None)
        where = f"{name}: " if name else ""
        print(f"{prog}: error: {where}{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return EXIT_ERROR


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
