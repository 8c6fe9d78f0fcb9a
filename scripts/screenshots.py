"""Screenshots of a report, on demand (not in CI): index.html and every phase page of a run folder, drawn by
headless Chromium (Debian package `chromium`; `make browser` installs it) into PNG files.

    .venv/bin/python scripts/screenshots.py outputs/default [-o outputs/default-screenshots] [--height 4000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder written by `critlib run`")
    ap.add_argument("-o", "--outdir", help="where the PNGs go (default: <run>-screenshots)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=4000)
    args = ap.parse_args()
    run = Path(args.run).resolve()
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("screenshots: chromium is not installed; run `make browser` (as root) first", file=sys.stderr)
        return 2
    pages = [run / "index.html"] + sorted(p for p in run.glob("0*.html"))
    if not pages[0].is_file():
        print(f"screenshots: {run} has no index.html; give a folder written by `critlib run`", file=sys.stderr)
        return 2
    out = Path(args.outdir or f"{run}-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="critlib-chromium-") as profile:
        for page in pages:
            png = out / f"{page.stem}.png"
            subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                            f"--window-size={args.width},{args.height}", f"--screenshot={png}", page.as_uri()],
                           capture_output=True, timeout=180, check=False)
            print(f"{png}" if png.is_file() else f"screenshots: {page.name} failed", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
