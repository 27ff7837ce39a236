"""The upload form of ``POST /api/search``: how it is read, and one sentence for each way a client
sends it wrong.

Why here: FastAPI (Starlette and python-multipart underneath) parses the form before the route
runs, and its own answers named a Python type ("Expected UploadFile, received: <class 'str'>") or
said only "Invalid multipart data.", with no word on what to send instead.
"""
from __future__ import annotations

FIELD = "image"
HOW = f"send the image as a multipart/form-data file field named {FIELD} (curl -F {FIELD}=@photo.jpg)"
PART_HEADER_LIMIT = 32 << 10  # a part's header line (the file name's); inside the body cap's 64 kB slack


def allow_long_part_headers(limit: int = PART_HEADER_LIMIT) -> None:
    """Let a part's header line be up to ``limit`` bytes (python-multipart's default is 4 kB).

    Why: a file name over ~4,000 characters made the whole upload "Invalid multipart data.", yet the
    name is only shown (shortened). Starlette passes no such setting to its parser, so the parser
    class Starlette uses gets the larger default, for the whole process; a caller that passes its
    own limit keeps it. Idempotent.
    """
    from starlette import formparsers

    base = formparsers.multipart.MultipartParser
    if getattr(base, "part_header_limit", 0) >= limit:
        return

    class Parser(base):  # type: ignore[misc, valid-type]
        part_header_limit = limit

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("max_header_size", limit)
            super().__init__(*args, **kwargs)

    formparsers.multipart.MultipartParser = Parser


def quiet_parser_log() -> None:
    """python-multipart logs each malformed body it refuses (a warning: 'Expected boundary character
    45, got 255 at index 2') and then raises, which the client is answered (400, ``unreadable``);
    logged too, any client could fill the server's log with lines that name neither it nor the
    server. Its errors (a temporary file that cannot be made: the server's own trouble) still show."""
    import logging

    for name in ("python_multipart", "multipart"):  # the package's name, and its name before 0.0.13
        logging.getLogger(name).setLevel(logging.ERROR)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def not_a_file(content_type: str | None, errors: list[dict]) -> tuple[int, str] | None:
    """(status, sentence) for a search upload whose image never reached the route as a file: a
    body that is not multipart/form-data (415), a text field named ``image`` or none (422); None
    when the validation errors are about something else (``k`` not a number, ...)."""
    kind = media_type(content_type)
    if kind != "multipart/form-data":
        sent = f"a body of type {kind}" if kind else "a body without a Content-Type"
        return 415, f"the search got {sent}; {HOW}."
    for e in errors:
        if tuple(e.get("loc", ()))[-1:] == (FIELD,):
            what = "missing" if e.get("type") == "missing" else "the field is text, not a file"
            return 422, f"{FIELD}: {what}; {HOW}."
    return None


NO_BOUNDARY = "Missing boundary in multipart."  # Starlette's, for a Content-Type without boundary=
PARSER_ERRORS = ("Invalid multipart data.", NO_BOUNDARY)  # Starlette's answers worded here instead


def unreadable(exc: BaseException) -> str:
    """The sentence for a multipart body python-multipart could not parse (Starlette said only
    "Invalid multipart data."): a header line over the limit is named, as it is the file name's;
    a Content-Type without its boundary is most often one set by hand (requests' ``files=`` with
    ``headers={"Content-Type": "multipart/form-data"}``), which drops the body's boundary."""
    if getattr(exc, "detail", None) == NO_BOUNDARY:
        return ("the upload's Content-Type is multipart/form-data without the boundary its body uses (a "
                f"Content-Type header set by hand? let the client set it); {HOW}.")
    cause = exc.__context__.__cause__ if exc.__context__ is not None else None
    if "header size" in str(cause).lower():
        return (f"a header of the upload's multipart body is over {PART_HEADER_LIMIT >> 10} kB (a file name that "
                "long?); send the image with a shorter file name.")
    return f"the upload's multipart/form-data body is malformed; {HOW}."
