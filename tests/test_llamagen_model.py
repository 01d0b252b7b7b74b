"""LlamaGen model behaviour beyond the fixtures: presets, checkpoint layouts, caches, GQA, generators."""

from __future__ import annotations

import json

import pytest
import torch

from ccalign.families import get_family
from ccalign.models.checkpoint import CheckpointError, load_weights
from ccalign.models.llamagen import CACHE_KEY_SUFFIXES, ModelArgs, Transformer
from ccalign.models.sampling import draw_uniform, sample_from_probs

FAMILY = get_family("llamagen")
# A tiny model: grid 4x4, GQA-capable head count.
TINY = dict(dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=5, block_size=16, multiple_of=32)
TINY_EVAL = dict(TINY, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random tiny model whose output layer is not zero (fresh upstream models predict uniformly)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY_EVAL, **overrides}))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    torch.nn.init.normal_(model.tok_embeddings.weight, std=0.5)
    torch.nn.init.normal_(model.cls_embedding.embedding_table.weight, std=0.5)
    return model.eval()


# ----------------------------------------------------------------------------- presets

PUBLISHED = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-3B": 3.1e9}
PRESET_TOLERANCE = 0.01  # published sizes are rounded to 3 significant figures (1.4B: 2)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
    """ImageNet 256 px defaults (vocab 16384, 1000 classes + null), built on the meta device."""
    assert set(ModelArgs.PRESETS) == set(PUBLISHED)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.1f}M parameters (published {PUBLISHED[name] / 1e6:.0f}M)")
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < PRESET_TOLERANCE


def test_from_name_overrides_and_errors():
    args = ModelArgs.from_name("GPT-L", block_size=576, num_classes=10)
    assert (args.dim, args.n_layer, args.block_size, args.num_classes) == (1024, 24, 576, 10)
    with pytest.raises(ValueError, match="GPT-Q"):
        ModelArgs.from_name("GPT-Q")
    with pytest.raises(ValueError, match="bogus"):
        FAMILY.build_model({"preset": "GPT-B", "bogus": 1})
    with pytest.raises(ValueError, match="square"):
        Transformer(ModelArgs(**{**TINY, "block_size": 15}))


def test_model_args_fields_are_honoured():
    model = Transformer(ModelArgs(**{**TINY, "n_kv_head": 2, "ffn_dim_multiplier": 1.5, "multiple_of": 64}))
    assert model.layers[0].attention.wqkv.out_features == (4 + 2 * 2) * 16
    assert model.layers[0].feed_forward.w1.out_features == 256  # int(1.5 * int(2*256/3)) = 255 -> 256
    no_null = Transformer(ModelArgs(**{**TINY, "class_dropout_prob": 0.0}))
    assert no_null.cls_embedding.embedding_table.num_embeddings == TINY["num_classes"]
    a = Transformer(ModelArgs(**{**TINY, "rope_base": 100})).freqs_cis
    b = Transformer(ModelArgs(**TINY)).freqs_cis
    assert not torch.equal(a, b) and torch.equal(a[0], torch.zeros_like(a[0]))


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("layout", ["model", "ema", "module", "state_dict", "raw"])
def test_every_official_layout_loads_with_extra_caches(tmp_path, layout):
    src = tiny_model(seed=1)
    sd = dict(src.state_dict())
    sd["freqs_cis"] = src.freqs_cis.clone()  # older checkpoints stored the RoPE table
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 16)  # saved after a generate()
    obj = sd if layout == "raw" else {layout: sd, "steps": torch.tensor(3)}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = FAMILY.load_model(path, TINY_EVAL)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_wrong_missing_and_misshaped_keys_are_named(tmp_path):
    sd = tiny_model().state_dict()
    cases = {
        "missing": (
            {k: v for k, v in sd.items() if k != "layers.1.ffn_norm.weight"},
            "layers.1.ffn_norm.weight",
        ),
        "unexpected": (
            {**sd, "layers.9.attention.wo.weight": sd["norm.weight"]},
            "layers.9.attention.wo.weight",
        ),
        "shape": ({**sd, "norm.weight": torch.ones(3)}, "norm.weight: (3,) in file, (64,) in model"),
    }
    for name, (bad, needle) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"model": bad}, path)
        with pytest.raises(CheckpointError) as err:
            load_weights(Transformer(ModelArgs(**TINY_EVAL)), path, ignore=CACHE_KEY_SUFFIXES)
        assert needle in str(err.value) and str(path) in str(err.value), name
    path = tmp_path / "junk.pt"
    torch.save({"optimizer": {"lr": 1.0}}, path)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_weights(Transformer(ModelArgs(**TINY_EVAL)), path, ignore=CACHE_KEY_SUFFIXES)


