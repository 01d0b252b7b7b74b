"""LlamaGen against the official implementation's golden fixtures.

Runs once per fixture set under $CCALIGN_GOLDEN_DIR/llamagen (see conftest.py). All sizes, seeds and
settings come from the set's config.json and .pt files. Tolerances (tests/testkit.py): network outputs
|Δ| ≤ FP32·max(1, max|ref|), amplified by the CFG combination where one is applied; decoded images
IMAGES·max(1, max|ref|); formulas on exact inputs OPS; tokens, codes and argmaxes exact wherever the
fixture's own margins exceed what that noise can move, near-ties reported as skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import FP32, OPS, NearTies, bound, close, code_margins, top2_margin

from ccalign.data.views import center_crop_arr, preprocess, to_model_input
from ccalign.families import get_family
from ccalign.io import load_torch
from ccalign.models.checkpoint import load_state_dict_strict
from ccalign.models.llamagen import Transformer, sampling_probs

# decoder outputs: the decoder's internal activations exceed its output range, so its float32 noise relative
# to the images is larger (README §8: images atol 1e-4; observed ≤ 1.1e-5 on every set)
IMAGES = 1e-4


class GoldenSet:
    def __init__(self, root: Path):
        self.root = root
        self.cfg = json.loads((root / "config.json").read_text())
        self.family = get_family("llamagen")

    @property
    def logits_atol(self) -> float:
        """The official code's own float32 difference between two evaluations of the same logits (KV cache
        vs full forward): a floor for every logits comparison."""
        return self.cfg["gpt_forward"]["kv_max_abs_diff_vs_forward"]

    def pt(self, name: str) -> dict:
        return load_torch(self.root / name)

    def gpt(self, state: dict | None = None) -> Transformer:
        model = self.family.build_model(self.cfg["gpt_model_args"])
        load_state_dict_strict(
            model, state or self.pt("gpt_state_dict.pt"), str(self.root / "gpt_state_dict.pt")
        )
        return model.eval()

    def vq(self, state: dict | None = None):
        args = {**self.cfg["vq_model_args"], "ch": self.cfg["vq_encoder_decoder_ch"]}
        vq = self.family.build_tokenizer(args)
        load_state_dict_strict(vq, state or self.pt("vq_state_dict.pt"), str(self.root / "vq_state_dict.pt"))
        return vq.eval()


@pytest.fixture(scope="module")
def gs(llamagen_set: Path) -> GoldenSet:
    return GoldenSet(llamagen_set)


def perturbed(state: dict, key: str) -> dict:
    """A copy of ``state`` with the largest-magnitude element of ``key`` scaled by 1.001."""
    state = {k: v.clone() for k, v in state.items()}
    flat = state[key].view(-1)
    flat[flat.abs().argmax()] *= 1.001
    return state


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
    close(gs.gpt().freqs_cis, gs.pt("gpt_forward.pt")["freqs_cis"], rtol=OPS, what="freqs_cis")


def check_training_forward(model: Transformer, f: dict, logits_atol: float) -> None:
    """model(idx=z[:, :-1], cond_idx, targets=z): logits, loss and every block's activations."""
    captured = {}
    hooks = [model.layers[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("h0", a[0]))]
    for i, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)))
    with torch.no_grad():
        logits, loss = model(idx=f["idx"], cond_idx=f["cond_idx"], targets=f["targets"])
    for h in hooks:
        h.remove()
    close(logits, f["logits"], atol=logits_atol, what="gpt_forward.pt logits")
    # the mean cross-entropy x_t − logsumexp(x) carries twice the logits' noise
    close(
        loss,
        f["loss"],
        rtol=2 * FP32,
        scale=float(f["logits"].abs().max()),
        atol=2 * logits_atol,
        what="gpt_forward.pt loss",
    )
    close(captured["h0"], f["h0"], what="gpt_forward.pt h0")
    for i in range(len(model.layers)):
        close(captured[i], f["layer_outputs"][i], what=f"gpt_forward.pt layer_outputs[{i}]")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_training_forward(gs, mode):
    model = gs.gpt()
    if mode == "train":  # dropout p = 0 in the fixture config; label dropout was checked not to fire
        model.train()
        torch.manual_seed(gs.cfg["seed"])
    check_training_forward(model, gs.pt("gpt_forward.pt"), gs.logits_atol)


