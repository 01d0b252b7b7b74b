"""Alignment objectives as pure functions: sequence log-probabilities, CCA, DPO, unlearning and MLE.

The formulas follow the official trainers of thu-ml/CCA @ 7d5a073 (``LlamaGen_finetune.py`` and
``VAR_CCA_trainer.py``) with two deliberate differences (see tests/golden/README.md):

* with ``uncond_ratio = 0`` CCA is the paper's sigmoid form (eq. 12, the VAR trainer's "simplified CCA");
  the official LlamaGen script computes the linear unlearning loss there instead;
* the unconditional label is ``num_classes``, never a literal 1000.

Notation: ``gap_pos = log p(x|c) - log p_ref(x|c)`` for the matched condition, ``gap_neg`` the same for the
negative (rolled) condition; both are per-sample sums over all T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ccalign.align import OBJECTIVES

ALL_OBJECTIVES = (*OBJECTIVES, "mle")  # "mle": plain maximum likelihood (pre-training)

_CHUNK_ELEMENTS = 1 << 23  # logits elements handled at once (32 MiB in float32)
# fused head: GPU chunks of >= 2048 rows (16384 codes) keep the matmuls' grids full; small chunks elsewhere
_HEAD_CHUNK_ELEMENTS = {"cuda": 1 << 25}
_HEAD_CHUNK_ELEMENTS_DEFAULT = 1 << 21


# ------------------------------------------------------------------------------------------------------------
# sequence log-probabilities


def _rows_logp(logits: Tensor, tgt: Tensor) -> Tensor:
    """log softmax(logits)[tgt] of a chunk of rows: logits (n, V), tgt (n, 1) -> (n,) float32.

    The fused log_softmax of the naive path, so each token's value is bit-identical to it for equal logits.
    """
    return torch.log_softmax(logits, -1, dtype=torch.float32).gather(1, tgt)[:, 0]


def _rows_grad_(out: Tensor, logits: Tensor, lse: Tensor, tgt: Tensor, g: Tensor) -> Tensor:
    """g·(onehot − softmax) of float32 logits (n, V) into ``out`` (may be the logits); lse, g: (n,)."""
    torch.sub(logits, lse[:, None], out=out)
    return out.exp_().mul_(-g[:, None]).scatter_add_(1, tgt, g[:, None])


class _SequenceLogp(torch.autograd.Function):
    """Σ_t log softmax(logits[b, t])[targets[b, t]], row-chunked; never holds a (B, T, V) log_softmax.

    Forward: the fused log_softmax of one chunk of rows at a time (the target entries are bit-identical to
    the naive path's); it keeps only the per-token logsumexp (B·T floats). Backward writes
    d/dlogits = g·(onehot − softmax) chunk by chunk, into a fresh tensor or, with ``inplace``, over the
    logits themselves, with in-place ops only (no temporary for float32 logits).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int, inplace: bool) -> Tensor:
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        tgt = targets.reshape(B * T, 1)
        token_logp = torch.empty(B * T, dtype=torch.float32, device=logits.device)
        for s in range(0, B * T, chunk_rows):
            r = slice(s, s + chunk_rows)  # one (n, V) temporary at a time
            token_logp[r] = _rows_logp(flat[r], tgt[r])
        lse = flat.gather(1, tgt)[:, 0].float() - token_logp  # logsumexp per token, (B*T,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows, ctx.inplace = chunk_rows, inplace
        return token_logp.view(B, T).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        tgt = targets.reshape(B * T, 1)
        grad = logits if ctx.inplace and logits.is_contiguous() else torch.empty_like(logits)
        flat_grad = grad.view(B * T, V)
        g = grad_out.float().repeat_interleave(T)  # (B*T,)
        for s in range(0, B * T, ctx.chunk_rows):
            r = slice(s, s + ctx.chunk_rows)
            dst = flat_grad[r]
            p = dst if dst.dtype == torch.float32 else torch.empty(dst.shape, device=dst.device)
            _rows_grad_(p, flat[r], lse[r], tgt[r], g[r])  # p may alias the logits (in place)
            if p is not dst:
                dst.copy_(p)
            del p
        return grad, None, None, None


