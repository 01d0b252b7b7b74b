"""Token-generation throughput: guidance-free vs CFG, with and without the KV cache, per model family.

Same model, same batch, the family's default sampling options; only the guidance scale and the cache
switch change. Guidance-free sampling runs one forward per step, CFG runs the batch twice ([cond; null]), so
the target is guidance-free >= 1.9x the CFG throughput. "no KV cache" recomputes the whole prefix every step
(the naive path). Images/s counts sampled code sequences (tokenizer decoding, the same for both, is excluded).

    python benchmarks/bench_generate.py --family all                       # CPU, small configs
    python benchmarks/bench_generate.py --family llamagen --device cuda --dtype bfloat16 --batch 64 \
        --model-args '{"preset": "GPT-L", "block_size": 576}' --compile    # GPT-L at 384 px

Writes the Markdown table to benchmarks/results/bench_generate.md (or --out).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
from machine import machine

from ccalign.families import get_family
from ccalign.io import atomic_write_text

# Small CPU defaults per family: a real preset's width and depth, few tokens (overridable by flags).
# guidance values are in each family's own convention (LlamaGen cfg_scale 1.0 = free; VAR cfg 0 = free).
# LlamaGen decodes one token per step, so it needs a large batch before compute (which CFG doubles)
# rather than reading the weights dominates a step; VAR decodes a whole scale per step.
SETUPS = {
    "llamagen": {
        "model": {"preset": "GPT-B", "block_size": 16},  # GPT-B at 64 px (4x4 tokens)
        "tokenizer": None,  # LlamaGen's sampler does not use the tokenizer
        "batch": 64,
        "free": 1.0,
        "cfg": 4.0,  # sample_c2i.py default
    },
    "var": {
        "model": {"preset": "d16", "patch_nums": [1, 2, 3, 4]},  # d16 at 64 px (30 tokens)
        "tokenizer": {"preset": "vae_ch160v4096z32", "v_patch_nums": [1, 2, 3, 4]},
        "batch": 16,
        "free": 0.0,
        "cfg": 1.5,  # VAR demo default
    },
}
FAMILY_MODULES = {"llamagen": "ccalign.models.llamagen", "var": "ccalign.models.var"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(once, device: torch.device) -> dict:
    """Wall time, process CPU time and (CUDA) peak memory of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    once()
    sync(device)
    out = {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    if device.type == "cuda":
        out["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def bench_family(name: str, args) -> list[dict]:
    """Time every (KV cache, guidance) case; cases alternate within each round so background load on a
    shared machine hits them alike, and each case keeps its best (minimum) round."""
    try:
        importlib.import_module(FAMILY_MODULES[name])
    except ImportError as e:
        raise SystemExit(f"family {name!r} is not importable ({e}); it cannot be benchmarked yet") from e
    setup = SETUPS[name]
    family = get_family(name)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model_args = json.loads(args.model_args) if args.model_args else setup["model"]
    tok_args = json.loads(args.tokenizer_args) if args.tokenizer_args else setup["tokenizer"]
    torch.manual_seed(0)
    model = family.build_model(model_args).to(device=device, dtype=dtype).eval()
    tokenizer = family.build_tokenizer(tok_args).to(device).eval() if tok_args is not None else None
    if args.compile:
        model.compile(mode="reduce-overhead" if device.type == "cuda" else "default")
    cfg = setup["cfg"] if args.cfg is None else args.cfg
    base = dict(family=name, model=json.dumps(model_args), tokens=family.seq_len(model))
    base["params"] = sum(p.numel() for p in model.parameters())
    cases = [
        dict(base, batch=batch, kv=kv, mode=mode, guidance=g)
        for batch in args.batch or [setup["batch"]]
        for kv in {"both": (True, False), "on": (True,), "off": (False,)}[args.kv_cache]
        for mode, g in (("guidance-free", setup["free"]), (f"CFG {cfg}", cfg))
    ]

    def call(case):
        labels = torch.arange(case["batch"], device=device) % family.num_classes(model)
        sampling = {**family.default_sampling, "kv_cache": case["kv"]}
        gen = torch.Generator().manual_seed(0)
        return lambda: family.generate(
            model, tokenizer, labels, guidance=case["guidance"], sampling=sampling, generator=gen
        )

    # Compiled runs go case by case (warm-up, then its rounds): CFG doubles the batch, and switching the
    # batch size reallocates the KV cache, which a captured CUDA graph would have to re-record.
    groups = [[case] for case in cases] if args.compile else [cases]
    with torch.no_grad():
        for group in groups:
            for case in group:
                for _ in range(args.warmup):
                    t0 = time.perf_counter()
                    call(case)()
                    sync(device)
                    print(f"warm-up {case['mode']} batch {case['batch']}: {time.perf_counter() - t0:.1f} s")
            for i in range(args.repeats):
                for case in group:
                    t = run_timed(call(case), device)
                    desc = f"{name} batch {case['batch']} kv={case['kv']} {case['mode']}"
                    print(f"round {i}: {desc}: {t['s']:.3f} s", flush=True)
                    for key, value in t.items():
                        case[key] = min(case.get(key, value), value) if key != "mem_gib" else value
    for case in cases:
        case["img_s"] = case["batch"] / case["s"]
    return cases


def table(rows: list[dict], args, host: str) -> str:
    has_mem = any("mem_gib" in r for r in rows)
    head = "| family | model | params | tokens | batch | KV cache | guidance | s / batch | CPU s | images/s |"
    lines = [head + (" peak GiB |" if has_mem else ""), "|" + "---|" * (10 + has_mem)]
    for r in rows:
        line = (
            f"| {r['family']} | `{r['model']}` | {r['params'] / 1e6:.0f}M | {r['tokens']} | {r['batch']} | "
            f"{'yes' if r['kv'] else 'no'} | {r['mode']} | {r['s']:.3f} | {r['cpu_s']:.2f} | "
            f"{r['img_s']:.2f} |"
        )
        lines.append(line + (f" {r['mem_gib']:.2f} |" if has_mem else ""))
    lines += [
        "",
        "| family | batch | KV cache | guidance-free / CFG (wall; CPU time) | KV speed-up (free, CFG) |",
        "|---|---|---|---|---|",
    ]
    by = {(r["family"], r["batch"], r["kv"], r["mode"].startswith("guidance-free")): r for r in rows}
    for fam, batch, kv, _ in [k for k in by if k[3]]:
        free, cfg = by[(fam, batch, kv, True)], by[(fam, batch, kv, False)]
        ratio = f"{cfg['s'] / free['s']:.2f}x; {cfg['cpu_s'] / free['cpu_s']:.2f}x"
        speed = ""
        if kv and (fam, batch, False, True) in by:
            speed = ", ".join(
                f"{by[(fam, batch, False, g)]['s'] / by[(fam, batch, True, g)]['s']:.1f}x"
                for g in (True, False)
            )
        lines.append(f"| {fam} | {batch} | {'yes' if kv else 'no'} | {ratio} | {speed} |")
    setup = (
        f"Machine: {host}. Device `{args.device}`, dtype `{args.dtype}`, compile {args.compile}, "
        f"best of {args.repeats} {'consecutive' if args.compile else 'interleaved'} round(s) after "
        f"{args.warmup} warm-up run(s) per case."
    )
    return "\n".join(["# bench_generate", "", setup, "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["llamagen", "var", "all"], default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA graphs on GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch size(s) (default: the family's)")
    p.add_argument("--kv-cache", choices=["both", "on", "off"], default="both", help="which cache settings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation, allocator)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the family's)")
    p.add_argument("--model-args", default=None, help="JSON model args (default: the family's small setup)")
    p.add_argument("--tokenizer-args", default=None, help="JSON tokenizer args (default: the family's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_generate.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["llamagen", "var"] if args.family == "all" else [args.family]
    if len(names) > 1 and (args.model_args or args.tokenizer_args):
        p.error("--model-args/--tokenizer-args need a single --family")
    host = machine()
    rows = [r for name in names for r in bench_family(name, args)]
    md = table(rows, args, host)
    print(md)
    atomic_write_text(md, args.out)


if __name__ == "__main__":
    main()