@pytest.mark.parametrize("key", ["layers.0.attention.wqkv.weight", "output.weight"])
def test_forward_check_catches_a_perturbed_weight(gs, key):
    """One weight element ×1.001 in the first or the last layer makes the forward check fail."""
    model = gs.gpt(perturbed(gs.pt("gpt_state_dict.pt"), key))
    with pytest.raises(AssertionError, match="gpt_forward.pt"):
        check_training_forward(model, gs.pt("gpt_forward.pt"), gs.logits_atol)


def test_family_logits_alignment(gs):
    f = gs.pt("gpt_forward.pt")
    with torch.no_grad():
        logits = gs.family.logits(gs.gpt(), None, f["cond_idx"], f["targets"])
    close(logits, f["logits"], atol=gs.logits_atol, what="family.logits")
    assert gs.family.seq_len(gs.gpt()) == f["targets"].shape[1]


def test_eval_full_sequence_forward(gs):
    f = gs.pt("gpt_forward.pt")
    with torch.no_grad():
        logits, _ = gs.gpt()(f["targets"], f["cond_idx"])
    close(logits, f["eval_fullseq_logits"], atol=gs.logits_atol, what="eval_fullseq_logits")


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
    close(kv_logits, f["kv_logits"], atol=gs.logits_atol, what="kv_logits")
    close(kv_logits, f["logits"], atol=gs.logits_atol, what="kv_logits vs full-forward logits")
    model.clear_caches()
    assert list(model.state_dict()) == list(gs.cfg["gpt_state_dict_shapes"])


def cfg_amplification(cfg_scale: float, cfg_interval: float, T: int) -> torch.Tensor:
    """(T,) factor by which the sampler's logits amplify the model's noise: uncond + s·(cond − uncond) sums
    |s| + |1 − s| errors on guided steps, 1 otherwise (token 0 always guided; token t ≥ 1 while t − 1 ≤
    cfg_interval or cfg_interval = −1)."""
    if cfg_scale <= 1.0:
        return torch.ones(T, dtype=torch.float64)
    t = torch.arange(T)
    guided = (t == 0) | (cfg_interval == -1) | (t - 1 <= cfg_interval)
    return torch.where(guided, abs(cfg_scale) + abs(1 - cfg_scale), 1.0).double()


def generate_cases(gs):
    """Per case: (case, its config, sampling kwargs, reference tokens, step logits, margins, noise bound).

    Each step's logits come from one forward of its row: their noise scales with that row's magnitude at
    that step (max over the vocabulary), plus the recorded path difference, times the CFG amplification.
    """
    g = gs.pt("gpt_generate.pt")
    gen_cfg = gs.cfg["gpt_generate"]
    sampling = {k: v for k, v in gen_cfg["sampling_kwargs"].items() if k != "sample_logits"}
    for case, c in gen_cfg["cases"].items():
        assert g[f"cfg_scale_{case}"] == c["cfg_scale"]
        ref_logits = g[f"step_logits_{case}"]  # (B, T, V)
        amp = cfg_amplification(c["cfg_scale"], c["cfg_interval"], ref_logits.shape[1])
        amp = amp.view(1, -1, 1)
        tol = dict(rtol=FP32 * amp, scale=ref_logits.abs().amax(-1, keepdim=True), atol=gs.logits_atol * amp)
        margin = top2_margin(ref_logits)
        # the recorded smallest top-1/top-2 gap is the one these logits hold
        recorded = gen_cfg["min_top1_top2_margin_of_step_logits"][case]
        close(
            recorded,
            margin.min(),
            rtol=OPS,
            scale=float(ref_logits.abs().max()),
            what=f"config.json min_top1_top2_margin_of_step_logits[{case}]",
        )
        noise = 2 * bound(ref_logits, **tol)[..., 0]  # both of the top two can move
        yield case, c, sampling, g[f"seq_{case}"].long(), ref_logits, tol, margin, noise


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv", "nokv"])
def test_generate_every_cfg_case(gs, kv_cache):
    g = gs.pt("gpt_generate.pt")
    model = gs.gpt()
    assert g["max_new_tokens"] == gs.family.seq_len(model)
    ties = NearTies(gs.root)
    for case, c, sampling, ref_codes, ref_logits, tol, margin, noise in generate_cases(gs):
        gen = torch.Generator().manual_seed(gs.cfg["gpt_generate"]["torch_manual_seed_before_each_generate"])
        codes, step_logits = model.generate(
            g["cond"],
            generator=gen,
            cfg_scale=c["cfg_scale"],
            cfg_interval=c["cfg_interval"],
            kv_cache=kv_cache,
            return_logits=True,
            **sampling,
        )
        full = ties.exact_sampled(codes, ref_codes, margin, noise, f"gpt_generate.pt seq_{case}")
        # a step's logits depend on the tokens before it: rows that kept the official tokens throughout
        close(
            step_logits[full],
            ref_logits[full],
            **{**tol, "scale": tol["scale"][full]},
            what=f"gpt_generate.pt step_logits_{case}",
        )
    ties.report()


