"""The fast training step (fused head log-probability, inference-mode reference) against the plain one.

"naive" is the official path: full (B, T, V) logits, full log_softmax, reference under no_grad semantics.
Both families, tiny random models with dropout on (both paths draw the same random numbers).
"""

from __future__ import annotations

import pytest
import torch
from testkit import close

from ccalign.align.step import TeacherForcing, contrastive_step, mle_step
from ccalign.families import get_family

CASES = {
    "llamagen": (
        dict(
            dim=32,
            n_layer=2,
            n_head=2,
            multiple_of=32,
            vocab_size=64,
            block_size=9,
            num_classes=5,
            class_dropout_prob=0.1,
            token_dropout_p=0.1,
            resid_dropout_p=0.1,
            ffn_dropout_p=0.1,
        ),
        None,
    ),
    "var": (  # drop path and class dropout on
        dict(depth=2, num_classes=5, V=64, Cvae=8, patch_nums=(1, 2, 3), drop_path_rate=0.1),
        dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 3)),
    ),
}
STEP = dict(objective="cca", beta=0.5, lam=3.0, uncond_ratio=0.5, num_classes=5, keep_dropout=True)


def build(name: str):
    """(family, policy, reference, tokenizer, labels, codes): reference = a copy of the policy's weights."""
    family, (model_args, tokenizer_args) = get_family(name), CASES[name]
    torch.manual_seed(0)
    policy = family.build_model(model_args).train()
    with torch.no_grad():  # away from the near-identity / zero-head initialisation
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = family.build_model(model_args).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    tokenizer = family.build_tokenizer(tokenizer_args).eval() if tokenizer_args else None
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (6,), generator=g)
    codes = torch.randint(0, family.vocab_size(policy), (6, family.seq_len(policy)), generator=g)
    return family, policy, reference, tokenizer, labels, codes


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("objective", ["cca", "dpo", "mle"])
def test_fused_step_equals_plain_step_in_float32(name, objective):
    """Same loss bit for bit (the same hidden states, the same head matmul, the same per-row log_softmax);
    parameter gradients within float32 rounding relative to each gradient's largest entry, as in the golden
    end-to-end test (softmax recomputed from the logsumexp, the head's gradient summed chunk by chunk)."""
    family, policy, reference, tokenizer, labels, codes = build(name)
    results = {}
    for path in ("fused", "naive"):
        policy.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout draws on both paths
        gen = torch.Generator().manual_seed(4)
        pol = TeacherForcing(family, policy, tokenizer, path)
        if objective == "mle":
            loss, metrics = mle_step(pol, labels, codes, class_dropout=0.2, num_classes=5, generator=gen)
        else:
            ref = TeacherForcing(family, reference, tokenizer, path)
            loss, metrics = contrastive_step(
                pol, ref, labels, codes, generator=gen, **dict(STEP, objective=objective)
            )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results[path] = loss.detach(), metrics, grads
    (loss, metrics, grads), (loss_naive, metrics_naive, grads_naive) = results["fused"], results["naive"]
    assert torch.equal(loss, loss_naive)
    for k in metrics:
        assert torch.equal(metrics[k], metrics_naive[k]), k
    assert grads.keys() == grads_naive.keys() and len(grads) == len(list(policy.parameters()))
    for n, want in grads_naive.items():
        close(grads[n], want, atol=1e-5 * float(want.abs().max()), rtol=1e-4, what=n)
    assert all(p.grad is None for p in reference.parameters())


def train_losses(name: str, path: str, precision: str, steps: int = 50) -> torch.Tensor:
    """Per-step CCA losses of ``steps`` AdamW steps on one fixed batch, seeded identically."""
    family, policy, reference, tokenizer, labels, codes = build(name)
    pol, ref = (
        TeacherForcing(family, policy, tokenizer, path),
        TeacherForcing(family, reference, tokenizer, path),
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(5)
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        loss, _ = contrastive_step(pol, ref, labels, codes, generator=gen, autocast=autocast, **STEP)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_and_plain_paths_train_alike_in_bf16(name):
    """50 bf16 steps: the fast path's losses stay within the bf16 noise, i.e. no farther from the plain
    bf16 run than the plain bf16 run is from the same run in float32."""
    fast, plain = train_losses(name, "fused", "bf16"), train_losses(name, "naive", "bf16")
    plain32 = train_losses(name, "naive", "fp32")
    noise = (plain - plain32).abs().max()
    assert noise > 0  # bf16 really changes the numbers
    assert plain32[-10:].mean() < plain32[:10].mean()  # and the runs really train
    deviation = (fast - plain).abs().max()
    print(f"{name}: fast vs plain (bf16) {deviation:.3g}, plain bf16 vs fp32 {noise:.3g}")
    assert deviation <= noise
