"""The one training loop: CCA / DPO / unlearning fine-tuning and MLE pre-training, for both families.

nanoGPT's mechanics (torchrun DDP, autocast with a GradScaler for fp16, gradient accumulation that syncs only
on the last micro-step, unscale-then-clip) plus what the official CCA loops lack: FSDP as an option, a
resumable state (optimizer, scaler, EMA, RNG, data position) written atomically, an export in the
family's official layout, and a stop at the first non-finite loss or gradient norm. The next micro-batch is
fetched (and its host→device copy issued) while the device computes the current one; ``compile`` compiles
each block of the model's block stack (regional compilation: one compiled block serves every layer).
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ccalign.align.losses import OBJECTIVES
from ccalign.align.step import TeacherForcing, contrastive_step, mle_step
from ccalign.families import Family
from ccalign.log import get_logger, progress
from ccalign.train import checkpoint as ckpt
from ccalign.train.data import StepSampler, check_dataset, micro_batch_generator
from ccalign.train.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    full_state,
    init_distributed,
    is_fsdp,
    load_full_state,
    wrap,
)
from ccalign.train.optim import EMA, build_optimizer, lr_factor, no_decay_names, set_schedule, weight_decay_at
from ccalign.train.settings import TrainSettings

log = get_logger("train")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_FP16_SCALE = 2.0**15  # VAR's AmpOptimizer caps the loss scale here (fp16 overflows past 65504)


class NonFiniteError(ValueError):
    """A step's loss or gradient norm was not finite and the settings do not allow skipping it."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps of the whole run
    resumed_from: int  # step this process started at (0 = fresh)
    metrics: dict[str, float]  # last logged metrics


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _compile_blocks(model: nn.Module) -> None:
    """torch.compile, in place, every block of the model's block stack(s) (the children of its ModuleLists).

    Parameter names are unchanged, so checkpoints and exports are those of the eager model.
    """
    for m in list(model.modules()):
        if isinstance(m, nn.ModuleList):
            for block in m:
                block.compile()


