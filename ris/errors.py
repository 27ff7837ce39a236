"""Errors a user can act on. The CLIs print them as one line and exit non-zero, no traceback.

Anything else that escapes a command is a bug: ``ris.cli.common.run`` says so in one line (the
traceback with ``RIS_VERBOSE=1``) instead of passing it off as bad input.
"""
from __future__ import annotations


class RisError(Exception):
    """Base class: the message is shown to the user as is."""


class ModelError(RisError):
    """A model file is missing, not a ris model, or damaged; the message names the file."""


class TooFewGroups(RisError):
    """The labels leave too few groups (objects, classes) with two or more images for what was asked."""


class Interrupted(RisError):
    """The run was stopped (Ctrl-C, SIGTERM) with its work kept; running it again resumes it."""


class WeightsUnavailable(RisError):
    """Pretrained weights cannot be found or fetched; the message says how to get them."""


class BadWeights(WeightsUnavailable):
    """A weights file is there but does not hold weights this model can load; the message says why."""


class BadImage(RisError):
    """An image file cannot be decoded; the message names the file and the reason."""


class DatabaseError(RisError):
    """A feature database is missing, incomplete or inconsistent with the request."""


class BadChoice(RisError, ValueError):
    """A value the caller chose is not one of those offered (a re-ranking, an index kind, ``k``);
    also a ValueError, which it was before."""


def yes_no(name: str, value: object) -> bool:
    """``value`` (True/False, 1/0, a NumPy bool) as a bool, else a ``BadChoice`` naming ``name``. Why:
    every non-empty string is true, so ``overwrite='false'`` read from a config file replaced a database."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if isinstance(value, bool) or numpy_bool or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise BadChoice(f"{name} must be True or False, not {value!r}")
