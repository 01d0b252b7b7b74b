"""One end-to-end alignment step through the real VAR family against the official VAR CCA trainer.

For every VAR fixture set with a cca_e2e.pt (see conftest.py): images → our tokenizer → codes; policy =
the set's weights + its delta, reference = the set's weights; ``contrastive_step`` runs every recorded
variant (objective, uncond_ratio, λ) and must give the official log-probs, losses, diagnostics and
parameter gradients.
Tolerances (fixture README §11): log-probs/gaps atol 1e-3, losses rtol 1e-4 + atol 1e-4, gradients atol
1e-5 × their largest magnitude with rtol 1e-3.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from testkit import close

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
    images = load_torch(var_set / "vqvae_io.pt")["images"]
    codes = FAMILY.encode(tokenizer, images)  # (B, L)
    assert torch.equal(codes, load_torch(var_set / "vqvae_io.pt")["gt_BL"])
    labels, num_classes = e2e["label_B"], FAMILY.num_classes(reference)
    B, T = codes.shape
    ref_lm = TeacherForcing(FAMILY, reference, tokenizer)
    policy = FAMILY.build_model(model_args).train()
    policy_lm = TeacherForcing(FAMILY, policy, tokenizer)
    logps = {}  # (labels seen, reference mode) → per-sample log-probs of policy and reference

    for name, v in e2e["variants"].items():
        args = v["args"]
        assert args["label_smooth"] == 0
        policy.load_state_dict(policy_state)
        policy.zero_grad(set_to_none=True)
        kw = dict(
            objective=args["loss_type"].lower(),
            beta=args["beta"],
            lam=args["lambda_"],
            uncond_ratio=args["uncond_ratio"],
            num_classes=num_classes,
            keep_dropout=v["ref_mode_training"],
        )

        # intermediates: labels the models see (official literal 1000 → our num_classes) and log-probs
        gen = torch.Generator().manual_seed(e2e["tbm_torch_seed"])
        pos, neg, _ = make_negatives(labels, num_classes, args["uncond_ratio"], gen)
        seen = v["all_label_B_seen_by_policy"].masked_fill(
            v["all_label_B_seen_by_policy"] == e2e["uncond_label_literal"], e2e["uncond_label_model"]
        )
        assert torch.equal(torch.cat([pos, neg]), seen), name
        key = (tuple(seen.tolist()), v["ref_mode_training"])
        if key not in logps:
            with torch.no_grad():
                all_codes = torch.cat([codes, codes])
                reference.train(v["ref_mode_training"])
                logps[key] = (
                    sequence_logp(policy_lm(seen, all_codes), all_codes),
                    sequence_logp(ref_lm(seen, all_codes), all_codes),
                )
        logp, ref_logp = logps[key]
        for key, got in [
            ("img_logps", logp[:B]),
            ("negative_img_logps", logp[B:]),
            ("img_ref_logps", ref_logp[:B]),
            ("negative_img_ref_logps", ref_logp[B:]),
            ("img_logp_gap", (logp - ref_logp)[:B]),
            ("negative_img_logp_gap", (logp - ref_logp)[B:]),
        ]:
            close(got, v[key], atol=1e-3, rtol=1e-5, what=f"{name} {key}")

        # the step itself: loss, diagnostics, gradients
        gen = torch.Generator().manual_seed(e2e["tbm_torch_seed"])
        loss, m = contrastive_step(policy_lm, ref_lm, labels, codes, generator=gen, **kw)
        close(loss.detach(), v["loss"], atol=1e-4, rtol=1e-4, what=f"{name} loss")
        close(m["accuracy"], v["acc"], atol=0, rtol=0, what=f"{name} acc")
        close(m["margin"], v["reward_margin"], atol=1e-3, rtol=1e-5, what=f"{name} reward_margin")
        for key, got in [
            ("sftloss", m["nll_pos"]),
            ("shuffle_sftloss", m["nll_neg"]),
            ("ref_sftloss", m["ref_nll_pos"]),
            ("ref_shuffle_sftloss", m["ref_nll_neg"]),
        ]:
            close(got, v[key], atol=1e-4, rtol=1e-4, what=f"{name} {key}")
        loss.backward()
        params = dict(policy.named_parameters())
        for key in e2e["grad_keys"]:
            want = v["grads"][key]
            close(
                params[key].grad,
                want,
                atol=1e-5 * float(want.abs().max()),
                rtol=1e-3,
                what=f"{name} grad {key}",
            )
        assert all(p.grad is None for p in reference.parameters())
