"""Integrity fingerprints: detect any change to a model's weights, and name the critical weights it hit.

A fingerprint holds, per parameter, the sha256 of its raw bytes in the stored dtype (row-major,
contiguous), shape and dtype; and, for the top-K critical weights, their coordinates and exact stored bit
patterns (hex) with the float value for reading. The file carries a format version and a sha256 of its
own canonical JSON (sorted keys, no spaces, that field left out), so an edited or truncated fingerprint is
rejected instead of being trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from . import CritlibError
from .edit import as_bits
from .io import atomic_path
from .scores import scored_parameters

FORMAT = "critlib-fingerprint"
VERSION = 1


def tensor_sha256(t: torch.Tensor, chunk: int = 1 << 26) -> str:
    """sha256 of the tensor's bytes in its stored dtype, row-major (contiguous), native (little-endian)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    h = hashlib.sha256()
    for start in range(0, raw.numel(), chunk):
        h.update(raw[start:start + chunk].cpu().numpy().tobytes())
    return h.hexdigest()


def _bits_hex(p: torch.Tensor, flat: int) -> str:
    v = p.detach().reshape(-1)[flat:flat + 1]
    width = v.element_size()
    x = int(as_bits(v).cpu()[0]) & ((1 << (8 * width)) - 1)
    return f"0x{x:0{2 * width}x}"


def _float(p: torch.Tensor, flat: int) -> float | None:
    v = float(p.detach().reshape(-1)[flat])
    return v if math.isfinite(v) else None


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def critical_coords(model: torch.nn.Module, metrics: list[str], k: int, windows: torch.Tensor | None = None,
                    batch_size: int = 8) -> list[tuple[str, int, list[str]]]:
    """The union over `metrics` of each metric's exact global top-k: (param, flat, [metrics]) in model order.
    Gradient metrics and wanda need scoring `windows`; magnitude does not."""
    from .sensitivity import global_topk
    return critical_union(global_topk(model, windows, metrics, k, batch_size),
                          [n for n, _ in scored_parameters(model)])


def critical_union(tops: dict[str, list[tuple]], order: list[str]) -> list[tuple[str, int, list[str]]]:
    """(param, flat, [metrics whose top list holds it]) over every metric's (param, flat, ...) list, in model
    order."""
    found: dict[tuple[str, int], list[str]] = {}
    for m, top in tops.items():
        for name, flat, *_ in top:
            found.setdefault((name, flat), []).append(m)
    pos = {n: i for i, n in enumerate(order)}
    return [(n, f, ms) for (n, f), ms in sorted(found.items(), key=lambda kv: (pos[kv[0][0]], kv[0][1]))]


def fingerprint(model: torch.nn.Module, critical: list[tuple] | None = None, k: int | None = None,
                extra: dict | None = None) -> dict:
    """The fingerprint of `model`: every parameter's sha256 plus the exact bits of the `critical` weights
    ((param, flat[, metrics]) tuples, e.g. from `critical_coords` or `Sensitivity.global_top`; first `k`)."""
    params = dict(scored_parameters(model))
    tensors = {name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                      "sha256": tensor_sha256(p)} for name, p in params.items()}
    crit = []
    for item in (critical or [])[: k if k is not None else None]:
        name, flat = item[0], int(item[1])
        if name not in params:
            raise CritlibError(f"critical weight names parameter '{name}', which the model does not have")
        p = params[name]
        if not 0 <= flat < p.numel():
            raise CritlibError(f"flat index {flat} is out of range for {name} ({p.numel()} weights)")
        row, col = (flat // p.shape[-1], flat % p.shape[-1]) if p.ndim == 2 else (flat, None)
        entry = {"param": name, "flat": flat, "row": row, "col": col, "bits": _bits_hex(p, flat),
                 "value": _float(p, flat)}
        if len(item) > 2 and isinstance(item[2], (list, tuple)):
            entry["metrics"] = list(item[2])
        crit.append(entry)
    fp = {"format": FORMAT, "version": VERSION, "tensors": tensors, "critical": crit, "meta": extra or {}}
    fp["sha256"] = hashlib.sha256(canonical(fp)).hexdigest()
    return fp


def save_fingerprint(fp: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fp, indent=1, sort_keys=True, allow_nan=False) + "\n")