def test_family_generate_matches(gs):
    ties = NearTies(gs.root)
    g = gs.pt("gpt_generate.pt")
    for case, c, sampling, ref_codes, _, _, margin, noise in generate_cases(gs):
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
        ties.exact_sampled(codes, ref_codes, margin, noise, f"gpt_generate.pt seq_{case}")
    ties.report()


def test_sampling_filter_probs(gs):
    s = gs.pt("sampling.pt")
    cases = gs.cfg["sampling"]["cases"]
    assert cases
    ties = NearTies(gs.root)
    for i, c in enumerate(cases):
        assert (s[f"case{i}_temperature"], s[f"case{i}_top_k"], s[f"case{i}_top_p"]) == (
            c["temperature"],
            c["top_k"],
            c["top_p"],
        )
        logits = s["logits"].clone()
        probs = sampling_probs(logits[:, -1], c["temperature"], c["top_k"], c["top_p"])
        ref = s[f"case{i}_probs"]
        close(probs, ref, rtol=OPS, what=f"sampling.pt case{i}_probs")
        noise = 2 * bound(ref, rtol=OPS)[..., 0]
        ties.exact(
            probs.argmax(-1),
            s[f"case{i}_argmax_idx"][:, 0],
            top2_margin(ref),
            noise,
            f"sampling.pt case{i}_argmax_idx",
        )
        assert torch.equal(logits, s["logits"])  # input untouched
    ties.report()


# ----------------------------------------------------------------------------- VQ tokenizer


def test_vq_state_dict_layout(gs):
    vq = gs.vq()
    expected = gs.cfg["vq_state_dict_shapes"]
    assert list(vq.state_dict()) == list(expected)
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == expected
    n = sum(t.numel() for t in vq.state_dict().values())
    assert n == gs.cfg["vq_derived"]["num_params_incl_buffers"]
    assert vq.downsample == gs.cfg["vq_derived"]["downsample_factor"]


