"""ris-serve: a search service over HTTP (JSON API + a web page), loaded once, then answering."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from ris.cli.common import (EXIT_ERROR, EXIT_OK, HelpFormatter, nonnegative_float, nonnegative_int, positive_float,
                            positive_int, run)

from ris.presets import PRESETS

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    from ris.index import index_arg, index_help, index_metavar
    from ris.rerank import RERANKERS

    p = argparse.ArgumentParser(
        prog="ris-serve",
        description="Serve a feature database over HTTP: a page at / where you drop a photo and see the "
                    "closest images, and a JSON API (/api/search, /api/images/ID, /api/thumbs/ID, /api/health; "
                    "OpenAPI at /openapi.json). The backbone, head, vectors and index are loaded once; rows "
                    "added by 'ris-extract --append' become searchable without a restart. Needs "
                    "pip install 'ris[serve]'.",
        formatter_class=HelpFormatter)
    add_server_args(p)
    p.add_argument("--features-db", default="feats.h5", help="HDF5 feature database from ris-extract")
    p.add_argument("--model", default=None, help="trained head (.keras from ris-train); without it, "
                   "off-the-shelf descriptors are searched")
    p.add_argument("--index", default="auto", type=index_arg, metavar=index_metavar(),
                   help="as in ris-search (built or caught up beside the database, or the Milvus collection): "
                        + index_help())
    p.add_argument("--dataset-root", default=None, help="where the database's images are now, if moved; only "
                   "files inside it are ever served")
    p.add_argument("--rotations", action="store_true",
                   help="describe every uploaded image at 0/90/180/270 degrees and let each database image keep "
                        "its best distance (phone photos that arrive turned; 4 forward passes per upload); "
                        "diffusion and kreciprocal are then not offered")
    p.add_argument("--rerank", default="auto", help="re-ranking methods a request may ask for, comma-separated "
                   f"from {', '.join(m for m in RERANKERS if m != 'none')}; 'auto' = all of them up to 20,000 "
                   "rows, only qe above; 'none' = no re-ranking. Each is prepared on first use")
    p.add_argument("--default-rerank", default=None, choices=list(RERANKERS),
                   help="the re-ranking of a search that names none (the page's menu starts there); offered "
                        "whatever --rerank auto would offer (default: none, or the preset's)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the re-ranking ris-search uses with that preset, as --default-rerank: "
                        + "; ".join(f"{name} = {s['search']['rerank']}" for name, s in PRESETS.items())
                        + " (serve a database made with ris-extract --preset of the same name)")
    return p


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The flags of the server itself (shared with ris-demo --serve)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the "
                   "service to the network (use --api-key)")
    g.add_argument("--port", type=nonnegative_int, default=8000, help="TCP port (0 = any free port; the ready line says which)")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAMES", help="host names (comma-separated) "
                   "the server answers requests addressed to, besides localhost and IP addresses: a reverse proxy's "
                   "name it passes on, this machine's name on the network; '*' = any. On a loopback address (the "
                   "default), and wherever names are given, a request addressed to another name gets 403, so a web "
                   "page elsewhere cannot reach the server by pointing a name of its own at it (DNS rebinding)")
    g.add_argument("--api-key", default=None, help="require this key on every /api/ call (header X-API-Key or "
                   "Authorization: Bearer); default: the RIS_API_KEY environment variable, which also keeps "
                   "the key out of the process list")
    g.add_argument("--max-upload-mb", type=positive_float, default=20, help="largest upload in MB (10^6 bytes); bigger "
                   "requests get HTTP 413 before they are read")
    g.add_argument("--max-megapixels", type=positive_float, default=50, help="largest upload in pixels (read from the "
                   "header before decoding); bigger images get HTTP 413")
    g.add_argument("-k", "--top-k", type=positive_int, default=12, help="results per search when a request does not say")
    g.add_argument("--max-k", type=positive_int, default=100, help="most results a request may ask for")
    g.add_argument("--slots", type=positive_int, default=2, help="searches computed at once (each uses the CNN and BLAS)")
    g.add_argument("--queue", type=nonnegative_int, default=32, help="searches that may wait for a slot; more get HTTP 503 "
                   "at once")
    g.add_argument("--queue-timeout", type=positive_float, default=30, help="seconds a search may wait for a slot before "
                   "HTTP 503")
    g.add_argument("--max-connections", type=positive_int, default=256, help="concurrent connections; more get HTTP 503 "
                   "(bounds the uploads being received at once)")
    g.add_argument("--request-timeout", type=positive_float, default=60, help="seconds a client has to send a "
                   "request's headers, and the longest an upload may go silent; a connection that stalls longer "
                   "is closed, so stalled clients cannot hold every --max-connections slot. An upload that keeps "
                   "coming is not cut by it (see --min-upload-rate)")
    g.add_argument("--min-upload-rate", type=positive_float, default=10, help="kB/s (10^3 bytes) an upload must "
                   "average: it may take --request-timeout seconds plus 1 s per this many kB, so at 10 a 20 MB "
                   "upload may take 60 + 2,000 s; a slower one is closed, so a client trickling a few bytes "
                   "cannot hold a connection either")
    g.add_argument("--reload-interval", type=nonnegative_float, default=2, help="seconds between checks of the database file "
                   "for new rows (0 = never reload)")
    g.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")


def config_from_args(args: argparse.Namespace, features_db: str, model: str | None, index: str = "auto",
                     dataset_root: str | None = None, rerank: str = "auto", default_rerank: str | None = None):
    from ris.errors import RisError
    from ris.rerank import RERANKERS
    from ris.serve.service import ServeConfig

    preset = getattr(args, "preset", None)  # ris-demo --serve has no --preset
    if default_rerank is None:
        default_rerank = PRESETS[preset]["search"]["rerank"] if preset else "none"
    if default_rerank not in RERANKERS:
        raise RisError(f"--default-rerank: unknown method {default_rerank!r}; choose from {', '.join(RERANKERS)}")

    methods = None
    if rerank != "auto":
        methods = tuple(m.strip() for m in rerank.split(",") if m.strip())
        unknown = [m for m in methods if m not in RERANKERS]
        if unknown:
            raise RisError(f"--rerank: unknown method(s) {', '.join(unknown)}; choose from {', '.join(RERANKERS)}")
        if default_rerank != "none" and default_rerank not in methods:
            given = f"--preset {preset}'s " if preset and getattr(args, "default_rerank", None) is None else ""
            raise RisError(f"{given}--default-rerank {default_rerank} is not among --rerank {rerank}; add it there")
    if getattr(args, "rotations", False):  # ris-demo --serve has no --rotations
        from ris.rotations import check_rerank

        for m in (*(methods or ()), default_rerank):
            check_rerank(m)
    if args.port > 65535:
        raise RisError(f"--port must be at most 65535, not {args.port}")
    if args.top_k > args.max_k:
        raise RisError(f"--top-k {args.top_k} is over --max-k {args.max_k}")
    if str(index).startswith("milvus://"):
        from ris.milvus_index import SERVER_MAX_TOPK

        if args.max_k > SERVER_MAX_TOPK:
            raise RisError(f"--max-k {args.max_k} is over what a Milvus server gives per query ({SERVER_MAX_TOPK}, "
                           f"--index {index}); lower --max-k")
    names = tuple(n.strip().lower() for given in getattr(args, "allow_host", []) for n in given.split(",") if n.strip())
    allowed_hosts = None if "*" in names or not (names or is_loopback(args.host)) else names
    api_key = args.api_key or os.environ.get("RIS_API_KEY") or None
    if api_key and not (api_key.isascii() and api_key.isprintable() and api_key == api_key.strip()):
        # HTTP headers are read as Latin-1: a UTF-8 client's bytes of 'clé' never match it
        raise RisError("the API key (--api-key or RIS_API_KEY) must be printable ASCII without surrounding "
                       "spaces: an HTTP header carries no other text the same way from every client")
    return ServeConfig(features_db=str(features_db), model=str(model) if model else None, index=index,
                       dataset_root=dataset_root, rerank=methods,
                       api_key=api_key,
                       max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=int(args.max_megapixels * 1e6),
                       default_k=args.top_k, max_k=args.max_k, slots=args.slots, queue=args.queue,
                       queue_timeout=args.queue_timeout, reload_interval=args.reload_interval,
                       max_connections=args.max_connections, request_timeout=args.request_timeout,
                       min_upload_rate=args.min_upload_rate * 1e3,
                       rotations=getattr(args, "rotations", False),
                       default_rerank=default_rerank, allowed_hosts=allowed_hosts)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): reachable from this machine only."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_serve_extra() -> None:
    """A clear line when FastAPI, uvicorn or python-multipart is missing."""
    import importlib.util

    from ris.errors import RisError

    for module in ("fastapi", "uvicorn", "multipart"):
        if importlib.util.find_spec(module) is None:
            raise RisError(f"the server needs the serve extra ({module} is missing): pip install 'ris[serve]'")


def serve(cfg, host: str, port: int, log_level: str = "warning", prog: str = "ris-serve") -> int:
    """Run the server until Ctrl-C or SIGTERM; EXIT_OK after that graceful stop (the normal end of a
    server, not an interruption of work), EXIT_ERROR if the engine failed to load."""
    require_serve_extra()
    import uvicorn

    from ris.featuredb import FeatureDB
    from ris.serve.app import create_app
    from ris.serve.deadline import with_request_deadline

    FeatureDB(cfg.features_db).close()  # a missing or foreign database: one line now, not after loading
    if cfg.model and not os.path.isfile(cfg.model):
        from ris.errors import RisError

        raise RisError(f"{cfg.model}: model file not found")
    if host not in LOOPBACK and not cfg.api_key:
        print(f"{prog}: warning: listening on {host} without --api-key: anyone who can reach this port can "
              f"search and read the collection's images", file=sys.stderr)
    outcome = {"code": EXIT_OK}
    server: uvicorn.Server

    async def announce(svc) -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        shown = f"[{host}]" if ":" in host else host
        h = svc.health()
        print(f"{prog}: ready: {h['rows']} images ({h['model']}, {h['index']} index) at "
              f"http://{shown}:{bound}/", flush=True)

    def on_ready(svc) -> None:
        asyncio.get_running_loop().create_task(announce(svc))

    def on_fatal(message: str) -> None:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        outcome["code"] = EXIT_ERROR
        server.should_exit = True

    print(f"{prog}: loading {cfg.features_db}" + (f" with {cfg.model}" if cfg.model else "") + " ...",
          file=sys.stderr, flush=True)
    app = create_app(cfg, on_ready=on_ready, on_fatal=on_fatal)
    server = _server_class(uvicorn, prog, os.dup(2))(uvicorn.Config(
                                           app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_keep_alive=5, server_header=False,
                                           timeout_graceful_shutdown=STOP_GRACE_S,
                                           limit_concurrency=cfg.max_connections,
                                           http=with_request_deadline(cfg.request_timeout, cfg.min_upload_rate)))
    _run_until_stopped(server)
    if outcome["code"] == EXIT_OK and not server.started:
        from ris.errors import RisError

        raise RisError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    return outcome["code"]


class _Stopped(Exception):
    pass


STOP_GRACE_S = 5  # on Ctrl-C/SIGTERM, requests in flight get this long; then they are cancelled


def _server_class(uvicorn, prog: str, stderr_fd: int = 2):
    """uvicorn's server, saying once that it stops (the signal's name, before the requests in flight
    finish), so a service manager's log shows why the server went away. ``stderr_fd``: a copy of
    stderr taken before the engine loads, since the load points fd 2 at a sink while TensorFlow is
    imported (``ris.cli.common.quiet_backend``), and a line written to fd 2 meanwhile is lost."""
    import signal

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = str(sig)
                # os.write: a handler may interrupt a print to stderr in progress (a reentrant print raises)
                os.write(stderr_fd, f"{prog}: stopping ({name}): requests in flight get at most {STOP_GRACE_S} s\n".encode())
            super().handle_exit(sig, frame)

    return Server


def _run_until_stopped(server) -> None:
    """Serve until Ctrl-C or SIGTERM. uvicorn shuts down gracefully, then re-raises the signal;
    for a server that is the normal way to stop, so it ends here (exit 0) instead of killing us."""
    import signal
    import threading

    def stop(signum, frame):
        raise _Stopped()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass
    except SystemExit:  # uvicorn exits when it cannot bind the address
        server.started = False
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, args.features_db, args.model, args.index, args.dataset_root, args.rerank,
                           args.default_rerank)
    from ris.presets import warn_other_recipe

    warn_other_recipe("ris-serve", args.preset, args.features_db)
    return serve(cfg, args.host, args.port, args.log_level)


def entry() -> None:
    # SIGTERM before it serves ends it as Ctrl-C does (one line, 130), not Python's silent death by signal;
    # once serving, the server's own handler stops it gracefully (exit 0)
    code = run("ris-serve", main)
    exit_now(code)


def exit_now(code: int) -> None:
    """End the process once the server has stopped. Python's own exit garbage-collected every object
    Keras and the engine made (seconds); the engine's load runs in a daemon thread, so a stop while it
    loads does not wait for it."""
    import gc

    gc.freeze()  # the final collections skip what exists now
    sys.exit(code)


if __name__ == "__main__":
    entry()