def _finite(loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> bool:
    """Whether a step's loss (summed over its micro-batches) and gradient norm are finite on every process.

    With the fp16 GradScaler on, a non-finite gradient is its business (it skips the step and lowers the
    scale); a non-finite loss never is. One host-device sync per optimizer step.
    """
    checked = torch.stack([loss.float(), torch.zeros_like(loss) if scaled else grad_norm.float()])
    return bool(torch.isfinite(all_reduce_mean(checked)).all())


def _clip(wrapped: nn.Module, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad norm (clipped to ``max_norm`` when > 0); FSDP reduces it over shards."""
    limit = max_norm if max_norm > 0 else math.inf
    if is_fsdp(wrapped):
        return wrapped.clip_grad_norm_(limit)
    return torch.nn.utils.clip_grad_norm_(params, limit)


class _Window:
    """Metrics summed over the optimizer steps since the last log, averaged over processes when read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * weight

    def read(self, device: torch.device) -> tuple[dict[str, float], float]:
        """(mean metrics over steps and processes, seconds since the window opened); then reset."""
        names = sorted(self.sums)
        values = all_reduce_mean(torch.stack([self.sums[k] for k in names]).to(device) / self.steps)
        out = dict(zip(names, values.tolist(), strict=True)), time.perf_counter() - self.t0
        self.__init__()
        return out


def train(
    family: Family,
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    *,
    seed: int,
    out: str | Path,
    state_dir: str | Path,
    reference: nn.Module | None = None,
    tokenizer: nn.Module | None = None,
    run=None,
    config: dict | None = None,
) -> TrainResult:
    """Train ``model`` with ``settings.objective`` on ``dataset`` of (codes (T,) int64, label) items.

    ``reference`` (contrastive objectives) is the frozen copy of the base model; ``tokenizer`` is passed to
    ``family.logits``. Restarting with the same arguments resumes from ``state_dir``. The final weights go to
    ``out`` through ``family.save_model`` (EMA weights, when kept, to ``<stem>_ema<suffix>``). ``run``: the
    stage's tracking run (rank 0 logs metrics to it).
    A non-finite loss or gradient norm raises NonFiniteError before the update (nothing exported, the
    last checkpoint kept) unless ``settings.skip_nonfinite``, which skips that step instead.
    """
    s = settings
    contrastive = s.objective in OBJECTIVES
    if contrastive and reference is None:
        raise ValueError(f"objective {s.objective!r} needs a frozen reference model")
    if s.fsdp and s.ema is not None:
        raise ValueError("ema is not supported together with fsdp")
    env: DistEnv = init_distributed()
    accum, micro = s.accumulation(env.world_size), s.micro(env.world_size)
    seq_len, num_classes = family.seq_len(model), family.num_classes(model)
    check_dataset(dataset, vocab_size=family.vocab_size(model), seq_len=seq_len, num_classes=num_classes)
    seed = seed + s.seed_offset
    sampler = StepSampler(  # refuses a dataset smaller than one global batch
        len(dataset),
        global_batch=s.global_batch,
        micro_batch=micro,
        rank=env.rank,
        world_size=env.world_size,
        seed=seed,
    )
    steps_per_epoch = sampler.steps_per_epoch
    total = s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
    torch.manual_seed(seed * env.world_size + env.rank)  # per-rank dropout streams, as the official scripts

    # policy (trainable, wrapped for DDP/FSDP), frozen reference, frozen tokenizer
    param_dtype = _DTYPES[s.precision] if s.precision != "fp32" else None
    for m in (model, reference):
        if m is not None and s.dropout is not None:
            _set_dropout(m, s.dropout)
    model.to(env.device).train()
    if s.compile:
        for m in (model, reference):
            if m is not None:
                _compile_blocks(m)
    if tokenizer is not None:
        tokenizer.to(env.device).eval().requires_grad_(False)
    lm = TeacherForcing(family, model, tokenizer)
    no_decay = no_decay_names(lm, family.no_decay_keys)
    ema = EMA(model) if s.ema is not None else None
    wrapped = wrap(lm, env, fsdp=s.fsdp, param_dtype=param_dtype)
    ref_lm = None
    if contrastive:
        ref_lm = TeacherForcing(family, reference.to(env.device).requires_grad_(False), tokenizer)
        if s.fsdp:  # the frozen copy is sharded too (official XXL/3B script)
            ref_lm = wrap(ref_lm, env, fsdp=True, param_dtype=param_dtype)
    optimizer = build_optimizer(
        wrapped, no_decay, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, device=env.device
    )
    params = [p for p in lm.parameters() if p.requires_grad]
    # VAR's AmpOptimizer settings (the only official fp16 runs); sharded gradients need the sharded scaler
    scaler_cls = torch.amp.GradScaler
    if is_fsdp(wrapped):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as scaler_cls
    scaler = scaler_cls(
        env.device.type, init_scale=2.0**11, growth_interval=1000, enabled=s.precision == "fp16"
    )
    autocast = torch.autocast(env.device.type, dtype=_DTYPES[s.precision], enabled=s.precision != "fp32")

    # resume
    state_dir = Path(state_dir)
    ident = ckpt.identity(s.to_dict(), seed, total)
    start = 0
    state = ckpt.load_state(state_dir, ident)
    if state is not None:
        load_full_state(wrapped, lm, optimizer, state["model"], state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
        if len(state["rng"]) == env.world_size:
            ckpt.set_rng_state(state["rng"][env.rank])
        else:
            log.warning(
                "state of %d processes, now %d: dropout RNG restarts", len(state["rng"]), env.world_size
            )
        del state

    def save(step: int) -> None:
        model_state, optim_state = full_state(wrapped, lm, optimizer)  # collective under FSDP
        rng = all_gather_objects(ckpt.rng_state())
        if env.is_main:
            ckpt.save_state(
                state_dir,
                {
                    "model": model_state,
                    "optimizer": optim_state,
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "step": step,
                    "sampler": sampler.state_dict(step),
                    "rng": rng,
                    "identity": ident,
                    "settings": s.to_dict(),
                    "config": config or {},
                },
            )
        barrier()

    def micro_step(step: int, m: int, codes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward + backward of micro-batch m of ``step``; gradients sync only on the last one."""
        gen = micro_batch_generator(seed, step, env.rank * accum + m)
        sync = m == accum - 1 or not env.distributed
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            if contrastive:
                loss, metrics = contrastive_step(
                    wrapped,
                    ref_lm,
                    labels,
                    codes,
                    objective=s.objective,
                    beta=s.beta,
                    lam=s.lam,
                    uncond_ratio=s.uncond_ratio,
                    num_classes=num_classes,
                    keep_dropout=s.keep_dropout,
                    generator=gen,
                    autocast=autocast,
                )
            else:
                loss, metrics = mle_step(
                    wrapped,
                    labels,
                    codes,
                    class_dropout=s.class_dropout,
                    num_classes=num_classes,
                    generator=gen,
                    autocast=autocast,
                )
            scaler.scale(loss / accum).backward()
        return metrics

    loader = DataLoader(  # its own generator: starting an iterator must not draw from the global RNG
        dataset,
        batch_sampler=sampler,
        num_workers=s.num_workers,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    if env.is_main:
        log.info(
            "%s: %d steps (%d per epoch) × %d images = %d processes × %d micro-batches × %d; from step %d",
            s.objective,
            total,
            steps_per_epoch,
            s.global_batch,
            env.world_size,
            accum,
            micro,
            start,
        )

    def micro_batches():
        """(codes, labels) on the device for every micro-batch from step ``start`` on, epoch by epoch."""
        step = start
        while step < total:  # each epoch: the dataset draws its views, the loader restarts
            epoch = step // steps_per_epoch
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.start_step, sampler.stop_step = step, min(total, (epoch + 1) * steps_per_epoch)
            for batch in loader:
                yield tuple(t.to(env.device, non_blocking=True) for t in batch)
            step = sampler.stop_step

    batches = micro_batches()
    pending, window, last, skipped, saved = next(batches, None), _Window(), {}, 0, start
    bar = progress(total=total, initial=start, desc=s.objective, unit="step") if env.is_main else None
    for step in range(start, total):
        lr = s.lr * lr_factor(
            step, total, warmup=s.warmup_steps, warmup_start=s.warmup_start, lr_end=s.lr_end
        )
        set_schedule(optimizer, lr, weight_decay_at(step, total, s.weight_decay, s.weight_decay_end))
        step_metrics = []
        for m in range(accum):
            step_metrics.append(micro_step(step, m, *pending))
            pending = next(batches, None)  # fetched while the device computes this micro-batch
        scaler.unscale_(optimizer)
        grad_norm = _clip(wrapped, params, s.grad_clip)
        done = step + 1
        loss = sum(mt["loss"] for mt in step_metrics)
        if _finite(loss, grad_norm, scaler.is_enabled()):
            scaler.step(optimizer)
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() > _MAX_FP16_SCALE:
                scaler.update(_MAX_FP16_SCALE)
            if ema is not None:
                ema.update(model, s.ema)
            for mt in step_metrics:
                window.add(mt, weight=1 / accum)
            window.add({"grad_norm": grad_norm})
            window.steps += 1
        elif s.skip_nonfinite:
            skipped += 1
            log.warning(
                "step %d: loss %.6g, gradient norm %.6g: update skipped (skip_nonfinite)",
                done,
                float(loss),
                float(grad_norm),
            )
            if scaler.is_enabled():  # as the scaler does for an overflow: lower the scale
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        else:
            kept = f"the checkpoint of step {saved} stays in {state_dir}" if saved else "no checkpoint yet"
            raise NonFiniteError(
                f"step {done}: loss {float(loss):.6g}, gradient norm {float(grad_norm):.6g} is not finite; "
                f"training stopped before this update and exported nothing ({kept}). Lower the learning "
                "rate or check the base weights; skip_nonfinite: true in the stage's settings skips such "
                "steps instead"
            )
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)

        if (done % s.log_every == 0 or done == total) and window.steps:
            images = window.steps * s.global_batch
            tokens = images * seq_len * (2 if contrastive else 1)  # policy tokens: [pos; neg] if contrastive
            last, seconds = window.read(env.device)
            last.update(
                lr=lr,
                images_per_s=images / seconds,
                tokens_per_s=tokens / seconds,
                peak_memory_mb=_peak_memory_mb(env.device),
                epoch=done / steps_per_epoch,
            )
            if scaler.is_enabled():
                last["loss_scale"] = scaler.get_scale()
            if skipped:
                last["skipped_steps"] = skipped
            if env.is_main:
                if run is not None:
                    run.log_metrics(last, step=done)
                log.info(
                    "step %d/%d loss %.4g lr %.3g grad norm %.3g %.1f img/s",
                    done,
                    total,
                    last["loss"],
                    lr,
                    last["grad_norm"],
                    last["images_per_s"],
                )
        if done % s.ckpt_every == 0 or done == total:
            save(done)
            saved = done
    if bar is not None:
        bar.close()

    _export(family, model, wrapped, ema, Path(out), env)
    if env.is_main and not s.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    barrier()
    return TrainResult(steps=total, resumed_from=start, metrics=last)


def _export(
    family: Family, model: nn.Module, wrapped: nn.Module, ema: EMA | None, out: Path, env: DistEnv
) -> None:
    """Final weights in the family's official layout (+ EMA weights beside them)."""
    gather = contextlib.nullcontext()
    if is_fsdp(wrapped):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        gather = FSDP.summon_full_params(wrapped, writeback=False, rank0_only=True, offload_to_cpu=True)
    with gather:
        if env.is_main:
            family.save_model(model, out)
            if ema is not None:
                ema_model = copy.deepcopy(model)
                ema.copy_to(ema_model)
                family.save_model(ema_model, out.with_name(f"{out.stem}_ema{out.suffix}"))
    barrier()