def sequence_logp(
    logits: Tensor, targets: Tensor, *, inplace_backward: bool = False, chunk_rows: int | None = None
) -> Tensor:
    """Per-sample log p(x) = Σ_t log softmax(logits[:, t])[targets[:, t]] without a full log_softmax.

    logits (B, T, V) with logits[:, t] scoring targets[:, t]; returns float32 (B,). Numerically the naive
    ``gather(log_softmax(logits))`` sum (tests/test_align_losses.py). ``inplace_backward`` overwrites the
    logits with their gradient during backward (saves one (B, T, V) buffer): only for logits that nothing
    reads after ``backward()``.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits (B, T, V) and targets (B, T) expected, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    return _SequenceLogp.apply(logits, targets.long(), rows, inplace_backward)


def _head_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Logits of a chunk of rows as the head computes them: x (n, C) @ weightᵀ (+ bias), as float32."""
    return F.linear(x, weight, bias).float()


def _head_forward(x: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, rows: int):
    """Per-token log-probs and logsumexps (N,) of x (N, C) through the head, ``rows`` rows at a time."""
    token_logp = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lse = torch.empty_like(token_logp)
    for s in range(0, x.shape[0], rows):
        r = slice(s, s + rows)
        logits = _head_rows(x[r], weight, bias)  # (n, V): the only logits alive
        token_logp[r] = _rows_logp(logits, tgt[r])
        lse[r] = logits.gather(1, tgt[r])[:, 0] - token_logp[r]
    return token_logp, lse


