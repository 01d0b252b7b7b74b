"""The CCA training step side by side with the official trainers: images/s per device, MFU, peak memory.

Paths, per model, all in this one process on random weights (policy and its frozen copy):

* ``ours`` — ``ccalign.train.loop.train`` itself (DataLoader, fused head log-probability, inference-mode
  reference, fused AdamW, non-finite check; only its checkpoint and export writes are switched off) with
  the model's ``config/paper.yaml`` fine-tuning settings, at the largest power-of-two micro-batch ≤ the
  per-device batch that fits, accumulating up to the per-device batch;
* ``ours_official_batching`` — the same at the official micro-batch (paper.yaml: LlamaGen 2, VAR-d16 8,
  VAR-d24 4) × accumulation;
* ``official`` — the official step from thu-ml/CCA @ 7d5a073 with its LlamaGen @ ce98ec4 / VAR @ cf0321a
  submodules, fetched into ``.cache/official/CCA`` (``--official``; git-ignored, never committed), at the
  official micro-batch. Neither script imports as is, so the benchmark drives their code:
  LlamaGen: ``LlamaGen_finetune.py``'s ``main()`` needs torchrun, a 1.28M-file code folder and a
  checkpoint, so its ``creat_optimizer`` and the ``for x, y in loader:`` loop of ``main()`` are compiled
  from the file and run on in-memory micro-batches, with its own ``GPT`` (autoregressive/models/gpt.py),
  a deep-copied reference, no DDP (one process) and no torch.compile; VAR: ``VAR_CCA_trainer.py``'s
  ``VAR_CCATrainer.train_step`` as is, with its own VAR/VQVAE (built with VAR_finetune's arguments but
  without its global ``reset_parameters`` patch) and ``AmpOptimizer``; the modules it imports for
  logging need pytz and typed-argument-parser, stubbed with empty modules when absent (train_step uses
  neither). The official VAR step encodes images with the VQVAE every step (ours reads cached codes).

Precision: paper.yaml's (LlamaGen bf16, VAR fp16) on GPU; float32 on CPU (the official autocast is
CUDA-only). MFU = images/s × 16·N·T / peak (policy forward + backward over [positive; negative], reference
forward), N = parameters applied per token (no embedding tables, no VAR AdaLN projections of the class),
T = tokens per image; the peak is the GPU's dense bf16/fp16 rate, or on CPU this process's measured float32
GEMM rate. Time: wall time on GPU; on CPU this
process's user CPU time, as the development VM's cores are shared with other jobs. Peak memory: GPU
``max_memory_allocated``; CPU the peak resident set over the run minus the resident set before its models
were built (glibc returning freed blocks at once, see ``_cpu_env``).

Loss-path memory (target ≤ 0.25× naive): one full CCA step (policy forward/backward, reference forward,
AdamW) of the first model of each family, its peak minus the same step's peak with the head and the
log-probability left out (``backbone``), for the official full-logits path and ours.

    python benchmarks/bench_train.py                          # CPU, small presets
    python benchmarks/bench_train.py --device cuda            # GPT-L, GPT-XL, VAR-d16, VAR-d24
    python benchmarks/bench_train.py --device cuda --compile --models llamagen_L llamagen_XL

Writes a Markdown report (``--out``) and merges its records into benchmarks/results/bench_train.json
(records of other devices are kept).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import re
import resource
import sys
import time
import types
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from machine import machine
from torch.utils.data import TensorDataset

from ccalign.align.step import TeacherForcing, contrastive_step
from ccalign.config import load_config
from ccalign.families import get_family
from ccalign.io import atomic_write_text
from ccalign.models import llamagen
from ccalign.models import var as var_model
from ccalign.train import checkpoint as ckpt
from ccalign.train import loop
from ccalign.train.optim import build_optimizer, no_decay_names
from ccalign.train.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
GPU_MODELS = ("llamagen_L", "var_d16", "llamagen_XL", "var_d24")  # the first of each family first
# CPU: the same paper.yaml entries, shrunk (model-argument overrides): short sequences to time steps, the
# real sequence length and vocabulary (few, narrow layers) to measure the loss path's memory
CPU_MODELS = {
    "llamagen_L": {
        "step": {"preset": "GPT-B", "n_layer": 4, "block_size": 64},
        "memory": {"preset": "GPT-B", "n_layer": 2},
    },
    "var_d16": {"step": {"depth": 6, "patch_nums": [1, 2, 3, 4, 5, 6, 8]}, "memory": {"depth": 4}},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 / fp16 tensor-core rates
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Case:
    """One paper.yaml model at benchmark size."""

    name: str
    family: str
    model_args: dict
    tokenizer_args: dict
    settings: TrainSettings  # the paper's fine-tuning settings (precision set per device)
    official_micro: int


def load_cases(names: list[str], device: torch.device, config: str, scope: str = "step") -> list[Case]:
    """The paper.yaml models ``names``; on CPU shrunk for ``scope`` ("step" or "memory") and in float32."""
    cfg = load_config(config)
    cases = []
    for name in names:
        mcfg = cfg["models"][name]
        variant = mcfg["variants"]["cca"]  # the paper's guidance-free CCA run
        settings = TrainSettings.create("cca", variant["lam"], **mcfg["finetune"])
        model_args = {**mcfg["args"], **settings.model_args}
        tokenizer_args = dict(cfg["tokenizers"][mcfg["tokenizer"]].get("args") or {})
        if device.type == "cpu":
            model_args.update(CPU_MODELS[name][scope])
            if mcfg["family"] == "var":  # a narrow tokenizer with the model's scales
                scales = model_args.get("patch_nums", tokenizer_args["v_patch_nums"])
                tokenizer_args.update(ch=32, v_patch_nums=scales)
            settings = dataclasses.replace(settings, precision="fp32")
        cases.append(
            Case(name, mcfg["family"], model_args, tokenizer_args, settings, settings.micro_batch or 2)
        )
    return cases


# ------------------------------------------------------------------------------------------------ measuring


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory of a block over what was held before it, GiB: CUDA allocated, or CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark := the resident set
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.gib = (peak - self.base) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device) -> float:
    """Seconds: wall time on GPU; on CPU this process's user CPU time (other processes share the cores, and
    the kernel's page faults under ``_cpu_env`` would be charged to whichever path allocates more often)."""
    return time.perf_counter() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_utime


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s, what it is): the GPU's dense bf16 peak, or the CPU's measured float32 GEMM rate."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOPS (given)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{tflops:g} TFLOPS (dense bf16/fp16 of {key})"
        raise SystemExit(f"unknown peak rate of {name}: pass --peak-tflops")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = []
    for _ in range(5):  # the best of several
        t0 = clock(device)
        a @ b
        seconds.append(clock(device) - t0)
    rate = 2 * 2048**3 / min(seconds)
    threads = torch.get_num_threads()
    return rate, f"{rate / 1e9:.0f} GFLOP/s per CPU second (measured float32 2048² GEMM, {threads} threads)"


