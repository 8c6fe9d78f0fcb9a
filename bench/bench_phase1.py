"""Phase 1 benchmark: time and peak memory of each stage, critlib against plain PyTorch, CPU or GPU.

    .venv/bin/python bench/bench_phase1.py --model llama-3.2-1b --dtype fp32 --batch 2 --seq-len 128

Synthetic models of real shapes (random init, `critlib.models.PRESETS`) or the embedded default model;
synthetic token ids. Every stage runs in a fresh subprocess, so its peak memory (CPU: the kernel's peak RSS
counter, reset after loading; GPU: CUDA's peak allocation) is its own. Times are the median of --repeats runs
after --warmup runs. Stages:

  plain     forward+backward keeping every gradient (plain PyTorch), then plain scoring: per-tensor
            torch.topk, global top-K by merging the per-tensor candidates, per-tensor moments, and where they
            fit (≤ --fit elements) global percentiles by numpy.percentile and a concatenate-then-topk
  onepass   critlib.analyze, one metric, exact_stats=False: one gradient pass; the time spent in ranking and
            statistics (TopK.add, Stats.add, per-cell sums) is measured inside the run
  twopass   the same with exact_stats=True (pass 2 pins exact percentiles)
  onepass_lowmem  onepass with gradient_checkpointing and sparse_embedding_grad
  onepass_nokernel  onepass with kernel=off (score tensors made and consumed; on a CPU that is the default)
  fisher    critlib.analyze with metric fisher (one backward per sequence), one pass
  phase1    `critlib score` end to end (load, two passes, held-out eval, tables, files written), default
            params (gradient_checkpointing and sparse_embedding_grad: auto)
  phase1_lowmem  the same with gradient_checkpointing and sparse_embedding_grad set to true
  phase1_off     the same with both set to false (the defaults before they became auto)
  phase1_rows    the same with sparse_embedding_grad only (no checkpointing): the cost of checkpointing
  memory_ab the time cost of each memory option (neither, row-blocked embedding/lm_head gradients,
            checkpointing, both): `analyze` as `critlib score` runs it, the settings interleaved in one process
  digest    no model pass: every weight with a random gradient of its shape, scored, ranked and summarised
            (i) by plain torch (score, per-tensor torch.topk, per-tensor moments), (ii) by critlib's path
            (score tensor, critlib.rank.TopK, critlib.stats.Stats), (iii) by the fused kernel
            (critlib.kernels.fused: one read of weight and gradient), against the time of one read of both;
            (iv) by the multi-tensor pass (critlib.kernels.multi, issue 14): pass 1 alone, with the statistics
            merged and the global top-K, and with pass 2 (exact percentiles and top shares); its Triton launches
            and copies to the host per pass; its histogram pre-aggregated / one atomic per score / absent; and
            analyze's batching (kernels.multi.Pass1, tensors handed in one at a time) at several budgets
  fisher_passes  plain PyTorch: the fisher stage's passes alone (--fisher-batch sequences, one forward+backward
            each), and the same with the fp32 accumulation of each sequence's g² (not in the default stages)
  phase1_disk  `critlib score` end to end, default settings, from safetensors on local disk: the preset is saved
            once to --disk-dir (not timed); --drop-page-cache (root) makes loading read the disk (not a default stage)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("plain", "onepass", "onepass_lowmem", "onepass_nokernel", "twopass", "fisher", "phase1", "phase1_lowmem",
          "phase1_off", "phase1_rows", "memory_ab", "digest")


def _reset_peak(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(dev) -> int:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return -1


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return -1


def _sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


CPU_S: dict[str, float] = {}  # process CPU seconds (all threads) of the last timed call, by name


def _timed(fn, dev, warmup: int, repeats: int, name: str = "") -> tuple[float, list[float], object]:
    """Median wall seconds of `repeats` calls after `warmup`; the median process CPU seconds go to CPU_S."""
    out = None
    for _ in range(warmup):
        out = fn()
    times, cpu = [], []
    for _ in range(repeats):
        _sync(dev)
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU_S[name] = statistics.median(cpu)
    return statistics.median(times), times, out


def worker(args) -> dict:
    import numpy as np
    import torch

    from critlib import sensitivity
    from critlib.models import load_model
    from critlib.scores import token_loss_sum
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = args.worker
    rec: dict = {"stage": stage}
    if stage == "phase1_disk":
        args.model, rec["page_cache_dropped"] = _saved(args), args.drop_page_cache and _drop_page_cache()
    if stage.startswith("phase1"):
        return _phase1(args, rec)
    t = time.perf_counter()
    loaded = load_model(args.model, args.dtype, args.device, seed=0)
    rec["load_s"] = time.perf_counter() - t
    model = loaded.model
    dev = next(model.parameters()).device
    params = [(n, p) for n, p in model.named_parameters()]
    rec["weight_bytes"] = sum(p.numel() * p.element_size() for _, p in params)
    rec["n_weights"] = sum(p.numel() for _, p in params)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(dev)
    rec["rss_after_load"] = _rss()
    k, kt = args.topk_global, args.topk_per_layer
    _reset_peak(dev)
    if stage == "digest":
        return _digest(args, rec, params, dev, k, kt)
    if stage == "memory_ab":
        return _memory_ab(args, rec, model, ids, dev, k, kt)
    if stage == "fisher" and args.fisher_batch:
        ids = torch.randint(0, vocab, (args.fisher_batch, args.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(dev)
        rec["fisher_sequences"] = args.fisher_batch
    if stage == "fisher_passes":
        return _fisher_passes(args, rec, model, params, vocab, dev)
    if stage == "plain":
        n_total = ids.shape[0] * (ids.shape[1] - 1)

        def fwd_bwd():
            for _, p in params:
                p.grad = None
            with torch.enable_grad():
                (token_loss_sum(model, ids) / n_total).backward()

        rec["fwd_bwd_s"], rec["fwd_bwd_runs"], _ = _timed(fwd_bwd, dev, args.warmup, args.repeats, "fwd_bwd")
        rec["fwd_bwd_peak"] = _peak(dev)

        def score_topk():
            cands = []
            for j, (n, p) in enumerate(params):
                s = (p.grad.float() * p.detach().float()).abs_().reshape(-1)
                v, i = torch.topk(s, min(max(k, kt), s.numel()))
                cands.append((v, torch.full_like(i, j), i))
            v = torch.cat([c[0] for c in cands])
            top = torch.topk(v, k)
            return top

        rec["plain_score_topk_s"], _, _ = _timed(score_topk, dev, args.warmup, args.repeats, "plain_score_topk")

        def moments():
            out = []
            for _, p in params:
                s = (p.grad.float() * p.detach().float()).abs_()
                out.append((s.mean().item(), s.std().item(), s.min().item(), s.max().item()))
            return out

        rec["plain_moments_s"], _, _ = _timed(moments, dev, args.warmup, args.repeats, "plain_moments")
        if rec["n_weights"] <= args.fit:
            def concat_all():
                return torch.cat([(p.grad.float() * p.detach().float()).abs_().reshape(-1) for _, p in params])

            def naive_topk():
                return torch.topk(concat_all(), k)

            def percentiles():
                return np.percentile(concat_all().cpu().numpy(), [50, 90, 95, 99, 99.9, 99.99])

            rec["plain_concat_topk_s"], _, _ = _timed(naive_topk, dev, args.warmup, args.repeats, "plain_concat_topk")
            rec["plain_percentiles_s"], _, _ = _timed(percentiles, dev, args.warmup, args.repeats, "plain_percentiles")
        else:
            rec["plain_concat_topk_s"] = rec["plain_percentiles_s"] = None
        rec["peak"] = _peak(dev)
        rec["cpu_s"] = dict(CPU_S)
        return rec
    metric = "fisher" if stage == "fisher" else args.metric
    spent = {"rank_stats_s": 0.0, "rank_stats_cpu_s": 0.0}
    depth = [0]

    def timing(fn):  # time spent inside ranking/statistics calls, outermost calls only
        def run(*a, **kw):
            depth[0] += 1
            if depth[0] > 1:
                try:
                    return fn(*a, **kw)
                finally:
                    depth[0] -= 1
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                _sync(dev)
                spent["rank_stats_s"] += time.perf_counter() - t0
                spent["rank_stats_cpu_s"] += time.process_time() - c0
                depth[0] -= 1
        return run

    from critlib.stats import Stats
    from critlib.kernels import multi
    for name in ("add", "finish"):  # analyze's fused pass 1: tensors batched into multi-tensor passes
        setattr(multi.Pass1, name, timing(getattr(multi.Pass1, name)))
    for name in ("_feed", "_add_cell", "summarize_steps"):
        setattr(sensitivity, name, timing(getattr(sensitivity, name)))
    for cls, name in ((sensitivity.TopK, "add"), (sensitivity.TopK, "add_candidates"), (Stats, "merge"),
                      (sensitivity._Fold, "_add"), (sensitivity._Fold, "_close")):
        setattr(cls, name, timing(getattr(cls, name)))

    from critlib.scores import memory_saving
    low = stage.endswith("_lowmem")

    def run():
        spent["rank_stats_s"] = spent["rank_stats_cpu_s"] = 0.0
        multi.COUNTS.clear()
        with memory_saving(model, checkpointing=low, sparse_embedding=low):
            sensitivity.analyze(model, ids, metrics=[metric], topk_global=k, topk_per_layer=kt, batch_size=ids.shape[0],
                                exact_stats=stage == "twopass", chunk_size=args.chunk, progress=False,
                                kernel="off" if stage.endswith("_nokernel") else "auto")
        return spent["rank_stats_s"]

    rec["analyze_s"], rec["analyze_runs"], _ = _timed(run, dev, args.warmup, args.repeats, "analyze")
    rec["rank_stats_s"] = spent["rank_stats_s"]  # of the last run
    rec["rank_stats_cpu_s"] = spent["rank_stats_cpu_s"]
    rec["multi_counts"] = dict(multi.COUNTS)  # of the last run: Triton launches and copies to the host
    rec["cpu_s"] = dict(CPU_S)
    rec["peak"] = _peak(dev)
    return rec


def _digest(args, rec: dict, params, dev, k: int, kt: int) -> dict:
    import torch

    from critlib.kernels import fused
    from critlib.rank import TopK
    from critlib.stats import Stats
    gen = torch.Generator(device=dev).manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32).to(p.dtype) * 1e-3
             for _, p in params]
    kc = max(k, kt)

    def read_both():
        return [(p.detach().sum(), g.sum()) for (_, p), g in zip(params, grads)]

    def plain():
        out = []
        for (_, p), g in zip(params, grads):
            s = (g.float() * p.detach().float()).abs_().reshape(-1)
            out.append((torch.topk(s, min(kc, s.numel())), s.mean(), s.std(), s.min(), s.max()))
        return out

    def critlib_path():
        top, st = TopK(kc, args.chunk), Stats(args.chunk)
        for (n, p), g in zip(params, grads):
            s = (g.float() * p.detach().float()).abs_()
            top.add(n, s)
            st.add(["global"], s)
        top.global_topk(k, [n for n, _ in params])
        return st.summary()

    def kernel():
        return [fused(p.detach(), g, "grad_x_weight", kc, chunk=args.chunk if dev.type == "cuda" else 1 << 22)
                for (_, p), g in zip(params, grads)]

    def fused_path():  # what critlib.sensitivity.analyze does with a kernel: statistics, cells and top-K
        from critlib.kernels import block_partials, block_topk, reduce
        top, st = TopK(kc, args.chunk), Stats(args.chunk)
        for (n, p), g in zip(params, grads):
            part = block_partials(p.detach(), g, "grad_x_weight")
            st.merge(["global", "layer", "component"], reduce(part).reshape(1, 5), part.hist_count)
            top.add_candidates(n, *block_topk(p.detach(), g, "grad_x_weight", part.max, part.block, kc))
        top.global_topk(k, [n for n, _ in params])
        return st.summary()

    def scores_only():
        return [(g.float() * p.detach().float()).abs_().sum() for (_, p), g in zip(params, grads)]

    def partials_only():
        from critlib.kernels import block_partials
        return [block_partials(p.detach(), g, "grad_x_weight").count for (_, p), g in zip(params, grads)]

    steps = [("read_weights_and_grads", read_both), ("plain_score_topk_moments", plain),
             ("scores_only", scores_only), ("critlib_score_topk_stats", critlib_path)]
    if dev.type == "cuda" or args.kernel_on_cpu:
        steps += [("fused_kernel", kernel), ("critlib_fused_path", fused_path), ("kernel_partials", partials_only)]
    for name, fn in steps:
        rec[name + "_s"], _, _ = _timed(fn, dev, args.warmup, args.repeats, name)
    if dev.type == "cuda":  # the histogram's cost: atomics into 1, 16 or 64 copies (default 256), or none
        from critlib.kernels import triton_fused
        default = triton_fused.COPIES
        for copies in (1, 16, 64):
            triton_fused.COPIES = copies
            rec[f"kernel_partials_copies{copies}_s"], _, _ = _timed(partials_only, dev, 1, args.repeats, "copies")
        triton_fused.COPIES, triton_fused.HIST = default, False
        rec["kernel_partials_nohist_s"], _, _ = _timed(partials_only, dev, 1, args.repeats, "nohist")
        triton_fused.HIST = True
    if dev.type == "cuda" or args.kernel_on_cpu:
        rec.update(_digest_multi(args, params, grads, dev, k, kc))
    rec["peak"] = _peak(dev)
    rec["cpu_s"] = dict(CPU_S)
    return rec


def _digest_multi(args, params, grads, dev, k: int, kc: int) -> dict:
    """The multi-tensor pass (critlib.kernels.multi) over every weight and its random gradient, as analyze
    uses it, against the same read and the same plain PyTorch as the rest of the digest."""
    from critlib.kernels import Backend, multi, resolve_backend
    from critlib.kernels import score as kernel_score
    from critlib.rank import TopK
    from critlib.sensitivity import _groups, _unsplit
    from critlib.stats import Stats
    backend = resolve_backend("auto", dev)
    names = [n for n, _ in params]
    ws = [p.detach() for _, p in params]
    from critlib.layout import parts_of
    groups = {n: _unsplit(_groups(n, parts_of(n, tuple(p.shape)))) or ["global"] for n, p in params}  # as analyze
    rec: dict = {}

    def pass1_only():  # the launches alone, results left on the device
        return multi.pass1(ws, grads, "grad_x_weight", kc, backend).keys

    def pass1_to_host():  # and every tensor's top-k on the host (the one copy)
        return multi.pass1(ws, grads, "grad_x_weight", kc, backend).topk()

    def batch(budget):  # what analyze does: tensors handed in one at a time, statistics and top-K kept
        def run():
            top, st = TopK(kc, args.chunk), Stats(args.chunk)
            metric = "grad_x_weight"
            b = multi.Pass1(kc, backend, {metric: st}, {metric: top}, groups.__getitem__, budget=budget)
            for n, w, g in zip(names, ws, grads):
                b.add(metric, n, w, g)
            b.finish()
            return top, st
        return run

    def path(two_pass):  # scores + exact per-tensor and global top-K + statistics (pass 2: exact percentiles)
        def run():
            top, st = batch(1 << 62)()
            top.global_topk(k, names)
            if two_pass:  # as analyze's fused2: scores a slice at a time, counted into the wanted bins
                st.start_refine()
                for n, w, g in zip(names, ws, grads):
                    wf, gf = w.reshape(-1), g.reshape(-1)
                    for s in range(0, wf.numel(), 1 << 26):
                        st.add(groups[n], kernel_score(wf[s:s + (1 << 26)], gf[s:s + (1 << 26)], "grad_x_weight"))
            return st.summary()
        return run

    steps = [("multi_pass1", pass1_only), ("multi_pass1_to_host", pass1_to_host),
             ("critlib_multi_path", path(False)), ("critlib_multi_two_pass", path(True))]
    steps += [(f"multi_batch_2e{b}", batch(1 << b)) for b in (27, 29, 31)]
    for name, fn in steps:
        multi.COUNTS.clear()
        rec[name + "_s"], _, _ = _timed(fn, dev, args.warmup, args.repeats, name)
        runs = args.warmup + args.repeats
        rec[name + "_counts"] = {key: v / runs for key, v in multi.COUNTS.items()}  # per call
    if backend is Backend.TRITON:  # the histogram: 2 pre-aggregated per program, 1 an atomic per score, 0 none
        from critlib.kernels import triton_multi
        default = triton_multi.HIST
        for mode in (2, 1, 0):
            triton_multi.HIST = mode
            rec[f"multi_pass1_hist{mode}_s"], _, _ = _timed(pass1_only, dev, 1, args.repeats, f"hist{mode}")
        triton_multi.HIST = default
    return rec


def _fisher_passes(args, rec: dict, model, params, vocab: int, dev) -> dict:
    """The fisher stage's forward+backward passes in plain PyTorch: one per sequence, alone and with the fp32
    accumulation of g² (what Fisher costs before any ranking or statistics)."""
    import torch

    from critlib.scores import token_loss_sum
    n = args.fisher_batch or args.batch
    ids = torch.randint(0, vocab, (n, args.seq_len), generator=torch.Generator().manual_seed(0)).to(dev)
    rec["fisher_sequences"] = n

    def passes(accumulate):
        acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params} \
            if accumulate else {}

        def run():
            for seq in ids.split(1):
                for _, p in params:
                    p.grad = None
                with torch.enable_grad():
                    (token_loss_sum(model, seq) / seq.numel()).backward()
                for name, p in params if accumulate else ():
                    if p.grad is not None:
                        acc[name].addcmul_(p.grad, p.grad)
        return run

    for _, p in params:
        p.requires_grad_(True)
    rec["fwd_bwd_s"], rec["fwd_bwd_runs"], _ = _timed(passes(False), dev, args.warmup, args.repeats, "passes")
    rec["fwd_bwd_peak"] = _peak(dev)
    rec["passes_fp32_sum_s"], _, _ = _timed(passes(True), dev, args.warmup, args.repeats, "passes_fp32_sum")
    rec["peak"] = _peak(dev)
    rec["cpu_s"] = dict(CPU_S)
    return rec


def _saved(args) -> str:
    """The preset `args.model` saved as safetensors in --disk-dir (made once, not timed)."""
    import torch

    from critlib.models import load_model
    path = Path(args.disk_dir) / f"{args.model}_{args.dtype}"
    if not (path / "config.json").exists():
        model = load_model(args.model, args.dtype, args.device, seed=0).model
        model.save_pretrained(path, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return str(path)


def _drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only), so loading reads the disk; False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _memory_ab(args, rec: dict, model, ids, dev, k: int, kt: int) -> dict:
    """The time cost of each memory option, measured in one process with the settings interleaved (each
    round runs every setting once, in a rotated order), so that a load changing on a shared machine falls
    on all of them alike: `critlib.sensitivity.analyze` as `critlib score` runs it (two passes)."""
    from critlib import sensitivity
    from critlib.scores import memory_saving
    settings = {"off": (False, False), "rows": (False, True), "checkpointing": (True, False), "both": (True, True)}
    wall: dict[str, list[float]] = {s: [] for s in settings}
    cpu: dict[str, list[float]] = {s: [] for s in settings}
    names = list(settings)
    for r in range(args.warmup + args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ckpt, rows = settings[name]
            _sync(dev)
            t, c = time.perf_counter(), time.process_time()
            with memory_saving(model, checkpointing=ckpt, sparse_embedding=rows):
                sensitivity.analyze(model, ids, metrics=args.metric.split(","), topk_global=k, topk_per_layer=kt,
                                    batch_size=ids.shape[0], chunk_size=args.chunk, progress=False)
            _sync(dev)
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    rec["ab_wall_s"], rec["ab_cpu_s"] = wall, cpu
    rec["ab_median_wall_s"] = {s: statistics.median(v) for s, v in wall.items()}
    rec["ab_median_cpu_s"] = {s: statistics.median(v) for s, v in cpu.items()}
    rec["analyze_s"] = rec["ab_median_wall_s"]["off"]
    rec["cpu_s"] = {"analyze": rec["ab_median_cpu_s"]["off"]}
    rec["peak"] = _peak(dev)
    return rec


def _phase1(args, rec: dict) -> dict:
    import torch

    from critlib.run import commands
    from critlib.params import load_params
    sets = [f"model={args.model}", f"device={args.device}"]
    if args.params is None:  # else the params file decides everything but the model and device
        sets += [f"dtype={args.dtype}", f"seq_len={args.seq_len}", f"batch_size={args.batch}",
                 f"topk_global={args.topk_global}", f"topk_per_layer={args.topk_per_layer}",
                 f"chunk_size={args.chunk}", "data=random", f"n_sequences={args.batch}",
                 f"n_heldout={args.heldout}", f"metrics={args.metric}"]
        if args.topk_global < 1000:  # later phases' default perturbation sizes must fit the kept top-K
            sets.append(f"perturb_ks=[{args.topk_global}]")
    sets += {"phase1_lowmem": ["gradient_checkpointing=true", "sparse_embedding_grad=true"],
             "phase1_off": ["gradient_checkpointing=false", "sparse_embedding_grad=false"],
             "phase1_rows": ["gradient_checkpointing=false", "sparse_embedding_grad=true"]}.get(args.worker, [])
    params = load_params(args.params, sets)
    rec["params"] = sets
    prepare = commands.prepare
    info = {}

    def prepared(*a, **kw):
        ctx = prepare(*a, **kw)
        dev = next(ctx.loaded.model.parameters()).device
        info["dev"] = dev
        info["weight_bytes"] = sum(p.numel() * p.element_size() for p in ctx.loaded.model.parameters())
        info["rss_after_load"] = _rss()
        _reset_peak(dev)
        return ctx

    commands.prepare = prepared
    runs, cpu = [], []
    for i in range(args.warmup + args.repeats):
        with tempfile.TemporaryDirectory() as out:
            t, c = time.perf_counter(), time.process_time()
            commands.score(params, out, progress=False)
            _sync(info["dev"])
            if i >= args.warmup:
                runs.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            man = json.loads((Path(out) / "manifest.json").read_text())
    rec.update(phase1_s=statistics.median(runs), phase1_runs=runs, cpu_s={"phase1": statistics.median(cpu)}, stages_s=man["timings_s"],
               weight_bytes=info["weight_bytes"], rss_after_load=info["rss_after_load"],
               peak=_peak(info["dev"]), peak_whole_process=man["memory"].get("peak_rss_bytes"))
    if info["dev"].type == "cuda":
        rec["peak_whole_process"] = torch.cuda.max_memory_allocated(info["dev"])
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a preset (llama-3.2-1b, llama-3.1-8b, smollm2-135m, "
                    "...) or 'default' (the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=2, help="sequences scored (all in one micro-batch)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=0, help="held-out windows in the phase1 stages")
    ap.add_argument("--metric", default="grad_x_weight", help="memory_ab: a comma-separated list is scored together")
    ap.add_argument("--fisher-batch", type=int, default=0, help="sequences of the fisher stage (default: --batch)")
    ap.add_argument("--kernel-on-cpu", action="store_true", help="digest: time the fused kernel's torch path too")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per stage (0: none)")
    ap.add_argument("--params", default=None, help="params YAML for --model default (e.g. params/default.yaml)")
    ap.add_argument("--topk-global", type=int, default=1000)
    ap.add_argument("--topk-per-layer", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=1 << 30)
    ap.add_argument("--disk-dir", default="/tmp/critlib_bench_models", help="phase1_disk: where the preset is saved")
    ap.add_argument("--drop-page-cache", action="store_true", help="phase1_disk: drop the page cache first (root)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fit", type=float, default=3e8, help="largest model (weights) for the concatenating baselines")
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("BENCH " + json.dumps(worker(args)))
        return
    records = []
    for stage in args.stages.split(","):
        cmd = [sys.executable, __file__, "--worker", stage] + [a for a in sys.argv[1:]]
        t = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout or None,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(cmd, -9, "", f"stage ran past --timeout {args.timeout:g} s")
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")]
        if done.returncode != 0 or not line:
            rec = {"stage": stage, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rec = json.loads(line[-1][6:])
        rec["wall_s"] = time.perf_counter() - t
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if args.out:  # after every stage, so a run cut short keeps what it measured
            _write(args, records)
    result = _write(args, records)
    print(summary(result))


def _write(args, records: list) -> dict:
    import torch

    from critlib.manifest import host, versions
    lscpu = _lscpu()
    result = {"command": " ".join([Path(sys.executable).name, "bench/bench_phase1.py"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": versions(), "host": host(),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "lscpu": lscpu,
              "cpu_model": next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), None),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "records": records}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _lscpu() -> list[str]:
    """`lscpu`'s lines (the machine is part of every figure: timings differ by CPU vendor and model)."""
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def summary(result: dict) -> str:
    """A markdown table of the records."""
    gib = 2 ** 30
    rows = ["| stage | wall (s) | CPU (s) | peak (GiB) | peak / weights | notes |", "|---|---|---|---|---|---|"]
    by = {r["stage"]: r for r in result["records"]}
    for r in result["records"]:
        if "error" in r:
            rows.append(f"| {r['stage']} | – | – | – | – | error: {r['error']} |")
            continue
        wb = r.get("weight_bytes") or 1
        t = r.get("fwd_bwd_s") or r.get("analyze_s") or r.get("phase1_s")
        notes = []
        if r["stage"] == "plain":
            notes.append(f"load {r['load_s']:.1f}s; plain score+per-tensor topk+global {r['plain_score_topk_s']:.2f}s; "
                         f"plain moments {r['plain_moments_s']:.2f}s")
            if r.get("plain_concat_topk_s") is not None:
                notes.append(f"concat+topk {r['plain_concat_topk_s']:.2f}s; np.percentile {r['plain_percentiles_s']:.2f}s")
            else:
                notes.append("concat baselines skipped (do not fit)")
        elif r["stage"] == "digest":
            notes.append("; ".join(f"{key[:-2]} {v:.3f}s" for key, v in r.items()
                                   if key.endswith("_s") and isinstance(v, float) and key not in ("load_s", "wall_s")))
            t = r.get("critlib_score_topk_stats_s")
        elif r["stage"] == "memory_ab":
            w, c = r["ab_median_wall_s"], r["ab_median_cpu_s"]
            notes.append("; ".join(f"{s} {w[s]:.1f} s wall ({w[s] / w['off'] - 1:+.0%}), {c[s]:.1f} s CPU "
                                   f"({c[s] / c['off'] - 1:+.0%})" for s in w))
        elif "rank_stats_s" in r:
            plain = by.get("plain", {})
            fb = plain.get("fwd_bwd_s")
            share = f" = {100 * r['rank_stats_s'] / fb:.1f}% of fwd+bwd" if fb else ""
            notes.append(f"ranking+statistics {r['rank_stats_s']:.2f}s{share}")
            if plain.get("plain_score_topk_s") is not None:  # plain: per-tensor topk + moments, no global stats
                base = plain["plain_score_topk_s"] + plain["plain_moments_s"]
                notes.append(f"{r['rank_stats_s'] / base:.2f}× plain per-tensor topk + moments")
            if "rank_stats_cpu_s" in r:
                notes.append(f"ranking+statistics CPU {r['rank_stats_cpu_s']:.2f}s")
        else:
            notes.append(", ".join(f"{k} {v:.1f}s" for k, v in r.get("stages_s", {}).items()))
            if r.get("peak_whole_process"):
                notes.append(f"whole-process peak incl. load {r['peak_whole_process'] / gib:.2f} GiB")
        peak = r.get("fwd_bwd_peak") or r.get("peak")
        cpu = next(iter(r.get("cpu_s", {}).values()), None)
        cpu = "–" if cpu is None else f"{cpu:.1f}"
        rows.append(f"| {r['stage']} | {t:.2f} | {cpu} | {peak / gib:.2f} | {peak / wb:.2f}× | {'; '.join(notes)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