def test_save_writes_official_layout_atomically(tmp_path):
    model = tiny_model(seed=2)
    path = tmp_path / "out" / "model.pt"
    FAMILY.save_model(model, path)
    # no temp file left behind; the constructor arguments beside the weights
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.args.json", "model.pt"]
    obj = torch.load(path, weights_only=True)
    assert list(obj) == ["model"] and list(obj["model"]) == list(model.state_dict())  # what samplers read
    assert json.loads((path.parent / "model.args.json").read_text()) == model.config.to_dict()
    again = FAMILY.load_model(path)  # the saved arguments are enough
    assert again.config == model.config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    overridden = FAMILY.load_model(path, {"token_dropout_p": 0.5})  # the config's values win
    assert overridden.config.token_dropout_p == 0.5 and overridden.config.dim == model.config.dim
    (path.parent / "model.args.json").unlink()
    with pytest.raises(CheckpointError, match="model.args.json"):  # a released checkpoint needs the config's
        FAMILY.load_model(path)


def test_caches_never_enter_state_dict():
    model = tiny_model()
    keys = list(model.state_dict())
    model.setup_caches(3)
    assert list(model.state_dict()) == keys
    model.clear_caches()

    def run(labels):
        gen = torch.Generator().manual_seed(3)
        return FAMILY.generate(model, None, labels, guidance=2.0, sampling={}, generator=gen)

    first = run(torch.tensor([0, 1]))
    cache = model.layers[0].attention.kv_cache
    run(torch.tensor([4, 2]))  # leaves other keys/values in the cache
    assert torch.equal(run(torch.tensor([0, 1])), first)  # stale slots never leak into a new call
    assert model.layers[0].attention.kv_cache is cache  # same batch size: memory reused
    assert list(model.state_dict()) == keys
    model.clear_caches()
    assert all(layer.attention.kv_cache is None for layer in model.layers)


# ----------------------------------------------------------------------------- forward semantics


def test_class_dropout_only_in_training():
    model = tiny_model(class_dropout_prob=1.0)  # every label dropped when training
    labels, codes = torch.tensor([0, 1, 2]), torch.randint(0, TINY["vocab_size"], (3, 16))
    null = torch.full_like(labels, TINY["num_classes"])
    with torch.no_grad():
        eval_logits = FAMILY.logits(model, None, labels, codes)
        eval_null = FAMILY.logits(model, None, null, codes)
        model.train()
        train_logits = FAMILY.logits(model, None, labels, codes)
    assert torch.allclose(train_logits, eval_null, atol=1e-6)
    assert not torch.allclose(eval_logits, eval_null, atol=1e-3)


def test_kv_cache_equals_full_forward():
    model = tiny_model(seed=3)
    labels, codes = torch.tensor([0, 4, 5]), torch.randint(0, TINY["vocab_size"], (3, 16))
    with torch.no_grad():
        full = FAMILY.logits(model, None, labels, codes)
        model.setup_caches(3)
        steps = [model(None, labels, input_pos=torch.arange(1))[0][:, -1]]
        for t in range(1, 16):
            steps.append(model(codes[:, t - 1 : t], None, input_pos=torch.tensor([t]))[0][:, -1])
        model.clear_caches()
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for g in (1.0, 3.0):
        runs = [
            model.generate(
                labels, generator=torch.Generator().manual_seed(5), cfg_scale=g, kv_cache=kv, **sampling
            )
            for kv in (True, False)
        ]
        assert torch.equal(runs[0], runs[1])