def flops_per_image(case: Case) -> float:
    """16·N·T of our model of ``case``, N = the parameters applied to every token: without embedding tables
    (lookups) and VAR's AdaLN projections of the class embedding (``ada_lin``: once per image)."""
    family = get_family(case.family)
    with torch.device("meta"):
        model = family.build_model(case.model_args)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(
        p.numel() for name, p in model.named_parameters() if id(p) not in tables and "ada_lin" not in name
    )
    return 16 * n * family.seq_len(model)


def record(case: Case, device: torch.device, path: str, **fields) -> dict:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "family": case.family, "model": case.name, "path": path, **fields}


# ------------------------------------------------------------------------------------------------ ours


def _models(case: Case, device: torch.device):
    """(family, policy, reference, tokenizer) with random weights, built on the device."""
    family = get_family(case.family)
    with torch.device(device):
        model = family.build_model(case.model_args)
        reference = family.build_model(case.model_args)
        tokenizer = family.build_tokenizer(case.tokenizer_args) if case.family == "var" else None
    reference.load_state_dict(model.state_dict())
    return family, model, reference, tokenizer


@contextlib.contextmanager
def _benchmarked_train(device: torch.device):
    """train() as is, except that its resumable state and final export are not written (steps, not disks)
    and that its throughput window reads ``clock`` (CPU time on CPU)."""
    saved = ckpt.save_state, loop._export, loop.time
    ckpt.save_state = loop._export = lambda *args, **kwargs: None
    loop.time = SimpleNamespace(perf_counter=partial(clock, device))
    try:
        yield
    finally:
        ckpt.save_state, loop._export, loop.time = saved


