"""AdamW with the official decay / no-decay groups, the LR and weight-decay schedules, and EMA."""

from __future__ import annotations

import math

import torch
from torch import nn

from ccalign.train.distributed import clean_name

LR_HOLD = 0.05  # VAR's 'lin0' schedule: peak LR for the first 5% of the post-warm-up steps, then linear decay


def no_decay_names(model: nn.Module, keys: tuple[str, ...]) -> set[str]:
    """Parameters exempt from weight decay, named on the unwrapped model (FSDP flattens their shapes): every
    tensor with ndim < 2 (LlamaGen's rule) and every name containing one of ``keys`` (the family's)."""
    return {n for n, p in model.named_parameters() if p.ndim < 2 or any(k in n for k in keys)}


def build_optimizer(
    wrapped: nn.Module,
    no_decay: set[str],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW with a decay and a no-decay group (``no_decay``: unwrapped names); fused on CUDA (as upstream)
    and on CPU (2–4× faster than the for-loop update there, benchmarks/results/bench_train.md)."""
    groups: dict[bool, list] = {False: [], True: []}
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            groups[clean_name(name) in no_decay].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups[False], "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": groups[True], "weight_decay": 0.0, "wd_scale": 0.0},
        ],
        lr=lr,
        betas=betas,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_factor(step: int, total: int, *, warmup: int, warmup_start: float, lr_end: float) -> float:
    """LR / peak LR at optimizer step ``step`` of ``total``.

    Linear warm-up from ``warmup_start`` to 1 over ``warmup`` steps, then constant when ``lr_end == 1``
    (LlamaGen) or VAR's 'lin0': 1 for the first LR_HOLD of the remaining steps, then linearly to ``lr_end``.
    """
    if step < warmup:
        return warmup_start + (1 - warmup_start) * step / warmup
    if lr_end == 1:
        return 1.0
    done = (step - warmup) / max(1, total - 1 - warmup)  # 0 → 1
    if done < LR_HOLD:
        return 1.0
    return lr_end + (1 - lr_end) * (1 - done) / (1 - LR_HOLD)


def weight_decay_at(step: int, total: int, start: float, end: float | None) -> float:
    """Weight decay annealed from ``start`` to ``end`` by a half cosine (VAR twd → twde); constant if None."""
    if end is None:
        return start
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * step / max(1, total - 1)))


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        g["weight_decay"] = weight_decay * g["wd_scale"]


class EMA:
    """Exponential moving average of a model's parameters (LlamaGen's update_ema), float32, on its device."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
