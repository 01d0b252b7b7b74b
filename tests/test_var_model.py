"""VAR presets, checkpoint layouts, sampling semantics and reproducibility (tiny random models)."""

from __future__ import annotations

import functools

import pytest
import torch

from ccalign.families import get_family
from ccalign.models.var import PUBLISHED_PARAMS, VAR, VARConfig, filter_top_k_top_p
from ccalign.tokenizers.var_vqvae import PhiBank, VQVAEConfig

FAMILY = get_family("var")
PATCH_NUMS = (1, 2, 3, 4)
# two levels: 8 px images, cheap to encode and decode
TOKENIZER_ARGS = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PATCH_NUMS)
MODEL_ARGS = dict(depth=2, num_classes=10, V=64, Cvae=8, patch_nums=PATCH_NUMS)


@functools.cache
def tiny(**overrides):
    """A tiny VAR with lively (non-init) weights and its tokenizer, both eval."""
    torch.manual_seed(0)
    tokenizer = FAMILY.build_tokenizer(TOKENIZER_ARGS).eval()
    model = FAMILY.build_model({**MODEL_ARGS, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():  # after init the blocks are near-identity; make them matter
            p.add_(torch.randn_like(p) * 0.05)
    return model, tokenizer


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts(name):
    # the published sizes (310M, 600M, 1.0B, 2.0B, 2.3B) have two significant digits: allow 5 %
    with torch.device("meta"):
        model = VAR(VARConfig.from_name(name))
    n = sum(p.numel() for p in model.parameters())
    print(f"VAR-{name}: {n:,} parameters (published {PUBLISHED_PARAMS[name]:,.0f})")
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.05
    cfg = model.cfg
    assert cfg.embed_dim == 64 * cfg.depth and cfg.num_heads == cfg.depth and cfg.depth == int(name[1:])


def test_exact_d16_size_and_presets_overridable():
    with torch.device("meta"):
        model = VAR(VARConfig.from_name("d16"))
    assert sum(p.numel() for p in model.parameters()) == 310_283_520  # the official d16 count
    cfg = VARConfig.from_dict({"preset": "d20", "num_classes": 7})
    assert (cfg.depth, cfg.embed_dim, cfg.num_classes) == (20, 1280, 7)
    assert set(VARConfig.PRESETS) >= {"d16", "d20", "d24", "d30"}
    with pytest.raises(ValueError, match="unknown VARConfig arguments"):
        VARConfig.from_dict({"depth": 2, "n_layer": 3})


def test_phi_choice_replicates_float64_ties():
    # 10 default scales, 4 φ: si/(S-1) = 2/9 and 7/9 lie exactly between two ticks in real arithmetic
    assert PhiBank(VQVAEConfig()).index_per_scale == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert PhiBank(VQVAEConfig(share_quant_resi=1, v_patch_nums=PATCH_NUMS)).index_per_scale == (0, 0, 0, 0)
    assert PhiBank(VQVAEConfig(share_quant_resi=0, v_patch_nums=PATCH_NUMS)).index_per_scale == (0, 1, 2, 3)


def test_null_class_is_num_classes_and_keys_official():
    model, _ = tiny()
    assert model.class_emb.num_embeddings == MODEL_ARGS["num_classes"] + 1
    keys = set(model.state_dict())
    assert {
        "lvl_1L",
        "attn_bias_for_masking",
        "blocks.0.attn.zero_k_bias",
        "blocks.1.ada_lin.1.weight",
    } <= keys
    shared, _ = tiny(shared_aln=True)
    keys = set(shared.state_dict())
    assert {"shared_ada_lin.1.weight", "blocks.0.ada_gss"} <= keys and "blocks.0.ada_lin.1.weight" not in keys
    plain = FAMILY.build_model({**MODEL_ARGS, "attn_l2_norm": False})
    assert "blocks.0.attn.scale_mul_1H11" not in plain.state_dict()


def test_class_dropout_only_in_training():
    model, tokenizer = tiny()
    drop = FAMILY.build_model({**MODEL_ARGS, "cond_drop_rate": 1.0, "drop_path_rate": 0.0})
    drop.load_state_dict(model.state_dict())
    labels = torch.tensor([1, 2, 3])
    codes = torch.randint(0, 64, (3, model.L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = FAMILY.logits(drop.eval(), tokenizer, labels, codes)
        uncond = FAMILY.logits(drop.eval(), tokenizer, torch.full_like(labels, 10), codes)
        train = FAMILY.logits(drop.train(), tokenizer, labels, codes)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(train, uncond)
    assert train.shape == (3, FAMILY.seq_len(model), FAMILY.vocab_size(model))


@pytest.mark.parametrize("shared_aln", [False, True])
def test_kv_cache_generation_matches_teacher_forcing(shared_aln):
    model, tokenizer = tiny(shared_aln=shared_aln)
    labels = torch.tensor([0, 4, 9])
    g = torch.Generator().manual_seed(1)
    codes = FAMILY.generate(model, tokenizer, labels, guidance=0.0, sampling={"top_k": 1}, generator=g)
    with torch.no_grad():
        logits = FAMILY.logits(model, tokenizer, labels, codes)
    assert torch.equal(logits.argmax(-1), codes)  # greedy = argmax of the teacher-forcing logits


def test_vocab_filters_follow_var():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    inf = -torch.inf
    # top-k keeps everything tied with the k-th largest value
    assert filter_top_k_top_p(logits, top_k=1).tolist() == [[inf, 3.0, inf, 3.0, inf]]
    assert filter_top_k_top_p(logits, top_k=3).tolist() == [[inf, 3.0, 2.0, 3.0, inf]]
    assert torch.equal(filter_top_k_top_p(logits, top_k=900), logits)  # k >= V: no filtering
    # top-p drops the ascending prefix whose cumulative probability is <= 1 - p, keeping the top token
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_k_top_p(probs.log(), top_p=0.9).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    assert filter_top_k_top_p(probs.log(), top_p=1e-6).isfinite().tolist() == [[True, False, False, False]]
    assert filter_top_k_top_p(logits, top_k=0, top_p=0.0) is logits


def test_generation_is_reproducible():
    model, tokenizer = tiny()
    labels = torch.tensor([1, 2, 3, 4])
    sampling = dict(FAMILY.default_sampling)
    assert sampling == {"top_k": 900, "top_p": 0.96, "more_smooth": False, "kv_cache": True}

    def run(seed, guidance=1.5, **extra):
        g = torch.Generator().manual_seed(seed)
        return FAMILY.generate(
            model, tokenizer, labels, guidance=guidance, sampling={**sampling, **extra}, generator=g
        )

    a, b = run(0), run(0)
    assert torch.equal(a, b) and a.shape == (4, model.L) and int(a.min()) >= 0 and int(a.max()) < 64
    assert not torch.equal(a, run(1))
    assert torch.equal(run(0, kv_cache=False), a)  # recomputing the prefix gives the same tokens
    assert not torch.equal(run(0, guidance=0.0), a)
    smooth = run(0, more_smooth=True)
    assert torch.equal(smooth, run(0, more_smooth=True)) and not torch.equal(smooth, a)
    with pytest.raises(ValueError, match="unknown VAR sampling options"):
        run(0, temperature=1.0)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_per_row_generators_independent_of_batch(guidance):
    model, tokenizer = tiny()
    labels = torch.tensor([3, 1, 4, 1])
    seeds = [10, 11, 12, 13]

    def run(rows):
        gens = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        return FAMILY.generate(
            model,
            tokenizer,
            labels[rows],
            guidance=guidance,
            sampling=FAMILY.default_sampling,
            generator=gens,
        )

    full = run([0, 1, 2, 3])
    assert torch.equal(run([2]), full[2:3])
    assert torch.equal(run([3, 1]), full[[3, 1]])
    assert not torch.equal(full[1], full[3])  # same label, different generator


def test_low_precision_paths_run():
    model, tokenizer = tiny()
    labels = torch.tensor([1, 2])
    codes = torch.randint(0, 64, (2, model.L), generator=torch.Generator().manual_seed(0))
    sampling = {**FAMILY.default_sampling, "kv_cache": False}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = FAMILY.logits(model, tokenizer, labels, codes)
        out = FAMILY.generate(
            model, tokenizer, labels, guidance=1.5, sampling=sampling, generator=torch.Generator()
        )
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and out.shape == codes.shape
    half = (
        FAMILY.build_model(MODEL_ARGS).to(torch.bfloat16).eval()
    )  # a model cast as a whole, as in benchmarks
    with torch.no_grad():
        out = FAMILY.generate(
            half, tokenizer, labels, guidance=1.5, sampling=sampling, generator=torch.Generator()
        )
        assert torch.isfinite(FAMILY.logits(half, tokenizer, labels, out)).all()


def _layouts(sd: dict, inner: str) -> dict[str, object]:
    return {
        "raw": sd,
        "model": {"model": sd, "optimizer": {}, "steps": 5},
        "ema": {"ema": sd},
        "module": {"module": sd},
        "state_dict": {"state_dict": sd},
        "trainer_cca": {"epoch": 1, "iter": 0, "trainer": sd},
        "trainer_var": {"trainer": {inner: sd, "config": {"label_smooth": 0.1}}},
        "compiled": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    }


@pytest.mark.parametrize("layout", list(_layouts({}, "")))
def test_checkpoint_layouts_load(tmp_path, layout):
    model, tokenizer = tiny()
    path = tmp_path / "var.pt"
    torch.save(_layouts(model.state_dict(), "var_wo_ddp")[layout], path)
    loaded = FAMILY.load_model(path, MODEL_ARGS)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    tok_sd = dict(tokenizer.state_dict())
    tok_sd["quantize.ema_vocab_hit_SV"] = torch.zeros(7, 64)  # other scale count: ignored, as officially
    torch.save(_layouts(tok_sd, "vae_local")[layout], path)
    tok = FAMILY.load_tokenizer(path, TOKENIZER_ARGS)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert torch.equal(tok.quantize.embedding.weight, tokenizer.quantize.embedding.weight)


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    model, _ = tiny()
    sd = dict(model.state_dict())
    sd["blocks.0.attn.k_bias"] = sd.pop("blocks.0.attn.zero_k_bias")
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        FAMILY.load_model(path, MODEL_ARGS)
    msg = str(err.value)
    assert str(path) in msg and "missing keys ['blocks.0.attn.zero_k_bias']" in msg
    assert "unexpected keys ['blocks.0.attn.k_bias']" in msg

    torch.save(dict(model.state_dict()), path)
    with pytest.raises(ValueError, match=r"class_emb.weight: \(11, 128\) in file, \(8, 128\) in model"):
        FAMILY.load_model(path, {**MODEL_ARGS, "num_classes": 7})
    torch.save({"weights": {"a": 1}}, path)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        FAMILY.load_model(path, MODEL_ARGS)


def test_save_model_official_layout_atomic(tmp_path):
    model, _ = tiny()
    path = tmp_path / "out" / "model.pt"
    FAMILY.save_model(model, path)
    # no temporary file left behind; the constructor arguments beside the weights
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.args.json", "model.pt"]
    assert FAMILY.load_model(path).cfg == model.cfg
    sd = torch.load(path, weights_only=True)
    assert list(sd) == list(model.state_dict())  # raw state dict, like the released var_d*.pth
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_family_encode_decode_and_tokenizer_loss():
    _, tokenizer = tiny()
    size = tokenizer.cfg.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = FAMILY.encode(tokenizer, images)
    assert codes.shape == (2, sum(pn * pn for pn in PATCH_NUMS)) and codes.dtype == torch.int64
    with torch.no_grad():
        recon = FAMILY.decode(tokenizer, codes)
    assert recon.shape == images.shape and recon.abs().max() <= 1

    trainable = FAMILY.build_tokenizer(TOKENIZER_ARGS).train()
    trainable.load_state_dict(tokenizer.state_dict())
    loss, metrics = FAMILY.tokenizer_loss(trainable, images)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "rec_mse", "rec_l1", "vq_loss"}
    loss.backward()
    for name in (
        "encoder.conv_in.weight",
        "quantize.embedding.weight",
        "quantize.quant_resi.qresi_ls.0.weight",
    ):
        grad = dict(trainable.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mismatched_tokenizer_fails_clearly():
    model, _ = tiny()
    other = FAMILY.build_tokenizer({**TOKENIZER_ARGS, "vocab_size": 32})
    with pytest.raises(ValueError, match="does not match VAR"):
        FAMILY.generate(
            model, other, torch.tensor([0]), guidance=0.0, sampling={}, generator=torch.Generator()
        )


@pytest.mark.parametrize("share", [0, 1, 4])
def test_phi_layouts_keys_and_use(share):
    cfg = dict(TOKENIZER_ARGS, share_quant_resi=share)
    tokenizer = FAMILY.build_tokenizer(cfg).eval()
    keys = [k for k in tokenizer.state_dict() if k.startswith("quantize.quant_resi.")]
    last = {0: "3", 1: "qresi", 4: "qresi_ls.3"}[
        share
    ]  # one φ per scale / one shared / four partially shared
    assert f"quantize.quant_resi.{last}.weight" in keys
    assert len(keys) == 2 * (1 if share == 1 else len(PATCH_NUMS))
    codes = [torch.zeros(1, pn * pn, dtype=torch.long) for pn in PATCH_NUMS]
    with torch.no_grad():
        before = tokenizer.codes_to_fhat(codes)
        for name, p in tokenizer.named_parameters():
            if name.startswith("quantize.quant_resi."):
                p.zero_()
        assert not torch.allclose(tokenizer.codes_to_fhat(codes), before)  # the φ convs are really applied
