"""One end-to-end alignment step through the real VAR family against the official VAR CCA trainer.

For every VAR fixture set with a cca_e2e.pt (see conftest.py): the official codes of its images (our
tokenizer reproduces them in test_var.py); policy = the set's weights + its delta, reference = the set's
weights; ``contrastive_step`` runs every recorded variant (objective, uncond_ratio, λ) and must give the
official log-probs, losses, diagnostics and parameter gradients.
Tolerances (tests/testkit.py): the logits carry FP32·max(1, max|logits|), so a log-prob sum over L tokens
2·FP32·L·max(1, max|logits|) and a gap twice that; losses FP32·max(1, |loss|) plus the log-prob noise
propagated through the objective's gradient; parameter gradients FP32·max(1, max|grad|). ``acc`` counts rows
with gap⁺ > gap⁻: rows with the same label on both sides (uncond-masked, or a label collision after the
roll) are ties by construction decided by rounding, so only the other rows are compared exactly (where the
reference's |gap⁺ − gap⁻| exceeds the noise); the loss, margin and rewards still cover every row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from testkit import FP32, NearTies, check_logps, check_preference, close, logp_bound

from ccalign.align.losses import make_negatives, sequence_logp
from ccalign.align.step import TeacherForcing, contrastive_step
from ccalign.families import get_family
from ccalign.io import load_torch

FAMILY = get_family("var")


@functools.cache
def models(set_dir: Path):
    """(config, tokenizer, reference, policy state dict) of one set, every argument from its config.json."""
    config = json.loads((set_dir / "config.json").read_text())
    derived, vq = config["derived"], config["derived"]["vqvae"]
    kwargs = config["cca"]["e2e_build_vae_var_with_ref_kwargs"]
    tok_args = {k: v for k, v in vq.items() if k != "test_mode"}  # test_mode: official eval/freeze switch
    # VAR_finetune.build_vae_var_with_ref: drop_path = dpr_ratio · 0.1 · depth / 24, no class dropout
    model_args = dict(
        derived["var"],
        V=vq["vocab_size"],
        Cvae=vq["z_channels"],
        cond_drop_rate=0.0,
        drop_path_rate=kwargs["dpr_ratio"] * 0.1 * kwargs["depth"] / 24,
    )
    tokenizer = FAMILY.load_tokenizer(set_dir / "vqvae_state_dict.pt", tok_args)
    reference = FAMILY.load_model(set_dir / "var_state_dict.pt", model_args)
    policy_state = {**reference.state_dict(), **load_torch(set_dir / "cca_e2e.pt")["policy_state_dict_delta"]}
    return config, tokenizer, model_args, reference, policy_state


@pytest.mark.golden_files("cca_e2e.pt")
def test_var_cca_e2e_step(var_set: Path):
    config, tokenizer, model_args, reference, policy_state = models(var_set)
    e2e = load_torch(var_set / "cca_e2e.pt")
    codes = load_torch(var_set / "vqvae_io.pt")["gt_BL"]  # (B, L): the official trainer's gt_BL
    labels, num_classes = e2e["label_B"], FAMILY.num_classes(reference)
    B, T = codes.shape
    ref_lm = TeacherForcing(FAMILY, reference, tokenizer)
    policy = FAMILY.build_model(model_args).train()
    policy_lm = TeacherForcing(FAMILY, policy, tokenizer)
    logps = {}  # (labels seen, reference mode) → per-sample log-probs of policy and reference, their noise
    ties = NearTies(var_set)

    for name, v in e2e["variants"].items():
        args = v["args"]
        assert args["label_smooth"] == 0
        policy.load_state_dict(policy_state)
        policy.zero_grad(set_to_none=True)
        kw = dict(objective=args["loss_type"].lower(), beta=args["beta"], lam=args["lambda_"])
        what = f"cca_e2e.pt {name}"

        # intermediates: labels the models see (official literal 1000 → our num_classes) and log-probs
        gen = torch.Generator().manual_seed(e2e["tbm_torch_seed"])
        pos, neg, nip = make_negatives(labels, num_classes, args["uncond_ratio"], gen)
        seen = v["all_label_B_seen_by_policy"].masked_fill(
            v["all_label_B_seen_by_policy"] == e2e["uncond_label_literal"], e2e["uncond_label_model"]
        )
        assert torch.equal(torch.cat([pos, neg]), seen), name
        key = (tuple(seen.tolist()), v["ref_mode_training"])
        if key not in logps:
            with torch.no_grad():
                all_codes = torch.cat([codes, codes])
                reference.train(v["ref_mode_training"])
                logits, ref_logits = policy_lm(seen, all_codes), ref_lm(seen, all_codes)
                lp_noise = logp_bound(float(torch.cat([logits, ref_logits]).abs().max()), T, FP32)
                logps[key] = sequence_logp(logits, all_codes), sequence_logp(ref_logits, all_codes), lp_noise
        logp, ref_logp, lp_noise = logps[key]
        check_logps(logp, ref_logp, v, lp_noise, what)
        gap = logp - ref_logp
        tied = pos == neg  # the same label on both sides: gap⁺ = gap⁻ in exact arithmetic
        compared = ties.exact_decisions(
            gap[:B],
            gap[B:],
            v["img_logp_gap"],
            v["negative_img_logp_gap"],
            2 * lp_noise,
            f"{what} acc rows",
            tied,
        )

        # the step itself: loss, diagnostics, gradients
        gen = torch.Generator().manual_seed(e2e["tbm_torch_seed"])
        loss, m = contrastive_step(
            policy_lm,
            ref_lm,
            labels,
            codes,
            generator=gen,
            uncond_ratio=args["uncond_ratio"],
            num_classes=num_classes,
            keep_dropout=v["ref_mode_training"],
            **kw,
        )
        check_preference(loss, m, v, lp_noise, what, neg_is_positive=nip, num_tokens=T, **kw)
        # acc: the compared rows as officially, each uncompared row (tied or near-tie) either way
        ref_true = int(((v["img_logp_gap"] > v["negative_img_logp_gap"]) & compared).sum())
        n_true = round(float(m["accuracy"]) * B)
        assert ref_true <= n_true <= ref_true + int((~compared).sum()), (
            f"{what} acc {m['accuracy']} vs {v['acc']}"
        )
        loss.backward()
        params = dict(policy.named_parameters())
        for k in e2e["grad_keys"]:
            close(params[k].grad, v["grads"][k], what=f"{what} grad {k}")
        assert all(p.grad is None for p in reference.parameters())
    ties.report()
