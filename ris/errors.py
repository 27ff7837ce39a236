"""Errors a user can act on. The CLIs print them as one line and exit non-zero, no traceback."""
from __future__ import annotations


class RisError(Exception):
    """Base class: the message is shown to the user as is."""


class ModelError(RisError):
    """A model file is missing, not a ris model, or damaged; the message names the file."""


class TooFewGroups(RisError):
    """The labels leave too few groups (objects, classes) with two or more images for what was asked."""


class WeightsUnavailable(RisError):
    """Pretrained weights cannot be found or fetched; the message says how to get them."""


class BadImage(RisError):
    """An image file cannot be decoded; the message names the file and the reason."""


class DatabaseError(RisError):
    """A feature database is missing, incomplete or inconsistent with the request."""
