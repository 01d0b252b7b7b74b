"""VAR and its multi-scale VQVAE against fixtures produced by the official code.

Runs once per fixture set under $CCALIGN_GOLDEN_DIR/var (see conftest.py); every size, seed and argument
comes from the set. Tolerances (tests/testkit.py): features, f_hat, teacher-forcing input and logits
|Δ| ≤ FP32·max(1, max|ref|) (the guided logits amplified by the CFG combination); images
IMAGES·max(1, max|ref|); codes and greedy tokens exact wherever the fixture's own margins exceed what that
noise can move, near-ties reported as skips.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from testkit import FP32, OPS, NearTies, bound, close, code_margins, top2_margin

from ccalign.families import get_family
from ccalign.io import load_torch
from ccalign.models.var import VAR, VARConfig
from ccalign.tokenizers.var_vqvae import VQVAE, VQVAEConfig

FAMILY = get_family("var")
# decoder outputs: the decoder's internal activations exceed its output range (README §11: images atol 1e-4;
# observed ≤ 1.1e-5 on every set)
IMAGES = 1e-4


def tokenizer_args(config: dict) -> dict:
    """The VQVAE constructor arguments recorded in config.json, under our (= official) names."""
    vq = dict(config["derived"]["vqvae"])
    vq.pop("test_mode")  # official eval/freeze switch; loading puts ours in eval mode with frozen weights
    assert set(vq) <= {f.name for f in dataclasses.fields(VQVAEConfig)}, vq
    return vq


def model_args(config: dict) -> dict:
    derived, vq = config["derived"], config["derived"]["vqvae"]
    args = dict(derived["var"], V=vq["vocab_size"], Cvae=vq["z_channels"])
    args["drop_path_rate"] = derived["drop_path_rate"]
    args["cond_drop_rate"] = config["var_overrides_after_build"]["cond_drop_rate"]
    return args


@functools.cache
def fixture(set_dir: Path) -> tuple[dict, VQVAE, VAR]:
    config = json.loads((set_dir / "config.json").read_text())
    tokenizer = FAMILY.load_tokenizer(set_dir / "vqvae_state_dict.pt", tokenizer_args(config))
    model = FAMILY.load_model(set_dir / "var_state_dict.pt", model_args(config))
    assert config["var_overrides_after_build"]["mode"] == "eval" and not model.training
    return config, tokenizer, model


def logits_atol(config: dict) -> float:
    """The official code's own float32 differences between evaluations of the same logits by different
    paths (teacher forcing vs KV-cache inference, batch B vs 2B): a floor for every logits comparison."""
    d = config["diagnostics"]
    runs = [d[f"infer_cfg{cfg}"] for cfg in config["infer"]["cfgs"]]
    paths = [r[f"teacher_forcing_vs_kvcache_{half}_maxabs"] for r in runs for half in ("cond", "uncond")]
    return max(*paths, d["forward_batch_B_vs_2B_maxabs"])


@pytest.fixture
def golden(var_set: Path):
    return var_set, *fixture(var_set)


def perturbed(module: torch.nn.Module, key: str) -> torch.nn.Module:
    """A copy of ``module`` with the largest-magnitude element of ``key`` scaled by 1.001."""
    copy = type(module)(module.cfg)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    flat = state[key].view(-1)
    flat[flat.abs().argmax()] *= 1.001
    copy.load_state_dict(state)
    return copy.eval()


def test_config_derivations(golden):
    set_dir, config, tokenizer, model = golden
    derived = config["derived"]
    assert (model.L, model.first_l) == (derived["L"], derived["first_l"])
    assert tokenizer.cfg.image_size == derived["image_size"]
    assert tokenizer.cfg.downsample == derived["downsample"]
    assert list(tokenizer.phi_index_per_scale) == derived["phi_index_per_scale"]
    assert model.class_emb.num_embeddings == config["var_forward"]["uncond_label"] + 1
    ref = load_torch(set_dir / "var_state_dict.pt")
    assert list(model.state_dict()) == list(ref), (
        "state-dict keys or their order differ from the official model"
    )
    ref_vq = load_torch(set_dir / "vqvae_state_dict.pt")
    assert list(tokenizer.state_dict()) == list(ref_vq)


def check_features(tokenizer: VQVAE, io: dict) -> None:
    with torch.no_grad():
        close(tokenizer.features(io["images"]), io["f_BChw"], what="vqvae_io.pt f_BChw")


def code_margins_per_scale(
    tokenizer: VQVAE, io: dict
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(margin, noise, nearest distance)] per scale, (B, pn²) each, from the fixture's own f and f_hat:
    scale si quantises the area-downsampled residual f − f_hat_{si−1}, whose noise is at most the sum of
    theirs (averaging does not grow it)."""
    f, fhat = io["f_BChw"].double(), io["fhat_per_scale"].double()
    z_bound = float(bound(f).max() + bound(fhat).max())
    B, C, H, _ = f.shape
    out = []
    for si, pn in enumerate(tokenizer.patch_nums):
        rest = f - fhat[si - 1] if si else f
        z = rest if si == len(tokenizer.patch_nums) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        per_code = code_margins(
            z.permute(0, 2, 3, 1).reshape(-1, C), tokenizer.quantize.embedding.weight, z_bound
        )
        out.append(tuple(x.view(B, -1) for x in per_code))
    return out