def test_generate_restores_training_mode_and_validates_options():
    model = tiny_model().train()
    codes = model.generate(torch.tensor([1]), generator=torch.Generator())
    assert model.training and codes.shape == (1, 16) and codes.dtype == torch.long
    with pytest.raises(ValueError, match="top_n"):
        FAMILY.generate(model, None, torch.tensor([1]), guidance=1.0, sampling={"top_n": 3}, generator=None)


def test_gqa_matches_mha_with_repeated_kv_heads():
    gqa = tiny_model(seed=4, n_kv_head=2)
    mha = Transformer(ModelArgs(**TINY_EVAL)).eval()
    hd, n_rep = 16, 2
    sd = dict(gqa.state_dict())
    for i in range(TINY["n_layer"]):
        w = sd[f"layers.{i}.attention.wqkv.weight"]
        q, k, v = w.split([64, 2 * hd, 2 * hd])
        rep = [t.view(2, hd, -1).repeat_interleave(n_rep, dim=0).reshape(4 * hd, -1) for t in (k, v)]
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, *rep])
    mha.load_state_dict(sd, strict=True)
    labels, codes = torch.tensor([0, 3]), torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            FAMILY.logits(gqa, None, labels, codes),
            FAMILY.logits(mha, None, labels, codes),
            atol=1e-5,
            rtol=1e-5,
        )
    for guidance in (1.0, 4.0):
        out = [
            FAMILY.generate(
                m, None, labels, guidance=guidance, sampling={}, generator=torch.Generator().manual_seed(7)
            )
            for m in (gqa, mha)
        ]
        assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_row_result_independent_of_batch(guidance):
    model = tiny_model(seed=5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    seeds = [11, 12, 13, 14, 15]
    sampling = {"top_k": 8, "temperature": 1.2}

    def run(rows):
        gens = [torch.Generator().manual_seed(seeds[r]) for r in rows]
        return FAMILY.generate(
            model, None, labels[rows], guidance=guidance, sampling=sampling, generator=gens
        )

    batch = run([0, 1, 2, 3, 4])
    assert torch.equal(run([3]), batch[3:4])
    assert torch.equal(run([4, 1]), batch[[4, 1]])
    assert not torch.equal(batch[0], batch[1])  # rows really differ


# ----------------------------------------------------------------------------- sampling helpers


def test_draw_uniform_single_and_per_row():
    one = draw_uniform(torch.Generator().manual_seed(0), 3, 5, "cpu")
    assert torch.equal(one, torch.rand((3, 5), generator=torch.Generator().manual_seed(0)))
    rows = draw_uniform([torch.Generator().manual_seed(s) for s in (1, 2)], 2, 5, "cpu")
    assert torch.equal(rows[1], torch.rand(5, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError):
        draw_uniform([torch.Generator()], 2, 5, "cpu")


def test_sample_from_probs_is_inverse_cdf():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    u = torch.linspace(0, 1 - 1e-7, 10001).unsqueeze(1)
    idx = sample_from_probs(probs.expand(len(u), -1), u.squeeze(1))
    assert set(idx.tolist()) == {1, 3}  # zero-probability tokens never drawn, even at u -> 1
    assert abs((idx == 1).float().mean().item() - 0.25) < 1e-3
    assert sample_from_probs(probs, torch.tensor([0.9999999])).item() == 3


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_shapes_and_loss():
    args = dict(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1])
    tok = FAMILY.build_tokenizer({**args, "z_channels": 8, "ch": 32}).train()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    loss, metrics = FAMILY.tokenizer_loss(tok, images)
    loss.backward()
    assert torch.isfinite(loss) and {"rec", "vq", "commit", "codebook_usage"} <= set(metrics)
    assert tok.encoder.conv_in.weight.grad is not None and tok.quantize.embedding.weight.grad is not None
    tok.eval()
    codes = FAMILY.encode(tok, images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long and int(codes.max()) < 16
    assert FAMILY.decode(tok, codes).shape == images.shape
