"""ris-serve: a long-running search service (FastAPI on uvicorn) and the page that uses it.

Needs the ``serve`` extra: ``pip install 'ris[serve]'``.
"""
from __future__ import annotations

from ris.serve.service import SearchService, ServeConfig

__all__ = ["SearchService", "ServeConfig", "create_app"]


def create_app(*args, **kwargs):
    """See ``ris.serve.app.create_app`` (imported lazily: FastAPI is an optional extra)."""
    from ris.serve.app import create_app as make

    return make(*args, **kwargs)
