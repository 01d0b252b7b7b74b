"""Token generation, our sampler beside the official ones in one process: images/s guidance-free and with CFG.

"ours" is the sample stage's generation path (``ccalign.sample.generate.Sampler.codes``: per-sample counter
noise, the family's precision semantics, the fast decode path: ``graph`` = CUDA graphs captured per step
shape, ``compile`` = torch.compile'd steps captured the same way, ``eager`` = the same static steps without
capture, ``reference`` = the plain eager loop). "official" is the released samplers themselves, imported from
``.cache/official/`` (never committed): LlamaGen's ``generate`` as ``autoregressive/sample/sample_c2i_ddp.py``
calls it (bf16 weights; ``compile`` = its ``--compile``, torch.compile mode="reduce-overhead") and VAR's
``autoregressive_infer_cfg`` under fp16 autocast, as its sampler runs it (which always computes the
unconditional half, also at cfg 0). Both sides get the same random weights (our state dict loaded into the
official modules) and the paper's sampling settings; image decoding is excluded on both (VAR's
``fhat_to_img`` is replaced by the identity), so images/s counts sampled token sequences.

Per case: images/s (best of --repeats batches after one warm-up batch, which also pays capture or compile:
``setup_s``), peak memory, and on a GPU ``fraction_of_limit``: the measured rate over the roofline rate of
the card (every decode step reads the matmul weights once and the written prefix of the KV cache, or does
its matmul FLOPs, whichever takes longer; peak bandwidth and dense bf16 FLOPS from CARDS or --peak-gbps
--peak-tflops). On CPU the sampler's own overhead: wall time outside the transformer forwards (the
embedding + blocks + head calls, timed by wrapping them) per decode step, and as a fraction of the forwards.

    python benchmarks/bench_generate.py                            # CPU: small presets, batch 64
    python benchmarks/bench_generate.py --device cuda --budget 450  # GPU: GPT-L, GPT-XL, d16, d30

The official code: ``git clone https://github.com/FoundationVision/LlamaGen .cache/official/LlamaGen``
(checkout ce98ec4) and ``.../VAR .cache/official/VAR`` (checkout cf0321a). Every record goes to
``--json`` (records of other devices already there are kept), the tables to ``--md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from machine import machine

from ccalign.families import get_family
from ccalign.io import atomic_write_json, atomic_write_text
from ccalign.models.llamagen import FastDecoder
from ccalign.models.sampling import CounterRNG
from ccalign.sample.generate import Sampler, SampleSpec, sample_seed

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / ".cache" / "official"
RESULTS = Path(__file__).parent / "results"

# Paper settings (config/paper.yaml): guidance-free and CFG scale in the family's convention, sampling
# options, the official sampling precision. The "-64px" presets keep a real width and depth with few tokens
# (CPU).
LLAMAGEN_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_interval": -1}
VAR_SAMPLING = {"top_k": 900, "top_p": 0.96, "more_smooth": False}
VAE = {"preset": "vae_ch160v4096z32"}
PRESETS = {
    "GPT-L": dict(family="llamagen", args={"preset": "GPT-L", "block_size": 576}, batch=256),
    "GPT-XL": dict(family="llamagen", args={"preset": "GPT-XL", "block_size": 576}, batch=256),
    "d16": dict(family="var", args={"preset": "d16"}, tokenizer=VAE, batch=64),
    "d30": dict(family="var", args={"preset": "d30"}, tokenizer=VAE, batch=64),
    "GPT-B-64px": dict(family="llamagen", args={"preset": "GPT-B", "block_size": 16}, batch=64),
    "GPT-B-256px": dict(family="llamagen", args={"preset": "GPT-B", "block_size": 256}, batch=8),
    "d16-64px": dict(
        family="var",
        args={"preset": "d16", "patch_nums": [1, 2, 3, 4]},
        tokenizer={**VAE, "v_patch_nums": [1, 2, 3, 4]},
        batch=64,
    ),
}
FAMILY = {
    "llamagen": dict(free=1.0, cfg=1.75, sampling=LLAMAGEN_SAMPLING, precision="bf16"),
    "var": dict(free=0.0, cfg=1.5, sampling=VAR_SAMPLING, precision="fp16"),
}
# (model, path, decode, guidance) in the order they run, cheap and decisive first; compilation (a minute or
# more per shape) guidance-free only. GPU: ~8 minutes on an H100.
BOTH = "free,cfg"
GPU_PLAN = [
    *[
        (m, side, d, BOTH)
        for m in ("GPT-L", "d16", "d30", "GPT-XL")
        for side, d in (("ours", "graph"), ("official", "eager"))
    ],
    ("GPT-L", "ours", "graph-fullcache", BOTH),
    ("GPT-L", "ours", "agreement", "free"),
    ("d16", "ours", "agreement", "free"),
    ("d16", "ours", "agreement-fp32", "free"),
    ("GPT-L", "ours", "compile", "free"),
    ("GPT-L", "official", "compile", "free"),
]
CPU_PLAN = [
    *[
        (m, side, d, BOTH)
        for m in ("GPT-B-64px", "d16-64px")
        for side, d in (("ours", "eager"), ("ours", "reference"), ("official", "eager"))
    ],
    ("GPT-B-256px", "ours", "eager", BOTH),
    ("GPT-B-256px", "ours", "eager-fullcache", BOTH),
]
FULL = "-fullcache"  # ablation: the fast path attending to every cache slot instead of the written prefix
# name substring -> (peak memory bandwidth GB/s, dense bf16 TFLOPS); first match wins
CARDS = [
    ("H100 PCIe", 2000, 756),
    ("H100 NVL", 3900, 835),
    ("H100", 3350, 989),
    ("H200", 4800, 989),
    ("A100-SXM4-80GB", 2039, 312),
    ("A100 80GB PCIe", 1935, 312),
    ("A100", 1555, 312),
    ("L40S", 864, 362),
]
MIN_SECONDS = {"compile": 100, "default": 30}  # a case starts only with this much of --budget left


@contextlib.contextmanager
def attention_blocks(block: int | None):
    """LlamaGen's fast path attending to cache blocks of ``block`` slots (None: unchanged)."""
    saved = FastDecoder.EAGER_BLOCK, FastDecoder.ATTN_BLOCK
    if block is not None:
        FastDecoder.EAGER_BLOCK = FastDecoder.ATTN_BLOCK = block
    try:
        yield
    finally:
        FastDecoder.EAGER_BLOCK, FastDecoder.ATTN_BLOCK = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the two samplers


