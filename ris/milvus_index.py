"""A Milvus collection as the index: Milvus Lite (embedded) or a Milvus server or cluster.

``--index milvus:PATH.db`` opens (creating it if needed) a Milvus Lite data folder;
``--index milvus://HOST:PORT`` a Milvus server (token from ``RIS_MILVUS_TOKEN`` if it needs
one). The client code is the same for both (pymilvus, the optional extra ``ris[milvus]``).
One collection per database lineage and kind of vectors, ``ris_<lineage>_<vectors>``, holds
(id = the database's stable id, path, label, vector) with an HNSW index; it follows the
database like the other index kinds (``ris.index_state``): removed images are deleted,
appended ones upserted (idempotent, so an update killed half-way is redone), and the cursor is
kept in the collection's ``ris_state`` property, written last: a collection without it is never
trusted. A build is made beside the collection that serves and replaces it once complete
(``ris.milvus_switch``). Tested against Milvus Lite and a standalone Milvus server (README).
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import weakref

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Milvus Lite runs faiss in-process: see ris.faiss_index

import numpy as np  # noqa: E402

from ris.errors import DatabaseError, RisError  # noqa: E402
from ris.index_state import RowMap, catch_up, ids_of, saved_source, to_rows  # noqa: E402
from ris.milvus_lite import foreign_folder, lite_open_problem  # noqa: E402
from ris.milvus_switch import drop_collection, has_collection  # noqa: E402
from ris.stored_rows import StoredRows  # noqa: E402
from ris.topk import METRICS  # noqa: E402

STATE_KEY = "ris_state"
BATCH = 5000
_METRIC = {"euclidean": "L2", "cosine": "COSINE"}
HNSW_PARAMS = {"M": 16, "efConstruction": 200}
SERVER_MAX_TOPK = 16384  # a Milvus server's topk limit (Milvus Lite has none)


def _pymilvus():
    try:
        import pymilvus
    except ImportError as exc:
        raise RisError("the milvus index needs pymilvus: pip install 'ris[milvus]' "
                       "(or use --index exact|hnsw|ivfpq)") from exc
    cli = sys.modules.get("ris.cli.common")
    if getattr(cli, "CLIENT_LOGS_QUIET", False):  # a command: its errors come in one line (pymilvus
        cli.quiet_client_logs()  # configured its loggers when imported, over the command's levels)
    return pymilvus


def parse_target(arg: str) -> tuple[str, bool]:
    """'//host:port' -> ('http://host:port', False); 'x.db' -> (absolute path, True)."""
    if arg.startswith("//"):
        if not re.fullmatch(r"//[A-Za-z0-9_.\-\[\]:]+:\d+/?", arg):
            raise RisError(f"milvus:{arg}: expected milvus://HOST:PORT")
        return "http:" + arg.rstrip("/"), False
    if not arg.endswith(".db"):
        raise RisError(f"milvus:{arg}: a Milvus Lite path must end in .db (e.g. milvus:feats.milvus.db)")
    return os.path.abspath(arg), True


_LITE_CLIENTS: dict[str, int] = {}  # Milvus Lite path -> clients of this process open on it
_LITE_LOCK = threading.RLock()  # re-entrant: a dropped index's finalizer may run (GC) inside it


def connect(arg: str):
    """A client of the server or Milvus Lite file ``arg`` names; give it back with ``disconnect``."""
    uri, lite = parse_target(arg)
    if lite and os.path.lexists(uri) and not os.path.isdir(uri):
        raise RisError(f"cannot open Milvus Lite data {uri}: it is not a folder (Milvus Lite keeps a collection in a "
                       "folder named *.db); name a new one or an existing Milvus Lite folder")
    if lite and os.path.isdir(uri) and foreign_folder(uri):
        raise RisError(f"cannot open Milvus Lite data {uri}: it is not a Milvus Lite folder (it holds other files, and "
                       "no LOCK or collections/ of Milvus Lite); name a new *.db path or an existing Milvus Lite folder")
    if lite and not os.path.isdir(os.path.dirname(uri)):
        raise RisError(f"cannot open Milvus Lite data {uri}: its folder {os.path.dirname(uri)} does not exist")
    pm = _pymilvus()
    try:
        client = pm.MilvusClient(uri, token=os.environ.get("RIS_MILVUS_TOKEN", "")) if not lite \
            else pm.MilvusClient(uri)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises its own and grpc's errors
        if lite:
            raise RisError(f"cannot open Milvus Lite data {uri}: {lite_open_problem(uri) or exc}") from None
        raise RisError(f"cannot open Milvus server {uri}: {exc}") from None
    if lite:
        with _LITE_LOCK:
            _LITE_CLIENTS[uri] = _LITE_CLIENTS.get(uri, 0) + 1
    return client


def disconnect(client, arg: str) -> None:
    """Close ``client``; the last one of this process on a Milvus Lite file also stops the
    in-process server pymilvus started for it, which holds the file's lock (another process can
    open it then, not only after this one exits)."""
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing what may be broken already
        pass
    uri, lite = parse_target(arg)
    if not lite:
        return
    with _LITE_LOCK:
        left = _LITE_CLIENTS.get(uri, 0) - 1
        if left > 0:
            _LITE_CLIENTS[uri] = left
            return
        _LITE_CLIENTS.pop(uri, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except Exception:  # noqa: BLE001 - another Milvus Lite version: the lock goes at exit, as before
        pass


def _said(exc: BaseException) -> str:
    """pymilvus' MilvusException in its server's own words (its str() wraps them in a repr)."""
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) and message else f"{type(exc).__name__}: {exc}"


def _is_lite(where: str) -> bool:
    """``where``: 'milvus:TARGET' or TARGET."""
    return parse_target(where.removeprefix("milvus:"))[1]


def collection_name(source: dict | None, vectors_path: str) -> str:
    """``ris_<lineage>_<vectors>``: one per database lineage (appends and removals keep it) and kind
    of vectors (raw features or one head's embeddings)."""
    import hashlib

    lineage = (source or {}).get("lineage") or hashlib.sha1(os.path.abspath(vectors_path).encode()).hexdigest()
    vectors = str((source or {}).get("vectors", "raw"))
    tag = "raw" if vectors == "raw" else "emb_" + hashlib.sha1(vectors.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_]", "_", f"ris_{str(lineage)[:16]}_{tag}")


def _text(name: str, limit: int) -> str:
    """Milvus strings must be valid UTF-8: a non-UTF-8 file name is stored escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:limit]


class MilvusIndex:
    """A collection, searched by vector; ``search`` answers database row numbers (see ``rowmap``)
    and, once ``open_milvus`` has attached the stored rows, exact search's distances."""

    kind = "milvus"

    def __init__(self, client, name: str, dim: int, metric: str, where: str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.client, self.name, self.dim, self.metric, self.where = client, name, int(dim), metric, where
        self.target = name  # the name it serves under: ``create`` builds beside it, ``save`` switches
        self.source: dict | None = None
        self.next_id = self.removed_seen = self.fingerprint_rows = 0
        self.fingerprint: str | None = None
        self.rowmap: RowMap | None = None
        self.describe = None  # (start, end) -> (paths, labels) of database rows, from the source
        self.fresh = False  # a new collection: insert; else upsert (idempotent re-runs)
        self.ef = 128
        self._release = None  # open_milvus: gives the client back once, by close() or when dropped
        self.stored = None  # the database's rows (StoredRows), attached by open_milvus: exact distances

    # -- the collection ------------------------------------------------------------------------
    @classmethod
    def create(cls, client, name: str, dim: int, metric: str, where: str) -> "MilvusIndex":
        """An empty collection that ``save`` switches to under ``name`` once complete; until then it
        is built beside it (``ris.milvus_switch``), any one of that temporary name dropped first."""
        from ris.milvus_owners import USERS_KEY, users_before_rebuild
        from ris.milvus_switch import BUILDER_KEY, builder, temp_name

        pm = _pymilvus()
        users, temp = users_before_rebuild(client, name), temp_name(name)
        drop_collection(client, temp, _is_lite(where))
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        schema.add_field("path", pm.DataType.VARCHAR, max_length=4096)
        schema.add_field("label", pm.DataType.VARCHAR, max_length=1024)
        schema.add_field("vector", pm.DataType.FLOAT_VECTOR, dim=int(dim))
        params = client.prepare_index_params()
        params.add_index("vector", index_type="HNSW", metric_type=_METRIC[metric], params=HNSW_PARAMS)
        client.create_collection(temp, schema=schema, index_params=params, consistency_level="Strong")
        props = {BUILDER_KEY: builder(), **({USERS_KEY: users} if users else {})}
        client.alter_collection_properties(temp, properties=props)
        self = cls(client, temp, dim, metric, where)
        self.fresh, self.target = True, name
        return self

    @classmethod
    def load(cls, client, name: str, where: str) -> "MilvusIndex":
        """The collection with its saved state; DatabaseError if it has none (a killed build) or,
        in Milvus Lite, if its files cannot be read (a server's failure stays its own error: a
        collection is never rebuilt for a dropped connection)."""
        lite = _is_lite(where)
        try:
            props = client.describe_collection(name).get("properties") or {}
        except Exception as exc:  # noqa: BLE001 - pymilvus' errors
            if not lite:
                raise
            raise DatabaseError(f"collection {name} is damaged ({_said(exc)})") from None
        if props.get(STATE_KEY) == "":  # emptied by an older ris-index build --rebuild
            raise DatabaseError("a rebuild was asked for (ris-index build --rebuild)")
        try:
            state = json.loads(props[STATE_KEY])
            self = cls(client, name, int(state["dim"]), state["metric"], where)
            self.next_id, self.removed_seen = int(state["next_id"]), int(state["removed_seen"])
            self.source = state.get("source")
            self.fingerprint, self.fingerprint_rows = state.get("fingerprint"), int(state.get("fingerprint_rows", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatabaseError(f"{where}: collection {name} has no complete ris state ({exc}): "
                                f"its build was interrupted") from None
        try:
            client.load_collection(name)
        except Exception as exc:  # noqa: BLE001 - a truncated index file: faiss' read error
            if not lite:
                raise
            raise DatabaseError(f"collection {name} is damaged ({_said(exc)})") from None
        return self

    def save(self, _path: str | None = None) -> None:
        """Commit: the cursor goes into the collection's properties, after the data."""
        state = {"format": 1, "dim": self.dim, "metric": self.metric, "next_id": self.next_id,
                 "removed_seen": self.removed_seen, "source": saved_source(self.source),
                 "fingerprint": self.fingerprint, "fingerprint_rows": self.fingerprint_rows}
        self.client.flush(self.name)
        self.client.alter_collection_properties(self.name, properties={STATE_KEY: json.dumps(state)})
        if self.target != self.name:  # a new collection, complete: it replaces the one under its name
            from ris.milvus_switch import switch

            switch(self.client, self.name, self.target, _is_lite(self.where))
            self.name = self.target
        self.fresh = False

    def roll_back(self, source: dict | None) -> bool:
        """Serve an earlier state of the collection's database (``cp f.h5 g.h5``, ``--append`` onto
        g.h5, then f.h5 searched) by deleting the ids appended since, not by a rebuild. Only when
        that state is in the collection's history and no removal followed it: its other rows are then
        exactly the database's (ids are never reused along one history). Saved at once: one killed
        half-way leaves a count that disagrees, which is rebuilt."""
        built, removed = self.source or {}, (source or {}).get("removed")
        if (source is None or source.get("ids") is None or source.get("next_id") is None
                or any(built.get(k) != source.get(k) for k in ("vectors", "lineage"))
                or source.get("content_id") not in (built.get("history") or [])
                or self.removed_seen != (0 if removed is None else len(removed))):
            return False
        next_id, seen = int(source["next_id"]), set()
        while ids := [int(r["id"]) for r in self.client.query(self.name, filter=f"id >= {next_id}",
                                                              output_fields=["id"], limit=BATCH)]:
            if seen.intersection(ids):
                raise DatabaseError(f"{self.where}: collection {self.name}: rows appended by another copy of "
                                    "the database could not be deleted")
            seen.update(ids)
            self.client.delete(self.name, ids=ids)
        self.next_id, self.source = next_id, saved_source(source)
        self.save()
        return True

    def disagrees(self, source: dict | None, rows: int, probe: int = 16) -> str | None:
        """Why the collection's rows are not the database's although its count agrees (None if
        they are): the newest ids and a spread of others must be there, the latest removed ones
        gone. Milvus Lite falls back to an older save of its data when the last one is damaged,
        while the ris state, kept elsewhere, says the newer one: counts can then agree by chance."""
        ids = ids_of(source, rows)
        if not len(ids):
            return None
        spread = ids[np.unique(np.linspace(0, len(ids) - 1, probe).astype(np.int64))]
        expected = sorted({int(i) for i in np.concatenate([ids[-probe:], spread])})
        removed = [] if source is None or source.get("removed") is None else \
            sorted({int(i) for i in np.asarray(source["removed"], np.int64)[-probe:]})
        found = {int(r["id"]) for r in self.client.query(self.name, filter=f"id in {expected + removed}",
                                                         output_fields=["id"])}
        missing, stale = sorted(set(expected) - found), sorted(found & set(removed))
        if missing or stale:
            return (f"its rows are not the database's (ids {missing[:5]} missing, removed ids {stale[:5]} still "
                    f"there): was the collection restored or rolled back?")
        return None

    def __len__(self) -> int:
        self.client.load_collection(self.name)
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    # -- following the database ----------------------------------------------------------------
    def add_ids(self, vectors: np.ndarray, ids: np.ndarray, start_row: int | None = None) -> None:
        vectors = np.asarray(vectors, np.float32)
        paths, labels = (self.describe(start_row, start_row + len(ids)) if self.describe is not None
                         and start_row is not None else ([""] * len(ids), [""] * len(ids)))
        write = self.client.insert if self.fresh else self.client.upsert
        for s in range(0, len(ids), BATCH):
            rows = [{"id": int(i), "path": _text(p, 4096), "label": _text(l, 1024), "vector": v}
                    for i, p, l, v in zip(ids[s : s + BATCH], paths[s : s + BATCH], labels[s : s + BATCH],
                                          vectors[s : s + BATCH])]
            write(self.name, rows)
        if len(ids):
            self.next_id = max(self.next_id, int(np.max(ids)) + 1)

    def remove_ids(self, ids: np.ndarray) -> int:
        ids = [int(i) for i in np.asarray(ids, np.int64)]
        for s in range(0, len(ids), BATCH):
            self.client.delete(self.name, ids=ids[s : s + BATCH])
        return len(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(queries, np.float32))
        k = int(k)
        if k <= 0 or not len(q):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if k > SERVER_MAX_TOPK and not _is_lite(self.where):  # the server's own refusal comes after the call
            raise RisError(f"{self.where}: {k} results asked for, a Milvus server gives at most {SERVER_MAX_TOPK} "
                           "per query; ask for fewer, or use --index exact|hnsw|ivfpq (or Milvus Lite)")
        res = self.client.search(self.name, data=q.tolist(), limit=k, output_fields=["id"],
                                 search_params={"metric_type": _METRIC[self.metric], "params": {"ef": max(self.ef, k)}})
        dist = np.full((len(q), k), np.inf, np.float32)
        labels = np.full((len(q), k), -1, np.int64)
        for i, hits in enumerate(res):
            for j, h in enumerate(list(hits)[:k]):
                labels[i, j] = int(h["id"])
                d = float(h["distance"])
                dist[i, j] = np.sqrt(max(d, 0.0)) if self.metric == "euclidean" else 1.0 - d
        found = min(k, max((int((labels[i] >= 0).sum()) for i in range(len(q))), default=0))
        dist, rows = to_rows(dist, labels, self.rowmap, found)
        return (dist, rows) if self.stored is None else self._exact(q, dist, rows)

    def _exact(self, q: np.ndarray, dist: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distances exact search shows (``ris.topk.exact_shown``, from the stored rows), in
        place of Milvus' float32 ones (a float32 step off: 1e-3 at 10^4; 1 - cosine of near-
        duplicates far more), each query's results re-sorted by them."""
        from ris.topk import exact_shown

        for i in range(len(q)):
            d, r = exact_shown(q[i : i + 1], dist[i : i + 1], rows[i : i + 1], self.stored.read, self.metric)
            n = d.shape[1]
            dist[i, :n], rows[i, :n], dist[i, n:], rows[i, n:] = d[0], r[0], np.inf, -1
        return dist, rows

    def close(self) -> None:
        client, self.client = self.client, None
        if self.stored is not None:
            self.stored.close()
        if self._release is not None:
            self._release()  # a weakref.finalize: runs let_go (disconnect) once, here or when dropped
        elif client is not None:
            disconnect(client, self.where.split(":", 1)[1])


def open_milvus(req):
    """``--index milvus:...``: the database's collection, created or caught up, ready to search."""
    from ris.index import open_saved

    client = connect(req.arg)
    name = collection_name(req.source, req.vectors_path)
    where = f"milvus:{req.arg}"
    dim = int(req.features.shape[1])

    def load(_):
        index = MilvusIndex.load(client, name, where)
        index.describe = (req.source or {}).get("describe")
        index.roll_back(req.source)  # an earlier copy of the database than the collection's
        return index

    def build():
        index = MilvusIndex.create(client, name, dim, req.metric, where)
        index.describe = (req.source or {}).get("describe")
        catch_up(index, req.features, req.source, chunk_rows=50000, progress=req.rows > 50000, name="milvus")
        return index

    def exists(_):
        return has_collection(client, name, parse_target(req.arg)[1])

    try:
        from ris.milvus_switch import settle

        settle(client, name, parse_target(req.arg)[1], where)  # what a killed build left
        index = open_saved(req, f"{where} collection {name}", load, build, "milvus", exists=exists)
    except BaseException as exc:
        disconnect(client, req.arg)
        if isinstance(exc, RisError) or not isinstance(exc, Exception):
            raise
        raise RisError(f"{where}: {_said(exc)}") from None
    # an index dropped unclosed (ris-serve's reload drops the old engine while requests may still
    # use it) gives its client back when collected: else the last close never stops Milvus Lite
    from ris.milvus_owners import let_go, own

    index._release = weakref.finalize(index, let_go, client, req.arg, own(client, name, req.source, where))
    index.stored = StoredRows(req.features)
    return index