def test_tokenizer_features_and_codes(golden):
    set_dir, config, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    assert list(io["phi_index_per_scale"]) == list(tokenizer.phi_index_per_scale)
    assert torch.equal(torch.cat(io["gt_idx_Bl"], 1), io["gt_BL"])
    check_features(tokenizer, io)
    per_scale = code_margins_per_scale(tokenizer, io)
    # the recorded smallest relative margin (d₂ − d₁)/d₁ per scale is the one these tensors hold
    relative = torch.stack([(m / d1).min() for m, _, d1 in per_scale])
    recorded = config["diagnostics"]["vq_min_rel_margin_per_scale"]
    close(recorded, relative, what="config.json diagnostics vq_min_rel_margin_per_scale")

    flat = FAMILY.encode(tokenizer, io["images"])  # torch.cat(tokenizer.encode(images), dim=1)
    assert flat.dtype == torch.int64 and flat.shape == io["gt_BL"].shape
    assert [c.shape for c in tokenizer.split_codes(flat)] == [c.shape for c in io["gt_idx_Bl"]]
    # all scales at once: a near-tie that flips at scale si changes every later scale of its row
    steps = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(tokenizer.patch_nums)])
    margin = torch.cat([m for m, _, _ in per_scale], dim=1)
    noise = torch.cat([n for _, n, _ in per_scale], dim=1)
    ties = NearTies(set_dir)
    ties.exact_sampled(flat, io["gt_BL"], margin, noise, "vqvae_io.pt gt_BL", steps)
    ties.report()


@pytest.mark.parametrize("key", ["encoder.conv_in.weight", "quant_conv.weight"])
def test_feature_check_catches_a_perturbed_weight(golden, key):
    """One weight element ×1.001 in the encoder's first or last layer makes the feature check fail."""
    set_dir, _, tokenizer, _ = golden
    with pytest.raises(AssertionError, match="f_BChw"):
        check_features(perturbed(tokenizer, key), load_torch(set_dir / "vqvae_io.pt"))


def test_teacher_forcing_input_and_fhat(golden):
    set_dir, _, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    with torch.no_grad():
        close(
            tokenizer.codes_to_var_input(io["gt_idx_Bl"]), io["x_BLCv_wo_first_l"], what="x_BLCv_wo_first_l"
        )
        fhat = torch.stack(tokenizer.codes_to_fhat(io["gt_idx_Bl"], every_scale=True))
    close(fhat, io["fhat_per_scale"], what="fhat_per_scale")
    close(fhat[-1], io["f_hat"], what="f_hat")


def test_reconstruction(golden):
    set_dir, _, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    with torch.no_grad():
        # decode = tokenizer.decode_codes(tokenizer.split_codes(codes))
        close(FAMILY.decode(tokenizer, io["gt_BL"]), io["recon_img"], rtol=IMAGES, what="recon_img")


def check_forward(model: VAR, fw: dict, atol: float) -> None:
    with torch.no_grad():
        for labels, key in [(fw["label_B"], "logits_BLV"), (fw["uncond_label_B"], "logits_uncond_BLV")]:
            close(model(labels, fw["x_BLCv_wo_first_l"]), fw[key], atol=atol, what=f"var_forward.pt {key}")


def test_forward_logits(golden):
    set_dir, config, tokenizer, model = golden
    fw = load_torch(set_dir / "var_forward.pt")
    assert fw["label_B"].tolist() == config["var_forward"]["label_B"]
    assert (fw["uncond_label_B"] == config["var_forward"]["uncond_label"]).all()
    atol = logits_atol(config)
    check_forward(model, fw, atol)
    with torch.no_grad():
        # through the family adapter, building the input from the codes with our own tokenizer
        logits = FAMILY.logits(model, tokenizer, fw["label_B"], fw["gt_BL"])
        close(logits, fw["logits_BLV"], atol=atol, what="family.logits")
        # the trainer's 2B batch [labels; null labels] gives the same rows
        both = model(
            torch.cat((fw["label_B"], fw["uncond_label_B"])), fw["x_BLCv_wo_first_l"].repeat(2, 1, 1)
        )
    close(both, torch.cat((fw["logits_BLV"], fw["logits_uncond_BLV"])), atol=atol, what="2B batch logits")


@pytest.mark.parametrize("key", ["word_embed.weight", "head.weight"])
def test_forward_check_catches_a_perturbed_weight(golden, key):
    """One weight element ×1.001 in the first or the last layer makes the forward check fail."""
    set_dir, config, _, model = golden
    with pytest.raises(AssertionError, match="var_forward.pt"):
        check_forward(perturbed(model, key), load_torch(set_dir / "var_forward.pt"), logits_atol(config))