def build_ours(name: str, device: torch.device):
    """Our model and tokenizer of preset ``name``, random weights, on ``device`` (float32)."""
    p = PRESETS[name]
    family = get_family(p["family"])
    torch.manual_seed(0)
    with torch.device(device):
        model = family.build_model(p["args"]).eval()
        tokenizer = family.build_tokenizer(p["tokenizer"]).eval() if "tokenizer" in p else None
    return family, model, tokenizer


def official_import(repo: str) -> None:
    path = OFFICIAL / repo
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: fetch FoundationVision/{repo} there (see the docstring)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def build_official(name: str, device: torch.device, dtype: torch.dtype):
    """The official model of preset ``name`` holding our random weights, as its sampler prepares it."""
    _, ours, tokenizer = build_ours(name, device)
    p = PRESETS[name]
    if p["family"] == "llamagen":
        official_import("LlamaGen")
        from autoregressive.models.gpt import GPT_models

        c = ours.config
        with torch.device(device):
            model = GPT_models[p["args"]["preset"]](
                vocab_size=c.vocab_size, block_size=c.block_size, num_classes=c.num_classes, cls_token_num=1
            )
        model.load_state_dict(ours.state_dict(), strict=False)  # strict=False as sample_c2i_ddp.py
        return model.to(device=device, dtype=dtype).eval()
    official_import("VAR")
    from models import build_vae_var

    # build_vae_var disables these initialisers process-wide; put them back once it has built its models
    classes = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d)
    classes += (nn.ConvTranspose1d, nn.ConvTranspose2d)
    saved = {cls: cls.reset_parameters for cls in classes}
    try:
        vae, model = build_vae_var(
            device=device, patch_nums=ours.patch_nums, depth=ours.cfg.depth, num_classes=ours.num_classes
        )
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn
    vae.load_state_dict(tokenizer.state_dict())
    model.load_state_dict(ours.state_dict(), strict=False)
    vae.fhat_to_img = lambda f_hat: f_hat  # decoding excluded, as on our side
    return model.eval()


