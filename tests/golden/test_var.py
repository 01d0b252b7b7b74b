"""VAR and its multi-scale VQVAE against fixtures produced by the official code.

Runs once per fixture set under $CCALIGN_GOLDEN_DIR/var (see conftest.py); every size, seed and argument
comes from the set.
Tolerances follow the fixture README: indices exact, f / f_hat / teacher-forcing input atol 1e-5,
logits and images atol 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

from ccalign.io import load_torch
from ccalign.models.var import VAR, VARConfig, VARFamily
from ccalign.tokenizers.var_vqvae import VQVAE, VQVAEConfig

FAMILY = VARFamily()


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


@pytest.fixture
def golden(var_set: Path):
    return var_set, *fixture(var_set)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


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


def test_tokenizer_codes_exact(golden):
    set_dir, config, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    assert list(io["phi_index_per_scale"]) == list(tokenizer.phi_index_per_scale)
    with torch.no_grad():
        close(tokenizer.features(io["images"]), io["f_BChw"], atol=1e-5, rtol=2e-5)
    flat = FAMILY.encode(tokenizer, io["images"])  # torch.cat(tokenizer.encode(images), dim=1)
    assert flat.dtype == torch.int64 and torch.equal(flat, io["gt_BL"])
    codes = tokenizer.split_codes(flat)
    assert len(codes) == len(io["gt_idx_Bl"])
    for si, (ours, ref) in enumerate(zip(codes, io["gt_idx_Bl"], strict=True)):
        assert torch.equal(ours, ref), f"scale {si} codes differ"


def test_teacher_forcing_input_and_fhat(golden):
    set_dir, _, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    with torch.no_grad():
        close(tokenizer.codes_to_var_input(io["gt_idx_Bl"]), io["x_BLCv_wo_first_l"], atol=1e-5)
        fhat = torch.stack(tokenizer.codes_to_fhat(io["gt_idx_Bl"], every_scale=True))
    close(fhat, io["fhat_per_scale"], atol=1e-5)
    close(fhat[-1], io["f_hat"], atol=1e-5)


def test_reconstruction(golden):
    set_dir, _, tokenizer, _ = golden
    io = load_torch(set_dir / "vqvae_io.pt")
    with torch.no_grad():
        # decode = tokenizer.decode_codes(tokenizer.split_codes(codes))
        close(FAMILY.decode(tokenizer, io["gt_BL"]), io["recon_img"], atol=1e-4)


def test_forward_logits(golden):
    set_dir, config, tokenizer, model = golden
    fw = load_torch(set_dir / "var_forward.pt")
    assert fw["label_B"].tolist() == config["var_forward"]["label_B"]
    assert (fw["uncond_label_B"] == config["var_forward"]["uncond_label"]).all()
    with torch.no_grad():
        close(model(fw["label_B"], fw["x_BLCv_wo_first_l"]), fw["logits_BLV"], atol=1e-4, rtol=1e-4)
        close(
            model(fw["uncond_label_B"], fw["x_BLCv_wo_first_l"]),
            fw["logits_uncond_BLV"],
            atol=1e-4,
            rtol=1e-4,
        )
        # through the family adapter, building the input from the codes with our own tokenizer
        close(
            FAMILY.logits(model, tokenizer, fw["label_B"], fw["gt_BL"]),
            fw["logits_BLV"],
            atol=1e-4,
            rtol=1e-4,
        )
        # the trainer's 2B batch [labels; null labels] gives the same rows
        both = model(
            torch.cat((fw["label_B"], fw["uncond_label_B"])), fw["x_BLCv_wo_first_l"].repeat(2, 1, 1)
        )
    close(both, torch.cat((fw["logits_BLV"], fw["logits_uncond_BLV"])), atol=1e-4, rtol=1e-4)


def test_class_dropout_only_in_training(golden):
    set_dir, config, _, model = golden
    fw = load_torch(set_dir / "var_forward.pt")
    args = dict(model_args(config), cond_drop_rate=1.0, drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0)
    always_drop = VAR(VARConfig(**args))
    always_drop.load_state_dict(model.state_dict())
    with torch.no_grad():
        close(
            always_drop.eval()(fw["label_B"], fw["x_BLCv_wo_first_l"]), fw["logits_BLV"], atol=1e-4, rtol=1e-4
        )
        dropped = always_drop.train()(fw["label_B"], fw["x_BLCv_wo_first_l"])
    close(dropped, fw["logits_uncond_BLV"], atol=1e-4, rtol=1e-4)


def test_greedy_generation(var_set: Path):
    for run_key in load_torch(var_set / "var_infer.pt")["runs"]:
        check_greedy_generation(var_set, run_key)


def check_greedy_generation(set_dir: Path, run_key: str):
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

    for kv_cache in (True, False):
        generator = torch.Generator().manual_seed(args["g_seed"])
        codes, f_hat = model.generate(
            tokenizer, labels, generator=generator, cfg=args["cfg"], kv_cache=kv_cache, **sampling
        )
        for si, (ours, ref) in enumerate(zip(codes, run["idx_Bl"], strict=True)):
            assert torch.equal(ours, ref), f"kv_cache={kv_cache}: scale {si} tokens differ"
        close(f_hat, run["f_hat"], atol=1e-5)
    with torch.no_grad():
        close((tokenizer.fhat_to_img(f_hat) + 1) / 2, run["img_01"], atol=1e-4)

    # the family adapter, with one generator per row
    generators = [torch.Generator().manual_seed(args["g_seed"] + i) for i in range(len(labels))]
    flat = FAMILY.generate(
        model, tokenizer, labels, guidance=args["cfg"], sampling=sampling, generator=generators
    )
    assert torch.equal(flat, run["idx_BL"])

    # the sampled logits, rebuilt by teacher forcing on the generated tokens
    with torch.no_grad():
        x = tokenizer.codes_to_var_input(run["idx_Bl"])
        cond = model(labels, x)
        uncond = model(torch.full_like(labels, model.num_classes), x)
    close(cond, run["cond_logits_BLV"], atol=1e-4, rtol=1e-4)
    close(uncond, run["uncond_logits_BLV"], atol=1e-4, rtol=1e-4)
    t = torch.cat([torch.full((pn * pn,), ramp[si]) for si, pn in enumerate(model.patch_nums)]).view(1, -1, 1)
    close((1 + t) * cond - t * uncond, run["guided_logits_BLV"], atol=1e-4, rtol=1e-4)
