"""LlamaGen against the official implementation's golden fixtures.

Runs once per fixture set under $CCALIGN_GOLDEN_DIR/llamagen (see conftest.py). All sizes, seeds and
settings come from the set's config.json and .pt files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign.families import get_family
from ccalign.io import load_torch
from ccalign.models.checkpoint import load_state_dict_strict
from ccalign.models.llamagen import Transformer, sampling_probs
from ccalign.tokenizers.llamagen_vq import center_crop_arr, preprocess, to_model_input, to_uint8

ATOL = 1e-4  # logits / activations / decoded images (README section 8)


class GoldenSet:
    def __init__(self, root: Path):
        self.root = root
        self.cfg = json.loads((root / "config.json").read_text())
        self.family = get_family("llamagen")

    def pt(self, name: str) -> dict:
        return load_torch(self.root / name)

    def gpt(self) -> Transformer:
        model = self.family.build_model(self.cfg["gpt_model_args"])
        load_state_dict_strict(model, self.pt("gpt_state_dict.pt"), str(self.root / "gpt_state_dict.pt"))
        return model.eval()

    def vq(self):
        args = {**self.cfg["vq_model_args"], "ch": self.cfg["vq_encoder_decoder_ch"]}
        vq = self.family.build_tokenizer(args)
        load_state_dict_strict(vq, self.pt("vq_state_dict.pt"), str(self.root / "vq_state_dict.pt"))
        return vq.eval()


@pytest.fixture(scope="module")
def gs(llamagen_set: Path) -> GoldenSet:
    return GoldenSet(llamagen_set)


def close(actual, expected, atol=ATOL, rtol=ATOL):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- GPT


def test_gpt_state_dict_layout_and_sizes(gs):
    model = gs.gpt()
    sd = model.state_dict()
    expected = gs.cfg["gpt_state_dict_shapes"]
    assert list(sd) == list(expected)  # same keys, same order, no caches
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    derived = gs.cfg["gpt_derived"]
    assert sum(p.numel() for p in model.parameters()) == derived["num_params"]
    assert model.config.head_dim == derived["head_dim"]
    assert model.layers[0].feed_forward.w1.out_features == derived["ffn_hidden_dim"]
    assert model.cls_embedding.embedding_table.num_embeddings == derived["cls_embedding_rows"]
    assert gs.family.num_classes(model) == derived["uncond_class_index"]
    assert list(model.freqs_cis.shape) == derived["freqs_cis_shape"]


def test_rope_table(gs):
    close(gs.gpt().freqs_cis, gs.pt("gpt_forward.pt")["freqs_cis"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_training_forward(gs, mode):
    """model(idx=z[:, :-1], cond_idx, targets=z): logits, loss and every block's activations."""
    f = gs.pt("gpt_forward.pt")
    model = gs.gpt()
    if mode == "train":  # dropout p = 0 in the fixture config; label dropout was checked not to fire
        model.train()
        torch.manual_seed(gs.cfg["seed"])
    captured = {}
    model.layers[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("h0", a[0]))
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
    with torch.no_grad():
        logits, loss = model(idx=f["idx"], cond_idx=f["cond_idx"], targets=f["targets"])
    assert logits.shape == f["logits"].shape
    close(logits, f["logits"])
    close(loss, f["loss"], atol=0, rtol=1e-5)
    close(captured["h0"], f["h0"])
    for i in range(len(model.layers)):
        close(captured[i], f["layer_outputs"][i])


def test_family_logits_alignment(gs):
    f = gs.pt("gpt_forward.pt")
    with torch.no_grad():
        logits = gs.family.logits(gs.gpt(), None, f["cond_idx"], f["targets"])
    close(logits, f["logits"])
    assert gs.family.seq_len(gs.gpt()) == f["targets"].shape[1]


def test_eval_full_sequence_forward(gs):
    f = gs.pt("gpt_forward.pt")
    with torch.no_grad():
        logits, _ = gs.gpt()(f["targets"], f["cond_idx"])
    close(logits, f["eval_fullseq_logits"])


def test_kv_cached_teacher_forcing(gs):
    """Prefill the class token, then feed targets one by one through the KV cache."""
    f = gs.pt("gpt_forward.pt")
    model, targets, cond = gs.gpt(), f["targets"], f["cond_idx"]
    model.setup_caches(targets.shape[0])
    with torch.no_grad():
        steps = [model(None, cond, input_pos=torch.arange(1))[0][:, -1]]
        for t in range(1, targets.shape[1]):
            steps.append(model(targets[:, t - 1 : t], None, input_pos=torch.tensor([t]))[0][:, -1])
    kv_logits = torch.stack(steps, dim=1)
    close(kv_logits, f["kv_logits"])
    close(kv_logits, f["logits"])
    model.clear_caches()
    assert list(model.state_dict()) == list(gs.cfg["gpt_state_dict_shapes"])


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv", "nokv"])
def test_generate_every_cfg_case(gs, kv_cache):
    g = gs.pt("gpt_generate.pt")
    gen_cfg = gs.cfg["gpt_generate"]
    sampling = {k: v for k, v in gen_cfg["sampling_kwargs"].items() if k != "sample_logits"}
    model = gs.gpt()
    assert g["max_new_tokens"] == gs.family.seq_len(model)
    for case, c in gen_cfg["cases"].items():
        assert g[f"cfg_scale_{case}"] == c["cfg_scale"]
        gen = torch.Generator().manual_seed(gen_cfg["torch_manual_seed_before_each_generate"])
        codes, step_logits = model.generate(
            g["cond"],
            generator=gen,
            cfg_scale=c["cfg_scale"],
            cfg_interval=c["cfg_interval"],
            kv_cache=kv_cache,
            return_logits=True,
            **sampling,
        )
        assert torch.equal(codes, g[f"seq_{case}"].long()), case
        close(step_logits, g[f"step_logits_{case}"])