def latent_code_margins(vq, latent: torch.Tensor, latent_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code margins and their noise (B, h*w) of a latent (B, C, h, w), on the unit sphere the
    official quantizer searches."""
    B, C = latent.shape[:2]
    z = latent.permute(0, 2, 3, 1).reshape(-1, C)
    margin, noise, _ = code_margins(z, vq.quantize.embedding.weight, latent_bound, normalize=True)
    return margin.view(B, -1), noise.view(B, -1)


def check_vq_latent(vq, f: dict) -> torch.Tensor:
    with torch.no_grad():
        latent = vq.encode_latent(f["image"])
    close(latent, f["encoder_out"], what="vq_fixture.pt encoder_out")
    return latent


def test_vq_encode(gs):
    f = gs.pt("vq_fixture.pt")
    vq, image = gs.vq(), f["image"]
    assert list(image.shape) == gs.cfg["vq_derived"]["image_shape"]
    check_vq_latent(vq, f)
    with torch.no_grad():
        quant, indices, _ = vq.quantize(vq.encode_latent(image))
    ties = NearTies(gs.root)
    latent_bound = float(bound(f["encoder_out"]).max())
    margin, noise = latent_code_margins(vq, f["encoder_out"], latent_bound)
    # safety direction: these margins must not overstate the smallest one the fixture records
    recorded = gs.cfg["vq_derived"]["min_nearest_code_distance_margin"]
    assert recorded <= float(margin.min()) + OPS, (
        f"min_nearest_code_distance_margin {recorded} > {margin.min()}"
    )
    B = image.shape[0]
    ties.exact(indices.view(B, -1), f["indices"].view(B, -1), margin, noise, "vq_fixture.pt indices")
    # the straight-through latent is the code's (normalised) row: compare where the codes agree
    same = (indices.view(B, -1) == f["indices"].view(B, -1)).view(B, 1, *quant.shape[2:])
    close(quant * same, f["quant"] * same, what="vq_fixture.pt quant")

    # extract_codes_c2i.py: each image with its horizontal flip -> (B, 2, h*w). The fixture holds no latent
    # of the flipped images: their margins come from ours, which lie within the noise of the official ones,
    # so the noise counts twice there.
    both = torch.cat([image, image.flip(-1)])
    codes = gs.family.encode(vq, both)
    assert codes.dtype == torch.long
    with torch.no_grad():
        ours = vq.encode_latent(both)
    m_ours, n_ours = latent_code_margins(vq, ours, latent_bound)
    margin = torch.stack([margin, m_ours[B:]], dim=1)
    noise = torch.stack([noise, 2 * n_ours[B:]], dim=1)
    ties.exact(
        torch.stack([codes[:B], codes[B:]], dim=1),
        f["codes_extract"],
        margin,
        noise,
        "vq_fixture.pt codes_extract",
    )
    ties.report()


@pytest.mark.parametrize("key", ["encoder.conv_in.weight", "quant_conv.weight"])
def test_latent_check_catches_a_perturbed_weight(gs, key):
    """One weight element ×1.001 in the encoder's first or last layer makes the latent check fail."""
    vq = gs.vq(perturbed(gs.pt("vq_state_dict.pt"), key))
    with pytest.raises(AssertionError, match="encoder_out"):
        check_vq_latent(vq, gs.pt("vq_fixture.pt"))


def test_vq_decode(gs):
    f = gs.pt("vq_fixture.pt")
    vq = gs.vq()
    codes = f["codes_extract"][:, 0]
    _, C, h, w = f["qzshape"].tolist()
    assert gs.cfg["vq_model_args"]["codebook_embed_dim"] == C
    with torch.no_grad():
        close(vq.quantize.lookup(codes, h, w), f["codebook_entry"], rtol=OPS, what="codebook_entry")
        decoded = gs.family.decode(vq, codes)
        close(decoded, f["decoded"], rtol=IMAGES, what="vq_fixture.pt decoded")
        close(vq(f["image"])[0], f["forward_dec"], rtol=IMAGES, what="vq_fixture.pt forward_dec")
        close(
            vq.decode_codes(f["generated_codes"]),
            f["decoded_generated"],
            rtol=IMAGES,
            what="vq_fixture.pt decoded_generated",
        )
    # uint8 export: exact on the official decoded images; on ours, off by one only where the value sits
    # within the decoder's noise of a rounding boundary
    assert torch.equal(gs.family.to_uint8(f["decoded"]), f["decoded_uint8"])
    diff = (gs.family.to_uint8(decoded).int() - f["decoded_uint8"].int()).abs()
    raw = (127.5 * f["decoded"].double() + 128.0).permute(0, 2, 3, 1)
    on_boundary = (raw - raw.round()).abs() <= 127.5 * bound(f["decoded"], rtol=IMAGES).permute(0, 2, 3, 1)
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
    close(x, p["normalized_chw"], rtol=0, what="normalized_chw")
    close(x.flip(-1), p["normalized_hflip_chw"], rtol=0, what="normalized_hflip_chw")
    close(to_model_input(np.array(crop)), p["normalized_chw"], rtol=0, what="to_model_input")