def run_ours(case: Case, device: torch.device, micro: int, batch: int, steps: int, compile_: bool) -> dict:
    """``train()`` for 2·steps optimizer steps of ``batch`` images; the second half is timed."""
    with PeakMemory(device) as mem:
        family, model, reference, tokenizer = _models(case, device)
        n = batch * 2 * steps
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, family.vocab_size(model), (n, family.seq_len(model)), generator=g)
        data = TensorDataset(codes, torch.randint(0, family.num_classes(model), (n,), generator=g))
        settings = dataclasses.replace(
            case.settings,
            global_batch=batch,
            micro_batch=micro,
            max_steps=2 * steps,
            log_every=steps,
            ckpt_every=10**9,
            compile=compile_,
            keep_state=False,
        )
        with _benchmarked_train(device):
            result = loop.train(
                family,
                model,
                data,
                settings,
                seed=0,
                out=RESULTS / "unused.pt",
                state_dir=RESULTS / "unused_state",
                reference=reference,
                tokenizer=tokenizer,
            )
    ips = result.metrics["images_per_s"]
    return dict(micro_batch=micro, accumulation=batch // micro, images_per_s=ips, peak_gib=mem.gib)


def best_ours(case: Case, device: torch.device, batch: int, steps: int) -> dict:
    """``run_ours`` at the largest power-of-two micro-batch ≤ ``batch`` that fits in memory."""
    micro = 1 << (batch.bit_length() - 1)
    while micro >= 1:
        try:
            return run_ours(case, device, micro, batch, steps, False)
        except torch.OutOfMemoryError:
            print(f"{case.name}: micro-batch {micro} does not fit", flush=True)
            micro //= 2
    raise SystemExit(f"{case.name}: not even a micro-batch of 1 fits")


# ------------------------------------------------------------------------------------------------ official


@contextlib.contextmanager
def official_imports(*dirs: Path):
    """Import official modules with ``dirs`` first on sys.path; afterwards forget every module loaded from
    them (LlamaGen and VAR both have top-level ``utils`` and ``dataset``-style packages)."""
    for name, attrs in {"pytz": {}, "tap": {"Tap": object}}.items():  # VAR/utils/{misc,arg_util}.py
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attrs)
    roots = [str(d) for d in dirs]
    sys.path[:0] = roots
    try:
        yield
    finally:
        del sys.path[: len(roots)]
        official = [
            name
            for name, mod in sys.modules.items()
            if str(getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [])), "")).startswith(
                str(dirs[0].parent)
            )
        ]
        for name in official:
            del sys.modules[name]


@contextlib.contextmanager
def _quiet_official():
    """Silence the official constructors' printing; accept the ``print(..., force=True)`` that VAR's
    distributed set-up normally installs."""
    real = builtins.print
    builtins.print = lambda *args, force=False, **kwargs: None
    try:
        yield
    finally:
        builtins.print = real


