"""Command line of tools/rate_parts.py: ``serve``, ``export`` (CSV) and ``curve`` (PNG)."""
import argparse
import logging
import os
import sys

__all__ = ["build_parser", "main"]


def build_parser():
    p = argparse.ArgumentParser(prog="rate_parts.py", description="Purity rating of part-cluster collages.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the rating web app")
    s.add_argument("--collages", action="append", required=True, metavar="DIR",
                   help="collage dir made by tools/make_collages.py; repeat once per method")
    s.add_argument("--method", action="append", default=[], metavar="NAME",
                   help="method name per --collages, in the same order (default: index.json 'method' or dir name)")
    s.add_argument("--db", required=True, help="SQLite file of ratings (created if absent)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--timeout", type=float, default=30.0,  # server.REQUEST_TIMEOUT_S
                   help="seconds a connection may stall mid-request before it is answered 408 / closed")
    s.add_argument("--seed", type=int, default=0, help="seed of the order collages are shown in")
    s.add_argument("--sorted", action="store_true", help="show collages method by method, sorted by id")
    e = sub.add_parser("export", help="write every rating as CSV")
    e.add_argument("--db", required=True)
    e.add_argument("--csv", required=True)
    c = sub.add_parser("curve", help="plot precision vs rating (paper Fig 4) as PNG")
    c.add_argument("--db", required=True)
    c.add_argument("--png", required=True)
    c.add_argument("--title", default="Purity rating")
    return p


def _serve(args):
    from .server import RatingApp, load_method, make_server

    if args.method and len(args.method) != len(args.collages):
        raise SystemExit(f"give one --method per --collages ({len(args.collages)}), or none; got {len(args.method)}")
    names = args.method or [None] * len(args.collages)
    app = RatingApp([load_method(d, n) for d, n in zip(args.collages, names)], args.db, args.seed,
                    shuffle=not args.sorted)
    server = make_server(app, args.host, args.port, timeout=args.timeout)
    host, port = server.server_address[:2]
    # Tests and scripts wait for this exact line to know the server accepts connections.
    print(f"serving {len(app.queue)} collages of {len(app.methods)} method(s) on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    from .db import RatingDB

    if not os.path.isfile(args.db):
        raise SystemExit(f"no ratings database at {args.db!r} (made by 'rate_parts.py serve --db ...')")
    db = RatingDB(args.db)
    if args.command == "export":
        n = db.export_csv(args.csv)
        print(f"wrote {n} ratings to {args.csv}")
    else:
        from .curve import plot_precision_curve

        curves = plot_precision_curve(db.rows(), args.png, args.title)
        for method, (levels, prec, n) in curves.items():
            print(f"{method} ({n} collages): " + "  ".join(f">={r}: {p:.3f}" for r, p in zip(levels, prec)))
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
