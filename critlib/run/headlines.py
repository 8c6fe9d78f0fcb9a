"""The numbers of each phase that `index.html` shows: `headlines/<phase>.json` in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json


def write_headline(outdir: str | Path, key: str, items: list[tuple[str, object]] | dict) -> None:
    """[(label, value), ...] of phase `key`."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    write_json(Path(outdir) / "headlines" / f"{key}.json",
               {"phase": key, "items": [{"label": str(k), "value": _plain(v)} for k, v in items]})


def read_headlines(outdir: str | Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((Path(outdir) / "headlines").glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())["items"]
        except (OSError, ValueError, KeyError):
            continue
    return out


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
