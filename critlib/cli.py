"""Command line: `critlib score -p PARAMS.yaml [-o OUTDIR] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
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
    _application_parsers(sub)
    rp = sub.add_parser("run", help="all phases' notebooks -> OUTDIR/index.html and one HTML page per phase")
    _common(rp)
    rp.add_argument("--phases", help="phases to run, e.g. 1,3 (default: all); the others stay from the last run")
    return ap


def _application_parsers(sub) -> None:
    for name, text in (("quantize", "quantization with kept outliers, per selector"),
                       ("prune", "pruning curves per selector"), ("bitflip", "bit-flip vulnerability"),
                       ("applications", "quantize + prune + bitflip")):
        _common(sub.add_parser(name, help=f"Applications: {text}"))
    fp = sub.add_parser("fingerprint", help="write an integrity fingerprint of a model")
    fp.add_argument("model", help="any model source load_model accepts")
    fp.add_argument("-o", "--output", required=True, help="fingerprint JSON file to write")
    fp.add_argument("--k", type=int, default=100, help="critical weights to record per metric (default 100)")
    fp.add_argument("--metric", action="append", default=[], help="metric for the critical set (repeatable; "
                    "default magnitude; gradient metrics use the params' data)")
    fp.add_argument("-p", "--params", help="params YAML for data/dtype/device (default: built-in defaults)")
    fp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    hp = sub.add_parser("html", help="one executed notebook -> one offline HTML page (plotly.js inside)")
    hp.add_argument("notebook", help="an executed .ipynb (e.g. from papermill)")
    hp.add_argument("-o", "--output", help="the page to write (default: the notebook's name with .html)")
    vf = sub.add_parser("verify", help="check a model against a fingerprint (exit 1 on any change)")
    vf.add_argument("model", help="any model source load_model accepts")
    vf.add_argument("file", help="fingerprint JSON file")
    vf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")


def _terminated(signum, frame):
    """A SIGTERM (kill, a scheduler, torchrun) cleans up as Ctrl-C does. The process is ending, so logging is
    switched off first: what the kernel's client logs while it is torn down ("Kernel died while waiting for
    execute reply", and asyncio's never-retrieved DeadKernelError when the interpreter exits) would only
    surround the one line. Only a real SIGTERM gets here, so an in-process caller's logging is left alone."""
    logging.disable(logging.CRITICAL)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "fingerprint":
            from .run.commands import fingerprint
            print(fingerprint(args.model, args.output, args.k, args.metric, args.params, args.set))
            return 0
        if args.command == "verify":
            from .run.commands import verify
            code, report = verify(args.model, args.file, args.set)
            print(report)
            return code
        if args.command == "html":
            from .report import notebook_page
            print(f"critlib: wrote {notebook_page(args.notebook, args.output)}")
            return 0
        if args.command == "run":
            from .report import run_report
            out = run_report(args.params, args.set, args.outdir, args.phases, progress=not args.quiet)
            print(f"critlib: wrote {out / 'index.html'}")
            return 0
        from .params import load_params
        params = load_params(args.params, args.set)
        if args.command == "score":
            from .distributed import is_main, session
            from .run.commands import score
            with session(params.device):  # joins torchrun's process group when WORLD_SIZE > 1
                out = score(params, args.outdir, progress=not args.quiet)
                main_rank = is_main()
            if main_rank:
                print(f"critlib: wrote {out}")
            return 0
        from .run.commands import applications
        print(f"critlib: wrote {applications(args.command, params, args.outdir, progress=not args.quiet)}")
        return 0
    except CritlibError as e:
        print(f"critlib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("critlib: interrupted; earlier results were left as they were", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