def test_family_generate_matches(gs):
    g = gs.pt("gpt_generate.pt")
    gen_cfg = gs.cfg["gpt_generate"]
    sampling = {k: v for k, v in gen_cfg["sampling_kwargs"].items() if k != "sample_logits"}
    for case, c in gen_cfg["cases"].items():
        gens = [torch.Generator().manual_seed(i) for i in range(len(g["cond"]))]
        codes = gs.family.generate(
            gs.gpt(),
            None,
            g["cond"],
            guidance=c["cfg_scale"],
            sampling={**sampling, "cfg_interval": c["cfg_interval"]},
            generator=gens,
        )
        assert codes.dtype == torch.long
        assert torch.equal(codes, g[f"seq_{case}"].long()), case


def test_sampling_filter_probs(gs):
    s = gs.pt("sampling.pt")
    cases = gs.cfg["sampling"]["cases"]
    assert cases
    for i, c in enumerate(cases):
        assert (s[f"case{i}_temperature"], s[f"case{i}_top_k"], s[f"case{i}_top_p"]) == (
            c["temperature"],
            c["top_k"],
            c["top_p"],
        )
        logits = s["logits"].clone()
        probs = sampling_probs(logits[:, -1], c["temperature"], c["top_k"], c["top_p"])
        close(probs, s[f"case{i}_probs"], atol=1e-6, rtol=1e-5)
        assert torch.equal(probs.argmax(-1, keepdim=True), s[f"case{i}_argmax_idx"])
        assert torch.equal(logits, s["logits"])  # input untouched


# ----------------------------------------------------------------------------- VQ tokenizer


def test_vq_state_dict_layout(gs):
    vq = gs.vq()
    expected = gs.cfg["vq_state_dict_shapes"]
    assert list(vq.state_dict()) == list(expected)
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == expected
    n = sum(t.numel() for t in vq.state_dict().values())
    assert n == gs.cfg["vq_derived"]["num_params_incl_buffers"]
    assert vq.downsample == gs.cfg["vq_derived"]["downsample_factor"]


def test_vq_encode(gs):
    f = gs.pt("vq_fixture.pt")
    vq, image = gs.vq(), f["image"]
    assert list(image.shape) == gs.cfg["vq_derived"]["image_shape"]
    with torch.no_grad():
        latent = vq.encode_latent(image)
        quant, indices, _ = vq.quantize(latent)
    close(latent, f["encoder_out"])
    close(quant, f["quant"])
    assert torch.equal(indices.flatten(), f["indices"])
    # extract_codes_c2i.py: each image with its horizontal flip -> (B, 2, h*w)
    B = image.shape[0]
    codes = gs.family.encode(vq, torch.cat([image, image.flip(-1)]))
    assert codes.dtype == torch.long
    assert torch.equal(torch.stack([codes[:B], codes[B:]], dim=1), f["codes_extract"])


def test_vq_decode(gs):
    f = gs.pt("vq_fixture.pt")
    vq = gs.vq()
    codes = f["codes_extract"][:, 0]
    _, C, h, w = f["qzshape"].tolist()
    assert gs.cfg["vq_model_args"]["codebook_embed_dim"] == C
    with torch.no_grad():
        close(vq.quantize.lookup(codes, h, w), f["codebook_entry"], atol=1e-6, rtol=1e-6)
        decoded = gs.family.decode(vq, codes)
        close(decoded, f["decoded"])
        close(vq(f["image"])[0], f["forward_dec"])
        close(vq.decode_codes(f["generated_codes"]), f["decoded_generated"])
    # uint8 export: exact, or off by one only where the value sits on a rounding boundary
    u8 = to_uint8(decoded)
    diff = (u8.int() - f["decoded_uint8"].int()).abs()
    raw = (127.5 * decoded + 128.0).permute(0, 2, 3, 1)
    on_boundary = (raw - raw.round()).abs() < 1e-4
    assert diff.max() <= 1 and bool(on_boundary[diff > 0].all())


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess(gs):
    p = gs.pt("preprocess.pt")
    image = Image.fromarray(p["pil_input_uint8_hwc"].numpy())
    assert list(image.size) == gs.cfg["preprocess"]["pil_size_wh"]
    size = p["image_size"]
    assert size == gs.cfg["preprocess"]["image_size"]
    crop = center_crop_arr(image, size)
    assert torch.equal(torch.from_numpy(np.array(crop)), p["center_crop_uint8_hwc"])
    x = preprocess(image, size)
    close(x, p["normalized_chw"], atol=0, rtol=0)
    close(x.flip(-1), p["normalized_hflip_chw"], atol=0, rtol=0)
    close(to_model_input(crop), p["normalized_chw"], atol=0, rtol=0)