class _HeadLogp(torch.autograd.Function):
    """Output projection and per-token log p(target) fused, chunk by chunk over the N = B·T rows.

    Neither pass ever holds the (N, V) logits: forward keeps the per-token logsumexp (N floats); backward
    recomputes one chunk's logits, turns them into g·(onehot − softmax) in place and multiplies that into
    the gradient of the hidden states (per chunk) and of the head (summed over chunks in float32). Every
    matmul runs in ``dtype`` (the autocast dtype, as the model's own head under autocast).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tgt, rows, dtype):
        # hidden (N, C), weight (V, C), bias (V,) or None, in their own dtypes; tgt (N, 1)
        x, w, b = _cast(hidden, weight, bias, dtype)
        token_logp, lse = _head_forward(x, w, b, tgt, rows)
        ctx.save_for_backward(x, weight, bias, tgt, lse)
        ctx.rows, ctx.hidden_dtype = rows, hidden.dtype
        return token_logp

    @staticmethod
    def backward(ctx, grad_tokens: Tensor):
        x, weight, bias, tgt, lse = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        with torch.autocast(x.device.type, enabled=False):
            _, w, b = _cast(None, weight, bias, x.dtype)
            grad_x = torch.empty(x.shape, dtype=ctx.hidden_dtype, device=x.device) if want_x else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if want_b else None
            g = grad_tokens.float()
            for s in range(0, x.shape[0], ctx.rows):
                r = slice(s, s + ctx.rows)
                logits = _head_rows(x[r], w, b)  # recomputed, (n, V) float32
                d = _rows_grad_(logits, logits, lse[r], tgt[r], g[r])
                if want_b:
                    grad_b += d.sum(0)
                d = d.to(x.dtype)
                if want_x:
                    grad_x[r] = d @ w
                if want_w and x.dtype == grad_w.dtype:
                    grad_w.addmm_(d.T, x[r])  # no (V, C) temporary
                elif want_w:
                    grad_w += d.T @ x[r]  # a (V, C) temporary in the compute dtype
        grad_w = grad_w.to(weight.dtype) if want_w else None
        return grad_x, grad_w, grad_b.to(bias.dtype) if want_b else None, None, None, None


def _cast(hidden: Tensor | None, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
    return tuple(None if t is None else t.to(dtype) for t in (hidden, weight, bias))


def head_logp(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """Per-sample log p(x) through the output head, never materialising the (B, T, V) logits.

    hidden (B, T, C): the final normalised hidden states, with ``F.linear(hidden, weight, bias)[:, t]``
    the logits scoring targets[:, t]; returns float32 (B,). Matmuls run in the autocast dtype when
    autocast is on (as the model's own head would), else in the weight's dtype. Equals
    ``sequence_logp_naive(F.linear(hidden, weight, bias).float(), targets)`` with gradients for hidden,
    weight and bias (tests/test_align_losses.py states the tolerance). ``chunk_rows`` rows at a time:
    by default 2^25 logits (128 MiB in float32) on GPU, 2^21 elsewhere.
    """
    B, T, C = hidden.shape
    if targets.shape != (B, T) or weight.dim() != 2 or weight.shape[1] != C:
        raise ValueError(
            f"hidden (B, T, C), targets (B, T) and weight (V, C) expected, got {tuple(hidden.shape)}, "
            f"{tuple(targets.shape)} and {tuple(weight.shape)}"
        )
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    budget = _HEAD_CHUNK_ELEMENTS.get(device, _HEAD_CHUNK_ELEMENTS_DEFAULT)
    rows = chunk_rows or max(1, budget // weight.shape[0])
    flat, tgt = hidden.reshape(B * T, C), targets.reshape(B * T, 1).long()
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            token_logp = _HeadLogp.apply(flat, weight, bias, tgt, rows, dtype)
        else:  # no graph to keep (the frozen reference): the forward alone
            token_logp = _head_forward(*_cast(flat, weight, bias, dtype), tgt, rows)[0]
    return token_logp.view(B, T).sum(dim=1)


def sequence_logp_naive(logits: Tensor, targets: Tensor) -> Tensor:
    """The official path: a full (B, T, V) log_softmax, gathered and summed (reference and benchmark)."""
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(2)).squeeze(2).sum(-1)


# ------------------------------------------------------------------------------------------------------------
# negative conditions


def make_negatives(
    labels: Tensor, num_classes: int, uncond_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Positive and negative labels as the official trainers build them.

    Negatives roll the batch by one (neg[i] = labels[(i+1) mod B]). With uncond_ratio > 0, B uniform draws
    (``generator`` or torch's global CPU RNG, as officially) mask rows: both labels become the null class
    ``num_classes``. Returns (pos, neg, neg_is_positive) where neg_is_positive = mask | (neg == pos) marks
    negatives that count as positives with weight 1; it is None on the uncond_ratio = 0 path.
    """
    pos = labels.clone()
    neg = torch.roll(labels, shifts=-1, dims=0)
    if uncond_ratio <= 0:
        return pos, neg, None
    masked = (torch.rand(labels.shape[0], generator=generator) < uncond_ratio).to(labels.device)
    pos[masked] = num_classes
    neg[masked] = num_classes
    return pos, neg, masked | (neg == pos)


# ------------------------------------------------------------------------------------------------------------
# objectives


def _signed_weights(neg_is_positive: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(w, s): weight 1 and sign +1 for negatives that count as positives, weight λ and sign −1 otherwise."""
    w = torch.where(neg_is_positive, 1.0, lam).float()
    s = neg_is_positive.float() * 2 - 1
    return w, s


def cca_loss(
    gap_pos: Tensor, gap_neg: Tensor, *, beta: float, lam: float, neg_is_positive: Tensor | None
) -> Tensor:
    """Condition Contrastive Alignment (paper eq. 12).

    uncond path: [−mean logσ(β·gap⁺) − mean(w·logσ(β·s·gap⁻))] / max(λ, 1);
    otherwise:   −mean logσ(β·gap⁺) − λ·mean logσ(−β·gap⁻).
    """
    if neg_is_positive is None:
        return -F.logsigmoid(beta * gap_pos).mean() - lam * F.logsigmoid(-beta * gap_neg).mean()
    w, s = _signed_weights(neg_is_positive, lam)
    loss = -F.logsigmoid(beta * gap_pos).mean() - (w * F.logsigmoid(beta * s * gap_neg)).mean()
    return loss / max(lam, 1.0)


def dpo_loss(gap_pos: Tensor, gap_neg: Tensor, *, beta: float) -> Tensor:
    """DPO with the rolled condition as the rejected sample: −mean logσ(β·(gap⁺ − gap⁻))."""
    return -F.logsigmoid(beta * (gap_pos - gap_neg)).mean()


def unlearning_loss(
    gap_pos: Tensor, gap_neg: Tensor, *, lam: float, neg_is_positive: Tensor | None
) -> Tensor:
    """Linear likelihood/unlikelihood: uncond path [−mean gap⁺ − mean(w·s·gap⁻)] / max(λ, 1),
    otherwise −mean gap⁺ + λ·mean gap⁻ (the official LlamaGen script's uncond_ratio = 0 "CCA")."""
    if neg_is_positive is None:
        return -gap_pos.mean() + lam * gap_neg.mean()
    w, s = _signed_weights(neg_is_positive, lam)
    return (-gap_pos.mean() - (w * s * gap_neg).mean()) / max(lam, 1.0)


def check_objective(objective: str, lam: float = 1.0, beta: float = 1.0) -> None:
    """Raise a clear ValueError for an unknown objective or an invalid λ / β."""
    if objective not in ALL_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(ALL_OBJECTIVES)}")
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def preference_loss(
    objective: str,
    logp: Tensor,
    ref_logp: Tensor,
    *,
    beta: float,
    lam: float,
    neg_is_positive: Tensor | None,
    num_tokens: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and diagnostics from the per-sample log-probs of one [positive; negative] batch.

    logp, ref_logp: (2B,) policy / reference log p(x|c), rows :B matched labels, B: rolled labels.
    Diagnostics (detached): accuracy = mean(gap⁺ > gap⁻), margin = mean(gap⁺ − gap⁻), reward_pos / reward_neg
    = mean gap⁺ / gap⁻, and the token-mean NLL of the four blocks (the official "sft losses").
    """
    check_objective(objective, lam, beta)
    B = logp.shape[0] // 2
    gap = logp - ref_logp
    gap_pos, gap_neg = gap[:B], gap[B:]
    if objective == "cca":
        loss = cca_loss(gap_pos, gap_neg, beta=beta, lam=lam, neg_is_positive=neg_is_positive)
    elif objective == "dpo":
        loss = dpo_loss(gap_pos, gap_neg, beta=beta)
    elif objective == "unlearning":
        loss = unlearning_loss(gap_pos, gap_neg, lam=lam, neg_is_positive=neg_is_positive)
    else:
        raise ValueError(f"objective {objective!r} is not a preference objective; use mle_loss")
    with torch.no_grad():
        gp, gn = gap_pos.detach(), gap_neg.detach()
        nll, ref_nll = -logp.detach() / num_tokens, -ref_logp.detach() / num_tokens
        metrics = {
            "loss": loss.detach(),
            "accuracy": (gp > gn).float().mean(),
            "margin": (gp - gn).mean(),
            "reward_pos": gp.mean(),
            "reward_neg": gn.mean(),
            "nll_pos": nll[:B].mean(),
            "nll_neg": nll[B:].mean(),
            "ref_nll_pos": ref_nll[:B].mean(),
            "ref_nll_neg": ref_nll[B:].mean(),
        }
    return loss, metrics


def mle_loss(logp: Tensor, *, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean negative log-likelihood (B,) -> scalar: the pre-training objective."""
    loss = -logp.mean() / num_tokens
    return loss, {"loss": loss.detach(), "nll": loss.detach()}