def official_runner(name: str, model, batch: int, guidance: float, decode: str, device: torch.device):
    """(warm-up, run) of the official sampler."""
    p, f = PRESETS[name], FAMILY[PRESETS[name]["family"]]
    labels = torch.arange(batch, device=device) % 1000
    if p["family"] == "llamagen":
        from autoregressive.models.generate import generate

        steps = model.block_size
        if decode == "compile":  # sample_c2i_ddp.py --compile
            model = torch.compile(model, mode="reduce-overhead", fullgraph=True)

        def sample(tokens: int = steps):
            return generate(model, labels, tokens, cfg_scale=guidance, sample_logits=True, **f["sampling"])

        # eager: a few tokens warm up as well as all of them; compiled: the whole length (cache shapes)
        return (sample if decode == "compile" else lambda: sample(8)), sample
    dtype = (
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(f["precision"]) if device.type == "cuda" else None
    )

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=True):
            return model.autoregressive_infer_cfg(batch, labels, g_seed=0, cfg=guidance, **f["sampling"])

    return run, run


def ours_runner(built, batch: int, guidance: float, decode: str, device: torch.device, precision: str):
    """The sample stage's generation of ``batch`` samples (a call of ``Sampler.codes``)."""
    family, model, tokenizer = built
    f = FAMILY[family.name]
    spec = SampleSpec(
        family=family.name,
        num_classes=family.num_classes(model),
        per_class=1,
        seed=0,
        guidance=guidance,
        sampling=dict(f["sampling"]),
        precision=precision,
    )
    sampler = Sampler(family, model, tokenizer, spec, device, decode)
    return lambda: sampler.codes(range(batch))


# ----------------------------------------------------------------------------- measurements


