"""Command line: `critlib score -p PARAMS.yaml [-o OUTDIR] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from . import CritlibError, __version__


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", help="params YAML (default: built-in defaults)")
    p.add_argument("-o", "--outdir", help="output folder (default: the params' output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="critlib", description="Find and test the critical weights of an LLM.")
    ap.add_argument("--version", action="version", version=f"critlib {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("score", help="Phase 1: sensitivity scores, top-K and statistics"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from .params import load_params
        params = load_params(args.params, args.set)
        if args.command == "score":
            from .distributed import is_main, session
            from .pipeline import score
            with session(params.device):  # joins torchrun's process group when WORLD_SIZE > 1
                out = score(params, args.outdir, progress=not args.quiet)
                main_rank = is_main()
            if main_rank:
                print(f"critlib: wrote {out}")
        return 0
    except CritlibError as e:
        print(f"critlib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("critlib: interrupted; earlier results were left as they were", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
