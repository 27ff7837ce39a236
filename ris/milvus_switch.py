"""A Milvus collection is built beside the one that serves and switched to once complete.

A build (``ris-index build --rebuild``, or a collection missing, stale or damaged) writes the new
collection under ``<name>_rebuild`` while ``<name>`` keeps serving; once its ``ris_state`` is
written (the commit), the old one is dropped and the new one renamed to ``<name>``
(``rename_collection``: Milvus Lite renames its folder, a server its metadata). Milvus has no
atomic swap by renaming, and a collection that serves under its name cannot become an alias
without being dropped first: so a kill between the drop and the rename leaves the complete new
collection under its temporary name, and the next open (``settle``) renames it into place before
anything else. A kill before the commit leaves an incomplete one, which the next open drops, in
one line, unless the process that builds it (same host, pid alive) still runs. The same calls
serve Milvus Lite and a server (pymilvus' MilvusClient).
"""
from __future__ import annotations

import json
import os
import socket
import sys

SUFFIX = "_rebuild"
BUILDER_KEY = "ris_builder"  # who builds it: {"host", "pid"}


def has_collection(client, name: str, lite: bool) -> bool:
    """Milvus Lite fails has_collection on a collection whose files are damaged (both manifests
    unreadable): that one is there, to be dropped; a server's failure is its own error."""
    try:
        return bool(client.has_collection(name))
    except Exception:  # noqa: BLE001 - pymilvus' MilvusException, Milvus Lite's words inside
        if not lite:
            raise
        return True


def drop_collection(client, name: str, lite: bool) -> None:
    if has_collection(client, name, lite):
        client.drop_collection(name)


def temp_name(name: str) -> str:
    return name + SUFFIX


def builder() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})


def _builder_runs(props: dict) -> bool:
    """The process building that collection may still run: this host's live pid, or another host
    (which cannot be asked). A record that cannot be read: no builder runs."""
    try:
        who = json.loads(props[BUILDER_KEY])
        host, pid = who["host"], int(who["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _complete(props: dict) -> bool:
    from ris.milvus_index import STATE_KEY

    try:
        return isinstance(json.loads(props[STATE_KEY]), dict)
    except (KeyError, TypeError, ValueError):
        return False


def switch(client, temp: str, name: str, lite: bool) -> None:
    """The complete ``temp`` replaces ``name`` (dropped first, then ``temp`` renamed)."""
    drop_collection(client, name, lite)
    client.rename_collection(temp, name)
    client.load_collection(name)


def settle(client, name: str, lite: bool, where: str) -> None:
    """Before ``name`` is opened: finish the switch a killed build left half-done (``name`` gone,
    its complete successor under the temporary name), or drop what a killed build left; one line
    on stderr either way. Never fails the open: what cannot be read is left alone."""
    temp = temp_name(name)
    try:
        if not has_collection(client, temp, lite):
            return
        props = client.describe_collection(temp).get("properties") or {}
    except Exception:  # noqa: BLE001 - a server's error, or a damaged Lite collection: left to the build
        return
    try:
        if _complete(props) and not has_collection(client, name, lite):
            client.rename_collection(temp, name)
            print(f"{where}: collection {name} was rebuilt by a run killed before it switched to it; "
                  f"switched to it now", file=sys.stderr)
        elif not _builder_runs(props):
            client.drop_collection(temp)
            print(f"{where}: removed collection {temp}, left by a rebuild killed "
                  f"{'before it switched to it' if _complete(props) else 'mid-way'}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - another process switched or dropped it meanwhile
        return