@contextlib.contextmanager
def timed_forwards(model):
    """Process CPU time spent inside the transformer: LlamaGen's forward, VAR's blocks and output head (our
    and the official modules use these names). Yields a one-element list holding the seconds so far (CPU:
    synchronous, and CPU time is what other jobs on a shared machine do not change)."""
    total = [0.0]
    targets = [model] if not hasattr(model, "blocks") else [*model.blocks]
    methods = [(m, "forward") for m in targets] + (
        [(model, "get_logits")] if hasattr(model, "blocks") else []
    )

    def wrap(fn):
        def timed(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                total[0] += time.process_time() - t0

        return timed

    for obj, attr in methods:
        setattr(obj, attr, wrap(getattr(obj, attr)))
    try:
        yield total
    finally:
        for obj, attr in methods:
            delattr(obj, attr)  # back to the class's method


def card_peaks(device: torch.device, args) -> tuple[float | None, float | None]:
    """(bytes/s, FLOP/s) of the card, or (None, None) on CPU or an unknown card."""
    if device.type != "cuda":
        return None, None
    if args.peak_gbps and args.peak_tflops:
        return args.peak_gbps * 1e9, args.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for key, gbps, tflops in CARDS:
        if key in name:
            return gbps * 1e9, tflops * 1e12
    return None, None


def roofline_seconds(model, family: str, rows: int, itemsize: int, bandwidth: float, flops: float) -> float:
    """Lower bound on one batch: per decode step max(bytes / bandwidth, FLOPs / flops), where the bytes are
    the matmul weights plus the KV cache prefix read, and the FLOPs those of the matmuls and attention."""
    linear = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    weight_bytes = sum(linear.values()) * itemsize
    per_token = sum(v for n, v in linear.items() if "ada_lin" not in n)  # AdaLN runs once per row
    per_row = sum(linear.values()) - per_token
    if family == "llamagen":
        c = model.config  # ours and the official ModelArgs share these fields
        width, layers = c.dim, c.n_layer
        kv_width = (c.n_kv_head or c.n_head) * (c.dim // c.n_head)
        steps = [(1, t + 1) for t in range(c.block_size)]  # (new tokens, keys attended)
    else:
        width, layers = model.cfg.embed_dim, model.cfg.depth
        kv_width = width
        steps = [(pn * pn, end) for pn, (_, end) in zip(model.patch_nums, model.begin_ends, strict=True)]
    total = 0.0
    for tokens, keys in steps:
        moved = weight_bytes + rows * keys * 2 * layers * kv_width * itemsize
        work = 2 * rows * (tokens * per_token + per_row) + 4 * rows * tokens * keys * width * layers
        total += max(moved / bandwidth, work / flops)
    return total


def run_case(warmup, run, device: torch.device, repeats: int, forward_model=None) -> dict:
    """One warm-up call (capture, compilation), then ``repeats`` timed calls; the best one counts (by wall
    time; on CPU by process CPU time, which other jobs on a shared machine do not inflate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    warmup()
    sync(device)
    out, best = {"setup_s": time.perf_counter() - t0}, float("inf")
    for _ in range(repeats):
        timer = timed_forwards(forward_model) if forward_model is not None else contextlib.nullcontext([0.0])
        with timer as forward:
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            sync(device)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if (cpu if device.type == "cpu" else seconds) < best:
            best = cpu if device.type == "cpu" else seconds
            out.update(s_per_batch=seconds, cpu_s_per_batch=cpu, forward_cpu_s=forward[0])
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out


@torch.no_grad()
def agreement(name: str, built, device: torch.device, precision: str, batch: int) -> dict:
    """Fraction of identical tokens (and whole sequences) between the reference and the graph path,
    guidance-free: 1.0 in float32 on CPU (a test); in bf16/fp16 on a GPU kernels round differently."""
    family = built[0]
    scale = FAMILY[family.name]["free"]
    codes = {d: ours_runner(built, batch, scale, d, device, precision)() for d in ("reference", "graph")}
    same = codes["reference"] == codes["graph"]
    return dict(
        kind="agreement",
        family=family.name,
        model=name,
        path="ours",
        decode="graph vs reference",
        guidance="free",
        batch=batch,
        precision=precision,
        token_agreement=same.float().mean().item(),
        sequence_agreement=same.all(dim=1).float().mean().item(),
    )


def noise_identity(device: torch.device) -> dict:
    """Whether the counter-based noise is bit-identical on this device and on the CPU (1024 keys x 4096 lanes
    at a few steps and streams)."""
    keys = [sample_seed(0, i) for i in range(1024)]
    cpu, dev = CounterRNG(keys, "cpu"), CounterRNG(keys, device)
    same = all(
        torch.equal(cpu.uniform(4096, step, stream), dev.uniform(4096, step, stream).cpu())
        for step, stream in ((0, 0), (7, 0), (9, 1))
    )
    return dict(kind="noise", draws=3 * 1024 * 4096, bit_identical_to_cpu=same)


def bench(args, save) -> list[dict]:
    """Run the plan (or --cases), calling ``save(records)`` after every case."""
    device = torch.device(args.device)
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    if args.cases:
        plan = [(*c.split(":"), BOTH)[:4] for c in args.cases]
        if any(c[0] not in PRESETS or c[1] not in ("ours", "official") for c in plan):
            raise SystemExit(
                f"--cases: expected MODEL:ours|official:DECODE[:free|cfg], MODEL in {list(PRESETS)}"
            )
    if args.models:
        plan = [c for c in plan if c[0] in args.models]
    bandwidth, flops = card_peaks(device, args)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    start, records = time.perf_counter(), []
    built = built_error = built_key = None
    if device.type == "cuda":
        records.append({"device": card, **noise_identity(device)})
        print(json.dumps(records[-1]), flush=True)
    for name, side, decode, guidances in plan:
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_SECONDS.get(decode, MIN_SECONDS["default"]):
            print(f"skip {name} {side} {decode}: {left:.0f} s of the budget left", flush=True)
            continue
        p = PRESETS[name]
        f = FAMILY[p["family"]]
        precision = f["precision"] if device.type == "cuda" else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if built_key != (name, side):  # one model resident at a time
            built = built_error = None
            free_memory(device)
            try:
                built = build_ours(name, device) if side == "ours" else build_official(name, device, dtype)
            except Exception as e:  # e.g. the official code missing: a result too, the other cases still run
                built_error = f"{type(e).__name__}: {e}"[:300]
                print(f"{name} {side}: FAILED {built_error}", flush=True)
            built_key = (name, side)
        model = built[1] if side == "ours" and built else built
        batch = args.batch or p["batch"]
        if decode.startswith("agreement") and built is not None:
            precision = "fp32" if decode.endswith("fp32") else precision
            records.append(
                {"device": card, **agreement(name, built, device, precision, args.agreement_batch)}
            )
            print(json.dumps(records[-1]), flush=True)
            save(records)
            continue
        for guidance_name in guidances.split(","):
            if side == "ours" and built:
                model.clear_caches()  # a new decoder per case (the ablation changes its attention blocks)
            scale = f[guidance_name]
            record = dict(
                kind="throughput", device=card, family=p["family"], model=name, path=side, decode=decode
            )
            record.update(guidance=guidance_name, guidance_scale=scale, batch=batch, precision=precision)
            try:
                if built_error:
                    raise RuntimeError(built_error)
                with attention_blocks(10**9 if decode.endswith(FULL) else None):
                    if side == "ours":
                        run = ours_runner(built, batch, scale, decode.removesuffix(FULL), device, precision)
                        warmup = run
                    else:
                        warmup, run = official_runner(name, model, batch, scale, decode, device)
                    forwards = model if device.type == "cpu" else None
                    timing = run_case(warmup, run, device, args.repeats, forwards)
            except Exception as e:  # a path that fails on this machine is a result too
                record.update(images_per_s=None, error=f"{type(e).__name__}: {e}"[:300])
                print(f"{name} {side} {decode} {guidance_name}: FAILED {record['error']}", flush=True)
                records.append(record)
                save(records)
                continue
            record["images_per_s"] = batch / timing["s_per_batch"]
            record.update({k: timing[k] for k in ("s_per_batch", "cpu_s_per_batch", "setup_s", "peak_gib")})
            rows = 2 * batch if scale != f["free"] else batch
            if bandwidth:
                limit = roofline_seconds(model, p["family"], rows, dtype.itemsize, bandwidth, flops)
                record.update(
                    limit_images_per_s=batch / limit, fraction_of_limit=limit / timing["s_per_batch"]
                )
            else:
                record.update(limit_images_per_s=None, fraction_of_limit=None)
            if device.type == "cpu":  # in process CPU time
                steps = model.config.block_size if p["family"] == "llamagen" else len(model.patch_nums)
                outside = timing["cpu_s_per_batch"] - timing["forward_cpu_s"]
                record.update(
                    images_per_cpu_s=batch / timing["cpu_s_per_batch"],
                    forward_ms_per_step=1e3 * timing["forward_cpu_s"] / steps,
                    overhead_ms_per_step=1e3 * outside / steps,
                    overhead_fraction=outside / timing["forward_cpu_s"],
                )
            records.append(record)
            print(json.dumps(record), flush=True)
            save(records)
        if side == "ours" and built:
            model.clear_caches()  # KV caches and graphs
    return records


# ----------------------------------------------------------------------------- output


def fmt(x, spec=".2f", none="—") -> str:
    return none if x is None else format(x, spec)


def rate(r: dict | None) -> float | None:
    """Images per second: per CPU second on a CPU (robust to other jobs), per wall second on a GPU."""
    return r.get("images_per_cpu_s") or r.get("images_per_s") if r else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def table(records: list[dict], host: str, args) -> str:
    agree = [r for r in records if r.get("kind") == "agreement"]
    noise = [r for r in records if r.get("kind") == "noise"]
    records = [r for r in records if r.get("kind") == "throughput"]
    by = {(r["device"], r["model"], r["path"], r["decode"], r["guidance"]): r for r in records}

    def official(r: dict, decode: str) -> dict | None:
        return by.get((r["device"], r["model"], "official", decode, r["guidance"]))

    lines = [
        "| device | model | path | decode | batch | precision | images/s (free, CFG) | free / CFG "
        "| vs official eager (free, CFG) | vs official compile (free, CFG) | of limit (free, CFG) "
        "| peak GiB (free, CFG) | setup s | sampler overhead per step (free, CFG) |",
        "|" + "---|" * 14,
    ]
    for device, model, path, decode in dict.fromkeys(k[:4] for k in by):
        pair = [by.get((device, model, path, decode, g), {}) for g in ("free", "cfg")]  # {}: not run

        def each(cell, rs=pair) -> str:
            return ", ".join(cell(r) if r else "—" for r in rs)

        cells = [
            each(lambda r: fmt(rate(r))),
            ratio(rate(pair[0]), rate(pair[1])),
            each(lambda r: ratio(rate(r), rate(official(r, "eager")))),
            each(lambda r: ratio(rate(r), rate(official(r, "compile")))),
            each(lambda r: fmt(r.get("fraction_of_limit"))),
            each(lambda r: fmt(r.get("peak_gib"))),
            each(lambda r: fmt(r.get("setup_s"), ".1f")),
            each(lambda r: f"{r['overhead_ms_per_step']:.2f} ms ({100 * r['overhead_fraction']:.1f} %)")
            if any("overhead_fraction" in r for r in pair)
            else "—",
        ]
        errors = [r["error"] for r in pair if r.get("error")]
        if errors:
            cells[-1] = f"failed: {errors[0]}"
        first = pair[0] or pair[1]
        head = f"| {device} | {model} | {path} | {decode} | {first['batch']} | {first['precision']} | "
        lines.append(head + " | ".join(cells) + " |")
    setup = (
        f"Machine: {host}. Best of {args.repeats} batch(es) after one warm-up batch per case (setup s: the "
        "warm-up, including capture or compilation); random weights, the same in both samplers; image "
        "decoding excluded. CPU: float32, images per second of process CPU time (the machine is shared), "
        "sampler overhead = CPU time outside the transformer forwards per decode step (% of the forwards). "
        "GPU: LlamaGen bf16 weights, VAR fp16 autocast (the official samplers' precision), wall time; of "
        "limit = measured / roofline rate of the card. Guidance: LlamaGen 1.0 / 1.75, VAR 0 / 1.5; LlamaGen "
        "top-k 0, top-p 1.0; VAR top-k 900, top-p 0.96 (paper settings)."
    )
    for r in noise:
        same = "bit-identical to" if r["bit_identical_to_cpu"] else "DIFFERENT from"
        lines += ["", f"Counter noise on {r['device']}: {r['draws']:,} uniforms {same} the CPU's."]
    if agree:
        lines += [
            "",
            "| device | model | precision | batch | tokens identical, graph vs reference | sequences |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for r in agree:
            lines.append(
                f"| {r['device']} | {r['model']} | {r['precision']} | {r['batch']} | "
                f"{100 * r['token_agreement']:.2f} % | {100 * r['sequence_agreement']:.1f} % |"
            )
    return "\n".join(["# bench_generate", "", setup, "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=None, help="MODEL:ours|official:DECODE (default: the plan)")
    p.add_argument("--models", nargs="+", default=None, help=f"only these of {list(PRESETS)}")
    p.add_argument("--agreement-batch", type=int, default=64, help="samples per agreement check (GPU)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: the preset's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds; later cases are skipped")
    p.add_argument("--peak-gbps", type=float, default=None, help="card bandwidth if not in CARDS")
    p.add_argument("--peak-tflops", type=float, default=None, help="card dense bf16 TFLOPS if not in CARDS")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=str(RESULTS / "bench_generate.json"))
    p.add_argument("--md", default=None, help="default: bench_generate[_gpu].md beside --json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    host, path = machine(), Path(args.json)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kept = [r for r in json.loads(path.read_text()) if r["device"] != card] if path.exists() else []
    md_path = args.md or path.with_name(f"bench_generate{'_gpu' if device.type == 'cuda' else ''}.md")

    def save(records: list[dict]) -> None:  # after every case: a killed run keeps what it measured
        atomic_write_json(kept + records, path)
        atomic_write_text(table(records, host, args), md_path)

    records = bench(args, save)
    save(records)
    print(table(records, host, args))


if __name__ == "__main__":
    main()