def check_fingerprint(fp, where: str = "fingerprint") -> dict:
    """`fp` if it is a well-formed fingerprint whose own checksum matches; CritlibError otherwise."""
    if not isinstance(fp, dict) or fp.get("format") != FORMAT:
        raise CritlibError(f"{where} is not a critlib fingerprint; make one with `critlib fingerprint`")
    if fp.get("version") != VERSION:
        raise CritlibError(f"{where} has format version {fp.get('version')!r}; this critlib reads version {VERSION}")
    body = {k: v for k, v in fp.items() if k != "sha256"}
    try:
        digest = hashlib.sha256(canonical(body)).hexdigest()
    except (TypeError, ValueError):
        digest = None
    if digest is None or fp.get("sha256") != digest:
        raise CritlibError(f"{where} was edited or corrupted (its checksum does not match its content); "
                           "make a new fingerprint from a trusted copy of the model")
    if not isinstance(fp.get("tensors"), dict) or not isinstance(fp.get("critical"), list):
        raise CritlibError(f"{where} lacks its tensors or critical sections; make a new fingerprint")
    return fp


def load_fingerprint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CritlibError(f"fingerprint file {path} does not exist; check the path")
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CritlibError(f"fingerprint file {path} is not valid JSON (truncated or damaged: {e}); "
                           "make a new fingerprint from a trusted copy of the model") from None
    return check_fingerprint(fp, f"fingerprint file {path}")


def verify(model: torch.nn.Module, fp: dict) -> dict:
    """Compare `model` with fingerprint `fp`: every changed, missing, added or reshaped tensor, and every
    critical weight whose stored bits differ (with coordinates, old and new bits and values). `ok` is True
    only when nothing differs."""
    check_fingerprint(fp)
    params = dict(scored_parameters(model))
    want = fp["tensors"]
    report = {"ok": True, "n_tensors": len(want), "changed_tensors": [], "missing_tensors": [],
              "extra_tensors": sorted(set(params) - set(want)), "changed_weights": []}
    for name, rec in want.items():
        p = params.get(name)
        if p is None:
            report["missing_tensors"].append(name)
            continue
        dtype = str(p.dtype).removeprefix("torch.")
        if list(p.shape) != rec["shape"] or dtype != rec["dtype"]:
            report["changed_tensors"].append({"param": name, "reason": f"shape/dtype {list(p.shape)} {dtype} "
                                              f"!= {rec['shape']} {rec['dtype']}"})
        elif tensor_sha256(p) != rec["sha256"]:
            report["changed_tensors"].append({"param": name, "reason": "content (sha256) differs"})
    reshaped = {c["param"] for c in report["changed_tensors"] if c["reason"].startswith("shape")}
    for c in fp["critical"]:
        p = params.get(c["param"])
        if p is None or c["param"] in reshaped:
            continue
        bits = _bits_hex(p, c["flat"])
        if bits != c["bits"]:
            report["changed_weights"].append({"param": c["param"], "row": c["row"], "col": c["col"],
                                              "flat": c["flat"], "bits_expected": c["bits"], "bits_found": bits,
                                              "value_expected": c["value"], "value_found": _float(p, c["flat"])})
    report["ok"] = not (report["changed_tensors"] or report["missing_tensors"] or report["extra_tensors"]
                        or report["changed_weights"])
    return report


def format_report(report: dict) -> str:
    if report["ok"]:
        return f"OK: all {report['n_tensors']} tensors match the fingerprint"
    lines = [f"CHANGED: {len(report['changed_tensors'])} tensor(s) changed, {len(report['missing_tensors'])} "
             f"missing, {len(report['extra_tensors'])} added; {len(report['changed_weights'])} critical "
             "weight(s) changed"]
    lines += [f"  tensor {c['param']}: {c['reason']}" for c in report["changed_tensors"]]
    lines += [f"  tensor {n}: missing from the model" for n in report["missing_tensors"]]
    lines += [f"  tensor {n}: not in the fingerprint" for n in report["extra_tensors"]]
    for w in report["changed_weights"]:
        at = f"[{w['row']}, {w['col']}]" if w["col"] is not None else f"[{w['row']}]"
        lines.append(f"  critical weight {w['param']}{at}: {w['bits_expected']} ({w['value_expected']}) -> "
                     f"{w['bits_found']} ({w['value_found']})")
    return "\n".join(lines)
