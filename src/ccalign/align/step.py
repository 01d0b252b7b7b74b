"""One family-agnostic training step: log-probabilities through the family adapter, loss from align.losses.

Policy and reference each run ONE forward over the concatenated [positive; negative] batch, as the official
trainers do; the reference runs under ``inference_mode`` (no autograd state at all), in train mode when
``keep_dropout`` (official runs) so its dropout is active, else in eval mode. Both score the codes through
``head_logp`` (the output head fused with the log-probability: no (B, T, V) logits) when the family exposes
its pre-head states (``family.hidden``); "naive" is the official path (full logits, full log_softmax).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ccalign.align.losses import (
    head_logp,
    make_negatives,
    mle_loss,
    preference_loss,
    sequence_logp,
    sequence_logp_naive,
)

LOGP_PATHS = ("fused", "logits", "naive")


class TeacherForcing(nn.Module):
    """``forward(labels, codes)``: logits (B, T, V) through ``family.logits``; with ``logp=True`` the
    per-sample log p(codes | labels) (B,) float32 instead. A module, so DDP/FSDP can wrap it: the whole
    log-probability runs inside the wrapper's forward (FSDP's gathered head weight included).

    ``path`` picks how log p is computed: "fused" (default; ``head_logp`` on ``family.hidden``, falling
    back to "logits" for a family without it), "logits" (full logits, then the row-chunked
    ``sequence_logp`` writing its gradient over them), "naive" (the official full log_softmax).
    The tokenizer (VAR needs its quantizer to build the teacher-forcing inputs) is deliberately not a
    submodule: it is frozen and must be neither wrapped, nor synchronised, nor saved with the model.
    """

    def __init__(self, family, model: nn.Module, tokenizer: nn.Module | None, path: str = "fused") -> None:
        super().__init__()
        if path not in LOGP_PATHS:
            raise ValueError(f"unknown log-probability path {path!r}; expected one of {LOGP_PATHS}")
        self.model, self.path = model, path
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "tokenizer", tokenizer)

    def forward(self, labels: Tensor, codes: Tensor, logp: bool = False) -> Tensor:
        if not logp:
            return self.family.logits(self.model, self.tokenizer, labels, codes)
        if self.path == "fused" and hasattr(self.family, "hidden"):
            hidden, weight, bias = self.family.hidden(self.model, self.tokenizer, labels, codes)
            return head_logp(hidden, weight, bias, codes)
        logits = self.family.logits(self.model, self.tokenizer, labels, codes).float()  # (B, T, V)
        if self.path == "naive":
            return sequence_logp_naive(logits, codes)
        return sequence_logp(logits, codes, inplace_backward=True)  # nothing reads these logits again


def contrastive_step(
    policy: nn.Module,
    reference: nn.Module,
    labels: Tensor,
    codes: Tensor,
    *,
    objective: str,
    beta: float,
    lam: float,
    uncond_ratio: float,
    num_classes: int,
    keep_dropout: bool = True,
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (to backpropagate) and detached diagnostics for one micro-batch of (labels (B,), codes (B, T)).

    ``policy``/``reference``: TeacherForcing modules (the policy possibly DDP/FSDP-wrapped). ``generator``
    draws the uncond mask (torch's global CPU RNG when None, as officially).
    """
    pos, neg, neg_is_positive = make_negatives(labels, num_classes, uncond_ratio, generator)
    all_labels = torch.cat([pos, neg])  # (2B,)
    all_codes = torch.cat([codes, codes])  # (2B, T): both halves score the same images
    reference.train(keep_dropout)
    with autocast or contextlib.nullcontext():
        with torch.inference_mode():
            ref_logp = reference(all_labels, all_codes, logp=True)  # (2B,)
        logp = policy(all_labels, all_codes, logp=True)  # (2B,)
    ref_logp = ref_logp.clone()  # an ordinary tensor: inference tensors may not enter autograd
    loss, metrics = preference_loss(
        objective,
        logp,
        ref_logp,
        beta=beta,
        lam=lam,
        neg_is_positive=neg_is_positive,
        num_tokens=codes.shape[1],
    )
    if neg_is_positive is not None:
        metrics["uncond_fraction"] = (pos == num_classes).float().mean()
    return loss, metrics


def mle_step(
    model: nn.Module,
    labels: Tensor,
    codes: Tensor,
    *,
    class_dropout: float | None = None,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean cross-entropy of one micro-batch.

    ``class_dropout`` replaces each label by the null class ``num_classes`` with that probability (draws from
    ``generator``); None leaves label dropout to the model's own train-mode class dropout.
    """
    if class_dropout:
        drop = (torch.rand(labels.shape[0], generator=generator) < class_dropout).to(labels.device)
        labels = torch.where(drop, num_classes, labels)
    with autocast or contextlib.nullcontext():
        logp = model(labels, codes, logp=True)  # (B,)
    return mle_loss(logp, num_tokens=codes.shape[1])
