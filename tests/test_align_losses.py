"""Alignment objectives: the memory-lean log-likelihoods against the naive path, and the loss mechanics.

The official trainers' values for both families are checked in tests/golden/test_losses.py.
"""

from __future__ import annotations

import pytest
import torch
from testkit import close

from ccalign.align.losses import (
    cca_loss,
    check_objective,
    head_logp,
    make_negatives,
    mle_loss,
    preference_loss,
    sequence_logp,
    sequence_logp_naive,
)

# ------------------------------------------------------------------------------------------------ naive path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_sequence_logp_equals_naive(dtype, inplace):
    g = torch.Generator().manual_seed(0)
    B, T, V = 5, 7, 33
    base = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, generator=g)

    naive_in = base.clone().requires_grad_(True)
    naive = sequence_logp_naive(naive_in.float(), targets)
    (naive * weights).sum().backward()

    ours_in = base.clone().requires_grad_(True)
    logits = ours_in * 1  # a non-leaf, as a model's output: in-place backward may reuse its buffer
    ours = sequence_logp(logits, targets, inplace_backward=inplace, chunk_rows=4)  # several chunks
    (ours * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (B,)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, naive, atol=tol * T, rtol=tol)
    torch.testing.assert_close(ours_in.grad.float(), naive_in.grad.float(), atol=tol, rtol=tol)


def test_sequence_logp_inplace_reuses_logits_buffer():
    logits = torch.randn(2, 3, 4, requires_grad=True) * 1
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    sequence_logp(logits, torch.zeros(2, 3, dtype=torch.long), inplace_backward=True).sum().backward()
    assert seen == [logits.data_ptr()]


def test_sequence_logp_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        sequence_logp(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ fused head


def _head_case(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, C, V = 3, 7, 16, 50
    hidden, weight = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    targets, weights = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    return hidden, weight, b, targets, weights


def _run_head(fused: bool, hidden, weight, bias, targets, weights, *, dtype=None, chunk_rows=None):
    """Per-sample log-probs and the gradients (hidden, weight, bias) of Σ weights·logp, fused or naive."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        if fused:
            logp = head_logp(h, w, b, targets, chunk_rows=chunk_rows)
        else:  # the model's own head, then the official log_softmax
            logp = sequence_logp_naive(torch.nn.functional.linear(h, w, b).float(), targets)
    (logp * weights).sum().backward()
    return logp.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("bias", [False, True], ids=["llamagen-head", "var-head"])
@pytest.mark.parametrize("chunk_rows", [4, 5, 1000], ids=["chunks-4", "chunks-5-ragged", "one-chunk"])
def test_head_logp_equals_plain_head_in_float32(bias, chunk_rows):
    """Log-probs bit-identical (each row's logits come from the same matmul and go through the same fused
    log_softmax; the per-sample sum is the same reduction). Gradients within float32 rounding, not bit
    for bit: softmax is exp(logit − logsumexp) rather than exp(log_softmax), and the head's gradient is
    summed chunk by chunk (another summation order)."""
    case = _head_case(bias)
    logp, grads = _run_head(True, *case, chunk_rows=chunk_rows)
    logp_naive, grads_naive = _run_head(False, *case)
    assert logp.dtype == torch.float32 and logp.shape == (3,)
    assert torch.equal(logp, logp_naive)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, grads_naive, strict=True):
        if want is None:
            assert got is None and not bias
            continue
        close(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5, what=name)


def test_head_logp_under_bf16_autocast_matches_the_autocast_head():
    """Matmuls in the autocast dtype, as the model's head under autocast: equal log-probs (same bf16
    logits), gradients within bf16 rounding (the plain path also rounds the head gradient to bf16)."""
    case = _head_case(bias=True, seed=1)
    logp, grads = _run_head(True, *case, dtype=torch.bfloat16, chunk_rows=4)
    logp_naive, grads_naive = _run_head(False, *case, dtype=torch.bfloat16)
    close(logp, logp_naive, atol=1e-4, rtol=1e-6, what="logp")
    logp32, _ = _run_head(True, *case, chunk_rows=4)
    assert (logp - logp32).abs().max() > 1e-3  # bf16 matmuls really ran
    for name, got, want in zip(("hidden", "weight", "bias"), grads, grads_naive, strict=True):
        assert got.dtype == torch.float32
        close(got, want, atol=2e-2 * float(want.abs().max()), rtol=2e-2, what=name)


def test_head_logp_frozen_inputs_and_bad_shapes():
    hidden, weight, bias, targets, weights = _head_case(bias=True)
    logp_naive, grads_naive = _run_head(False, hidden, weight, bias, targets, weights)
    with torch.inference_mode():  # the frozen reference: no graph at all
        frozen = head_logp(hidden, weight.clone().requires_grad_(True), bias, targets, chunk_rows=2)
    assert frozen.grad_fn is None and torch.equal(frozen, logp_naive)
    h = hidden.clone().requires_grad_(True)  # a frozen head: only the hidden states get a gradient
    (head_logp(h, weight, bias, targets, chunk_rows=2) * weights).sum().backward()
    close(h.grad, grads_naive[0], atol=1e-6 * float(grads_naive[0].abs().max()), rtol=1e-5, what="hidden")
    assert weight.grad is None and bias.grad is None
    with pytest.raises(ValueError, match="weight"):
        head_logp(hidden, weight[:, :3], bias, targets)


# ------------------------------------------------------------------------------------------------ semantics


def test_make_negatives_rolls_and_masks():
    labels = torch.tensor([3, 3, 7, 9])
    pos, neg, nip = make_negatives(labels, 10, 0.0)
    assert torch.equal(neg, torch.tensor([3, 7, 9, 3])) and nip is None and torch.equal(pos, labels)
    pos, neg, nip = make_negatives(labels, 10, 1.0)  # every row masked → every pair counts as positive
    assert (pos == 10).all() and (neg == 10).all() and nip.all()
    assert torch.equal(labels, torch.tensor([3, 3, 7, 9]))  # input untouched


def test_cca_divides_by_max_lambda_one():
    gp, gn = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    nip = torch.tensor([False, True])
    for lam in (0.5, 1.0, 7.0):
        w = torch.tensor([lam, 1.0])
        s = torch.tensor([-1.0, 1.0])
        expected = (
            -torch.nn.functional.logsigmoid(0.1 * gp).mean()
            - (w * torch.nn.functional.logsigmoid(0.1 * s * gn)).mean()
        ) / max(lam, 1.0)
        close(cca_loss(gp, gn, beta=0.1, lam=lam, neg_is_positive=nip), expected, what=f"lam {lam}")


def test_mle_loss_is_token_mean_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(3, 5, 11, generator=g), torch.randint(0, 11, (3, 5), generator=g)
    loss, _ = mle_loss(sequence_logp(logits, targets), num_tokens=5)
    close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)), rtol=1e-6)


@pytest.mark.parametrize(
    ("objective", "lam", "match"),
    [
        ("ppo", 1.0, "unknown objective"),
        ("cca", -1.0, "lambda must be >= 0"),
        ("cca", float("nan"), "lambda must be >= 0"),
    ],
)
def test_bad_objective_or_lambda(objective, lam, match):
    with pytest.raises(ValueError, match=match):
        check_objective(objective, lam)
    with pytest.raises(ValueError, match=match):
        preference_loss(
            objective, torch.zeros(4), torch.zeros(4), beta=0.1, lam=lam, neg_is_positive=None, num_tokens=1
        )