def _official_loop(script: Path) -> tuple[types.CodeType, types.CodeType, set[str]]:
    """(``creat_optimizer`` definition, main()'s ``for x, y in loader:`` loop, names that loop reads)."""
    tree = ast.parse(script.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    loop_node = next(
        n
        for n in ast.walk(funcs["main"])
        if isinstance(n, ast.For) and isinstance(n.iter, ast.Name) and n.iter.id == "loader"
    )
    names = [n for n in ast.walk(loop_node) if isinstance(n, ast.Name)]
    read = {n.id for n in names if isinstance(n.ctx, ast.Load)}
    stored = {n.id for n in names if isinstance(n.ctx, ast.Store)}
    updated = {n.target.id for n in ast.walk(loop_node) if isinstance(n, ast.AugAssign)}  # need a start value
    return (
        compile(ast.Module(body=[funcs["creat_optimizer"]], type_ignores=[]), str(script), "exec"),
        compile(ast.Module(body=[loop_node], type_ignores=[]), str(script), "exec"),
        (read - stored | updated) - set(vars(builtins)),
    )


def run_official_llamagen(case: Case, device: torch.device, official: Path, batch: int, steps: int) -> dict:
    micro, s = case.official_micro, case.settings
    accum = batch // micro
    with PeakMemory(device) as mem:
        with official_imports(official / "LlamaGen"):
            from autoregressive.models.gpt import ModelArgs, Transformer  # noqa: PLC0415
        args = dict(case.model_args)
        preset = args.pop("preset", None)
        ours = llamagen.ModelArgs.from_name(preset, **args) if preset else llamagen.ModelArgs(**args)
        known = {f.name for f in dataclasses.fields(ModelArgs)}
        margs = {k: v for k, v in ours.to_dict().items() if k in known}
        with torch.device(device):
            model = Transformer(ModelArgs(**margs))
        ref_model = copy.deepcopy(model).requires_grad_(False)
        make_optimizer, loop_code, needed = _official_loop(official / "LlamaGen_finetune.py")
        ns = {"torch": torch, "F": F, "time": time, "inspect": __import__("inspect")}
        exec(make_optimizer, ns)  # noqa: S102 - the official function, from the fetched file
        logger = SimpleNamespace(info=lambda *a, **k: None)
        optimizer = ns["creat_optimizer"](model, s.weight_decay, s.lr, s.betas, logger)
        model.train()
        ref_model.train()  # as main(): the reference keeps its dropout
        args = SimpleNamespace(
            uncond_ratio=s.uncond_ratio,
            num_classes=margs["num_classes"],
            loss_type="CCA",
            lambda_=s.lam,
            beta=s.beta,
            gradient_accumulation_steps=accum,
            max_grad_norm=1.0,
            ema=False,
            no_compile=True,
            log_every=10**9,
            ckpt_every=10**9,
            no_local_save=True,
        )
        g = torch.Generator().manual_seed(0)
        T, V = margs["block_size"], margs["vocab_size"]

        def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [
                (torch.randint(0, V, (micro, T), generator=g), torch.randint(0, 1000, (micro,), generator=g))
                for _ in range(n)
            ]

        ns.update(
            args=args,
            device=device,
            model=model,
            ref_model=ref_model,
            optimizer=optimizer,
            ptdtype=_DTYPES[s.precision],
            scaler=torch.amp.GradScaler(device.type, enabled=s.precision == "fp16"),
            acc_step=0,
            train_steps=1000,  # > 999: main()'s per-step logging (and its all_reduce) stays off
            log_steps=0,
            dist=torch.distributed,
            logger=logger,
            ema=None,  # args.ema is off: update_ema and the checkpoint names are never reached
            update_ema=None,
            rank=0,
            checkpoint_dir="",
            **{n: 0 for n in needed if n.startswith("running_")},
        )
        ns["loader"] = batches(steps * accum)
        missing = needed - set(ns)
        if missing:
            raise SystemExit(
                f"the official loop reads names this benchmark does not provide: {sorted(missing)}"
            )
        exec(loop_code, ns)  # noqa: S102 - warm-up
        _sync(device)
        ns["loader"] = batches(steps * accum)
        t0 = clock(device)
        exec(loop_code, ns)  # noqa: S102 - timed
        _sync(device)
        seconds = clock(device) - t0
    return dict(micro_batch=micro, accumulation=accum, images_per_s=steps * batch / seconds, peak_gib=mem.gib)


def run_official_var(case: Case, device: torch.device, official: Path, batch: int, steps: int) -> dict:
    micro, s = case.official_micro, case.settings
    accum = batch // micro
    with PeakMemory(device) as mem:
        with official_imports(official, official / "VAR"):
            import VAR_CCA_trainer as trainer_module  # noqa: PLC0415
            from utils.lr_control import filter_params  # noqa: PLC0415
        cfg = var_model.VARConfig.from_dict(case.model_args)
        t = case.tokenizer_args
        patch_nums = tuple(t["v_patch_nums"])
        vae_kw = dict(vocab_size=t["vocab_size"], z_channels=t["z_channels"], ch=t["ch"], test_mode=True)
        vae_kw.update(share_quant_resi=t.get("share_quant_resi", 4), v_patch_nums=patch_nums)
        var_kw = dict(
            num_classes=cfg.num_classes,
            depth=cfg.depth,
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=cfg.drop_path_rate,
            norm_eps=1e-6,
            shared_aln=cfg.shared_aln,
            cond_drop_rate=0.0,
            attn_l2_norm=cfg.attn_l2_norm,
            patch_nums=patch_nums,
            flash_if_available=True,
            fused_if_available=True,
        )
        with torch.device(device), _quiet_official():
            vae = trainer_module.VQVAE(**vae_kw)
            var = trainer_module.VAR(vae_local=vae, **var_kw)
            ref = trainer_module.VAR(vae_local=vae, **var_kw)
            var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
            ref.load_state_dict(var.state_dict())
            # VAR_finetune.py's no-decay keys: ccalign's VAR list without "bias" (filter_params adds biases)
            nowd_keys = set(get_family("var").no_decay_keys) - {"bias"}
            names, paras, groups = filter_params(var, nowd_keys=nowd_keys)
        adamw = torch.optim.AdamW(
            groups, lr=s.lr, weight_decay=0, betas=(0.9, 0.95), fused=device.type == "cuda"
        )
        amp = {"fp32": 0, "fp16": 1, "bf16": 2}[s.precision]
        var_opt = trainer_module.AmpOptimizer(
            amp, adamw, names, paras, grad_clip=s.grad_clip, n_gradient_accumulation=accum
        )
        trainer = trainer_module.VAR_CCATrainer(
            device=device,
            patch_nums=patch_nums,
            resos=tuple(p * 16 for p in patch_nums),
            vae_local=vae,
            ref_var_wo_ddp=ref,
            var_wo_ddp=var,
            var=var,  # one process: no DDP wrapper (train_step only sets require_backward_grad_sync on it)
            var_opt=var_opt,
            label_smooth=0.0,
            loss_type="CCA",
            beta=s.beta,
            lambda_=s.lam,
            uncond_ratio=s.uncond_ratio,
        )
        g = torch.Generator(device=device).manual_seed(0)
        side = patch_nums[-1] * 16
        no_log = SimpleNamespace(log_iters=set())

        def run(n_steps: int) -> None:
            for _ in range(n_steps):
                for m in range(accum):
                    images = torch.rand(micro, 3, side, side, generator=g, device=device) * 2 - 1
                    labels = torch.randint(0, cfg.num_classes, (micro,), generator=g, device=device)
                    # it=1, g_it=50: the per-iteration metric logging of train_step stays off
                    trainer.train_step(1, 50, m == accum - 1, no_log, None, images, labels, -1, 1.0)

        run(steps)  # warm-up
        _sync(device)
        t0 = clock(device)
        run(steps)
        _sync(device)
        seconds = clock(device) - t0
    return dict(micro_batch=micro, accumulation=accum, images_per_s=steps * batch / seconds, peak_gib=mem.gib)


# ------------------------------------------------------------------------------------------------ one step


class Backbone(TeacherForcing):
    """The step without head and log-probability: one scalar per sample from the final hidden states."""

    def forward(self, labels: torch.Tensor, codes: torch.Tensor, logp: bool = False) -> torch.Tensor:
        hidden, _, _ = self.family.hidden(self.model, self.tokenizer, labels, codes)
        return hidden.float().mean(dim=(1, 2))


class OneStep:
    """One full CCA step (policy forward + backward, reference forward, AdamW) of ``case`` on one fixed
    micro-batch, through a chosen log-probability path ("backbone": without head and log-probability)."""

    def __init__(self, case: Case, device: torch.device, micro: int) -> None:
        self.family, self.model, self.reference, self.tokenizer = _models(case, device)
        self.model.train()
        s = self.settings = case.settings
        names = no_decay_names(self.model, self.family.no_decay_keys)
        self.optimizer = build_optimizer(
            self.model, names, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, device=device
        )
        self.autocast = torch.autocast(device.type, dtype=_DTYPES[s.precision], enabled=s.precision != "fp32")
        g = torch.Generator().manual_seed(0)
        shape = (micro, self.family.seq_len(self.model))
        self.codes = torch.randint(0, self.family.vocab_size(self.model), shape, generator=g).to(device)
        self.labels = torch.randint(0, self.family.num_classes(self.model), (micro,), generator=g).to(device)

    def __call__(self, path: str = "fused") -> None:
        make, logp_path = (Backbone, "fused") if path == "backbone" else (TeacherForcing, path)
        s = self.settings
        loss, _ = contrastive_step(
            make(self.family, self.model, self.tokenizer, logp_path),
            make(self.family, self.reference, self.tokenizer, logp_path),
            self.labels,
            self.codes,
            objective="cca",
            beta=s.beta,
            lam=s.lam,
            uncond_ratio=s.uncond_ratio,
            num_classes=self.family.num_classes(self.model),
            autocast=self.autocast,
        )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def loss_memory(case: Case, device: torch.device, micro: int) -> list[dict]:
    """Peak memory of one full CCA step per log-probability path, and of the step without the loss path."""
    step, peaks = OneStep(case, device, micro), {}
    for path in ("backbone", "naive", "logits", "fused"):
        step(path)  # the optimizer state exists before the measured step
        with PeakMemory(device) as mem:
            step(path)
            _sync(device)
        peaks[path] = mem.gib
    names = {"naive": "official", "logits": "ours_logits", "fused": "ours", "backbone": "backbone"}
    return [
        record(
            case,
            device,
            names[path],
            kind="loss_memory",
            micro_batch=micro,
            accumulation=1,
            precision=case.settings.precision,
            images_per_s=None,
            mfu=None,
            peak_gib=peak,
            loss_path_gib=peak - peaks["backbone"],
        )
        for path, peak in peaks.items()
    ]


def profile_ours(case: Case, device: torch.device, micro: int, rows: int = 12) -> str:
    """torch.profiler table (self time) of one CCA step of ours after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    step = OneStep(case, device, micro)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def adamw_seconds(case: Case, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Seconds per AdamW update of the model's parameters: for-loop, foreach and fused implementations."""
    family = get_family(case.family)
    with torch.device(device):
        params = list(family.build_model(case.model_args).parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    out = {}
    for name, kw in {
        "for-loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }.items():
        optimizer = torch.optim.AdamW(params, lr=1e-5, **kw)
        optimizer.step()  # creates the state
        seconds = []
        for _ in range(repeats):
            _sync(device)
            t0 = clock(device)
            optimizer.step()
            _sync(device)
            seconds.append(clock(device) - t0)
        out[name] = min(seconds)
    return out


# ------------------------------------------------------------------------------------------------ report


def _cpu_env() -> None:
    """Re-run under glibc settings that hand freed blocks over 64 KiB back at once, so that the resident
    set follows live tensors (CPU peak memory)."""
    want = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


def markdown(
    records: list[dict], memory: list[dict], adamw: dict[str, dict], peak_desc: str, profile_text: str, args
) -> str:
    lines = [
        "# bench_train: the CCA step beside the official trainers",
        "",
        f"Machine: {machine()}",
        "",
        f"Per-device batch {args.batch} images (the official recipe's 256 / 8 GPUs = 32 on GPU); "
        f"{args.steps} warm-up + {args.steps} timed optimizer steps per run, the fastest of {args.rounds} "
        "run(s) per row (the paths in turn); random weights; MFU against "
        f"{peak_desc}; 16·N FLOPs per image token (N: parameters applied per token). Time: "
        + (
            "wall time."
            if args.device != "cpu"
            else "this process's user CPU time (other jobs share the cores)."
        ),
        "",
        "| model | path | compile | micro × accum. | precision | images/s | MFU | peak GiB | vs official |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    official = {r["model"]: r["images_per_s"] for r in records if r["path"] == "official"}
    for r in records:
        ratio = f"{r['images_per_s'] / official[r['model']]:.2f}×" if r["model"] in official else "—"
        lines.append(
            f"| {r['model']} | {r['path']} | {'yes' if r.get('compile') else 'no'} | "
            f"{r['micro_batch']} × {r['accumulation']} | {r['precision']} | {r['images_per_s']:.2f} | "
            f"{r['mfu'] * 100:.1f}% | {r['peak_gib']:.2f} | {ratio} |"
        )
    if memory:
        lines += [
            "",
            "## Loss-path memory within one full CCA step",
            "",
            "Step peak over the memory held before it (weights, AdamW state); loss path = that peak minus",
            "the peak of the same step without head and log-probability (backbone). official: full logits",
            "and full log_softmax; ours_logits: full logits, row-chunked log-probability writing its",
            "gradient over them; ours: output head fused with the log-probability (no (B, T, V) logits).",
            "",
            "| model | micro-batch | path | step peak GiB | loss path GiB | vs official |",
            "|---|---:|---|---:|---:|---:|",
        ]
        naive = {m["model"]: m["loss_path_gib"] for m in memory if m["path"] == "official"}
        for m in memory:
            ratio = f"{m['loss_path_gib'] / naive[m['model']]:.2f}×" if m["path"] != "backbone" else "—"
            lines.append(
                f"| {m['model']} | {m['micro_batch']} | {m['path']} | {m['peak_gib']:.3f} | "
                f"{m['loss_path_gib']:.3f} | {ratio} |"
            )
    if adamw:
        lines += ["", "## AdamW update, seconds (best of 3)", "", "| model | for-loop | foreach | fused |"]
        lines.append("|---|---:|---:|---:|")
        for model, t in adamw.items():
            lines.append(f"| {model} | {t['for-loop']:.4f} | {t['foreach']:.4f} | {t['fused']:.4f} |")
    if profile_text:
        lines += [
            "",
            "## Profile of one step of ours (self time, top ops)",
            "",
            "```",
            profile_text.strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def merge_json(path: Path, records: list[dict]) -> None:
    """Add ``records`` to ``path`` (a JSON list), replacing earlier records of the same device, kind ("step":
    beside the official trainers, "compile": eager vs compiled, "loss_memory"), model, path and compile
    setting; other devices' and other kinds' records stay."""

    def key(r: dict) -> tuple:
        return r["device"], r["kind"], r["model"], r["path"], r.get("compile", False)

    new = {key(r) for r in records}
    old = json.loads(path.read_text()) if path.is_file() else []
    atomic_write_text(json.dumps([r for r in old if key(r) not in new] + records, indent=1) + "\n", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (small presets) or cuda")
    p.add_argument(
        "--models", nargs="+", help=f"paper.yaml models (GPU default {GPU_MODELS}, CPU {list(CPU_MODELS)})"
    )
    p.add_argument("--config", default=str(ROOT / "config" / "paper.yaml"))
    p.add_argument("--batch", type=int, help="images per optimizer step per device (GPU 32, CPU 8)")
    p.add_argument("--steps", type=int, help="warm-up and timed optimizer steps (GPU 3, CPU 2)")
    p.add_argument(
        "--rounds", type=int, help="runs of every path, in turn; the fastest counts (GPU 1, CPU 2)"
    )
    p.add_argument("--compile", action="store_true", help="only ours, eager then with compile: true")
    p.add_argument(
        "--official", default=str(ROOT / ".cache" / "official" / "CCA"), help="thu-ml/CCA checkout"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the loss-path memory rows")
    p.add_argument(
        "--memory-micro", type=int, help="micro-batch of the memory rows (default: GPU --batch, CPU 2)"
    )
    p.add_argument("--profile", action="store_true", help="append a torch.profiler table of one step of ours")
    p.add_argument("--peak-tflops", type=float, help="peak rate for MFU (default: by GPU name)")
    p.add_argument("--json", default=str(RESULTS / "bench_train.json"))
    p.add_argument("--out", help="Markdown report (default results/bench_train.md, _gpu.md on GPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if cpu:
        _cpu_env()
    args.batch = args.batch or (8 if cpu else 32)
    args.steps = args.steps or (2 if cpu else 3)
    args.rounds = args.rounds or (2 if cpu else 1)
    official = Path(args.official)
    if not args.compile and not (official / "LlamaGen_finetune.py").is_file():
        raise SystemExit(
            f"no official code in {official}: fetch thu-ml/CCA @ 7d5a073 there, with its submodules "
            "LlamaGen @ ce98ec4 and VAR @ cf0321a in LlamaGen/ and VAR/"
        )
    names = args.models or (list(CPU_MODELS) if cpu else list(GPU_MODELS))
    memory_cases = {c.name: c for c in load_cases(names, device, args.config, scope="memory")}
    rate, peak_desc = peak_flops(device, args.peak_tflops)
    out = args.out or str(RESULTS / ("bench_train.md" if cpu else "bench_train_gpu.md"))
    records, memory, families, adamw = [], [], set(), {}

    def write(profile_text: str = "") -> None:  # after every model: a time limit keeps what was measured
        atomic_write_text(markdown(records, memory, adamw, peak_desc, profile_text, args), out)
        kind = "compile" if args.compile else "step"  # "compile": eager vs compiled, measured together
        merge_json(Path(args.json), [{**r, "kind": kind} for r in records] + memory)

    for case in load_cases(names, device, args.config):
        case.official_micro = min(case.official_micro, args.batch)
        first = best_ours(case, device, args.batch, args.steps)
        micro, steps = first["micro_batch"], args.steps
        paths = {("ours", False): partial(run_ours, case, device, micro, args.batch, steps, False)}
        if args.compile:  # eager and compiled back to back, under the same load
            paths["ours", True] = partial(run_ours, case, device, micro, args.batch, steps, True)
        else:
            if case.official_micro != micro:
                batching = partial(run_ours, case, device, case.official_micro, args.batch, steps, False)
                paths["ours_official_batching", False] = batching
            runner = run_official_llamagen if case.family == "llamagen" else run_official_var
            paths["official", False] = partial(runner, case, device, official, args.batch, steps)
        best = {("ours", False): first}  # the paths in turn, ``rounds`` times; the fastest run of each
        for i in range(args.rounds):
            for key, run in paths.items():
                if i or key != ("ours", False):
                    r = run()
                    best[key] = max(best.get(key, r), r, key=lambda x: x["images_per_s"])
        fpi = flops_per_image(case)  # the same work on every path
        for (path, compiled), r in best.items():
            mfu = r["images_per_s"] * fpi / rate
            records.append(
                record(case, device, path, precision=case.settings.precision, compile=compiled, mfu=mfu, **r)
            )
            print(json.dumps(records[-1]), flush=True)
        if not (args.no_memory or args.compile or case.family in families):  # the family's first model
            families.add(case.family)
            micro = args.memory_micro or (2 if cpu else args.batch)
            memory += loss_memory(memory_cases[case.name], device, micro)
            print(json.dumps(memory[-4:]), flush=True)
            adamw[case.name] = adamw_seconds(case, device)
        write()
    if args.profile:
        write(profile_ours(load_cases(names[:1], device, args.config)[0], device, args.batch))
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