def test_class_dropout_only_in_training(golden):
    set_dir, config, _, model = golden
    fw = load_torch(set_dir / "var_forward.pt")
    args = dict(model_args(config), cond_drop_rate=1.0, drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0)
    always_drop = VAR(VARConfig(**args))
    always_drop.load_state_dict(model.state_dict())
    atol = logits_atol(config)
    with torch.no_grad():
        kept = always_drop.eval()(fw["label_B"], fw["x_BLCv_wo_first_l"])
        dropped = always_drop.train()(fw["label_B"], fw["x_BLCv_wo_first_l"])
    close(kept, fw["logits_BLV"], atol=atol, what="eval: no label dropped")
    close(dropped, fw["logits_uncond_BLV"], atol=atol, what="train: every label dropped")


def test_greedy_generation(var_set: Path):
    ties = NearTies(var_set)
    for run_key in load_torch(var_set / "var_infer.pt")["runs"]:
        check_greedy_generation(var_set, run_key, ties)
    ties.report()


def check_greedy_generation(set_dir: Path, run_key: str, ties: NearTies) -> None:
    config, tokenizer, model = fixture(set_dir)
    infer = load_torch(set_dir / "var_infer.pt")
    run, args = infer["runs"][run_key], infer["runs"][run_key]["args"]
    labels = torch.as_tensor(args["label_B"])
    assert torch.equal(labels, infer["label_B"]) and args["B"] == len(labels)
    assert args["cfg"] in config["infer"]["cfgs"]
    S = len(model.patch_nums)
    ramp = [args["cfg"] * si / (S - 1) for si in range(S)]
    assert ramp == pytest.approx(run["guidance_t_per_scale"], abs=1e-12)
    sampling = dict(top_k=args["top_k"], top_p=args["top_p"], more_smooth=args["more_smooth"])

    # (1 + t)·cond − t·uncond sums 1 + 2t errors of the model's logits
    steps = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(model.patch_nums)])  # (L,)
    t = torch.tensor(ramp, dtype=torch.float64)[steps]
    amp = (1 + 2 * t).view(1, -1, 1)
    atol = logits_atol(config)
    ref_guided = run["guided_logits_BLV"]
    recorded = config["diagnostics"][f"infer_cfg{args['cfg']}"]["guided_argmax_min_margin"]
    close(
        recorded,
        top2_margin(ref_guided).min(),
        rtol=OPS,
        scale=float(ref_guided.abs().max()),
        what=f"config.json diagnostics infer_cfg{args['cfg']} guided_argmax_min_margin",
    )
    # each position's logits come from one normalised hidden state: their noise scales with its magnitude
    guided = dict(rtol=FP32 * amp, scale=ref_guided.abs().amax(-1, keepdim=True), atol=atol * amp)
    margin, noise = top2_margin(ref_guided), 2 * bound(ref_guided, **guided)[..., 0]

    for kv_cache in (True, False):
        generator = torch.Generator().manual_seed(args["g_seed"])
        codes, f_hat = model.generate(
            tokenizer, labels, generator=generator, cfg=args["cfg"], kv_cache=kv_cache, **sampling
        )
        full = ties.exact_sampled(
            torch.cat(codes, 1),
            run["idx_BL"],
            margin,
            noise,
            f"var_infer.pt {run_key} idx_BL (kv_cache={kv_cache})",
            steps,
        )
        close(f_hat[full], run["f_hat"][full], what=f"{run_key} f_hat")  # rows that kept the official tokens
        with torch.no_grad():
            img = (tokenizer.fhat_to_img(f_hat) + 1) / 2
        close(img[full], run["img_01"][full], rtol=IMAGES, what=f"{run_key} img_01")

    # the family adapter, with one generator per row
    generators = [torch.Generator().manual_seed(args["g_seed"] + i) for i in range(len(labels))]
    flat = FAMILY.generate(
        model, tokenizer, labels, guidance=args["cfg"], sampling=sampling, generator=generators
    )
    ties.exact_sampled(flat, run["idx_BL"], margin, noise, f"var_infer.pt {run_key} idx_BL (family)", steps)

    # the sampled logits, rebuilt by teacher forcing on the official tokens
    with torch.no_grad():
        x = tokenizer.codes_to_var_input(run["idx_Bl"])
        cond = model(labels, x)
        uncond = model(torch.full_like(labels, model.num_classes), x)
    close(cond, run["cond_logits_BLV"], atol=atol, what=f"{run_key} cond_logits_BLV")
    close(uncond, run["uncond_logits_BLV"], atol=atol, what=f"{run_key} uncond_logits_BLV")
    tt = t.float().view(1, -1, 1)
    close((1 + tt) * cond - tt * uncond, ref_guided, **guided, what=f"{run_key} guided_logits_BLV")
