"""Which databases use a Milvus collection, and dropping those a database left behind.

Collections are named per database lineage and kind of vectors (``ris_<lineage>_<raw|emb_...>``),
so a database replaced by ``ris-extract --overwrite`` (a new lineage) or a head replaced by
another ``ris-train``'d model at the same path left its collection behind for ever. A collection
records who used it (``ris_users``: host, database file, model file) when a database opens it;
one is dropped only when every recorded user is this very database, and it can no longer use
it: its lineage is one that this database file replaced (``replaced_lineages``, written by
``--overwrite``: a database moved away and replaced by a new one is not such a proof), or it
holds another head's embeddings for the model file this database is searched with now. A
collection of another database, of a copy that opened it, of unknown users (made before users
were recorded) or damaged is kept.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections import Counter

USERS_KEY = "ris_users"
MAX_USERS = 32  # past it: marked crowded and never dropped (a property stays small)
_IN_USE: Counter = Counter()  # (Milvus uri, collection) -> indexes of this process open on it (ris-serve's
_IN_USE_LOCK = threading.RLock()  # reload opens the new one beside the old, which may still answer requests)


def user_of(source: dict | None) -> dict | None:
    """This process' user record for a source (``ris.index_state.source_of``): None without a database."""
    db = (source or {}).get("database")
    if not db:
        return None
    model = source.get("model")
    return {"host": socket.gethostname(), "db": os.path.realpath(db),
            "model": os.path.realpath(model) if model else None}


def _props(client, name: str) -> dict:
    return client.describe_collection(name).get("properties") or {}


def _users(props: dict) -> list | None:
    """The recorded users; None when unknown (none recorded, crowded, unreadable)."""
    try:
        users = json.loads(props[USERS_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(users, list) or not all(isinstance(u, dict) for u in users) or "crowded" in users:
        return None
    return users


def record_user(client, name: str, source: dict | None) -> None:
    """Add this database (and model) to the collection's users, once."""
    me = user_of(source)
    if me is None:
        return
    props = _props(client, name)
    try:
        users = json.loads(props.get(USERS_KEY, "[]"))
    except (TypeError, ValueError):
        users = []
    if not isinstance(users, list) or me in users or "crowded" in users:
        return
    users = users + [me] if len(users) < MAX_USERS else ["crowded"]
    client.alter_collection_properties(name, properties={USERS_KEY: json.dumps(users)})


def _why_stale(props: dict, me: dict, source: dict) -> str | None:
    """Why this database alone used the collection and cannot use it now; None: keep it."""
    users = _users(props)
    if not users or any(u.get("host") != me["host"] or u.get("db") != me["db"] for u in users):
        return None
    try:
        built = json.loads(props["ris_state"])["source"] or {}
    except (KeyError, TypeError, ValueError):
        return None
    lineage, vectors = built.get("lineage"), str(built.get("vectors", ""))
    if lineage and lineage != source.get("lineage"):
        replaced = source.get("replaced_lineages") or ()
        return "its database was replaced by ris-extract --overwrite" if lineage in replaced else None
    mine = str(source.get("vectors", ""))
    if (lineage and vectors.startswith("emb-") and mine.startswith("emb-") and vectors != mine
            and me["model"] and all(u.get("model") == me["model"] for u in users)):
        return f"another model replaced its head at {me['model']}"
    return None


def drop_left_behind(client, name: str, source: dict | None, where: str, busy=lambda name: False) -> list[str]:
    """Drop the collections this database left behind (see the module's docstring) beside ``name``,
    the one it uses, but those ``busy`` (open in this process); say so in one line. Never fails
    the caller: a collection that cannot be read is kept."""
    me = user_of(source)
    if me is None:
        return []
    dropped, reasons = [], {}
    try:
        names = [n for n in client.list_collections() if n.startswith("ris_") and n != name and not busy(n)]
    except Exception:  # noqa: BLE001 - pymilvus' errors: nothing is dropped
        return []
    for other in names:
        try:
            why = _why_stale(_props(client, other), me, source)
            if why is not None:
                client.drop_collection(other)
                dropped.append(other)
                reasons.setdefault(why, []).append(other)
        except Exception:  # noqa: BLE001 - a damaged or busy collection is kept
            continue
    if dropped:
        said = "; ".join(f"{', '.join(n)}: {why}" for why, n in reasons.items())
        print(f"{where}: removed {len(dropped)} collection{'s' * (len(dropped) > 1)} this database left behind "
              f"({said})", file=sys.stderr)
    return dropped


def users_before_rebuild(client, name: str) -> str | None:
    """The users property of the collection about to be dropped and made again, to carry over: a
    rebuilt collection serves the same databases (else a copy's use of it would be forgotten)."""
    try:
        return _props(client, name).get(USERS_KEY) if client.has_collection(name) else None
    except Exception:  # noqa: BLE001 - damaged: its users are unknown
        return None


def own(client, name: str, source: dict | None, where: str) -> tuple[str, str]:
    """``open_milvus``: count the collection as open here, record this database among its users and
    drop those it left behind; the key ``let_go`` gives back. Never fails the open."""
    from ris.milvus_index import parse_target

    uri = parse_target(where.removeprefix("milvus:"))[0]
    with _IN_USE_LOCK:
        _IN_USE[(uri, name)] += 1
    try:
        record_user(client, name, source)
    except Exception:  # noqa: BLE001 - unrecorded, it is only never dropped: the search goes on
        return (uri, name)
    drop_left_behind(client, name, source, where, busy=lambda other: _IN_USE[(uri, other)] > 0)
    return (uri, name)


def let_go(client, arg: str, key: tuple[str, str]) -> None:
    """The index is closed or dropped: the collection no longer open through it; the client given back."""
    from ris.milvus_index import disconnect

    with _IN_USE_LOCK:
        _IN_USE[key] -= 1
        if _IN_USE[key] <= 0:
            del _IN_USE[key]
    disconnect(client, arg)
