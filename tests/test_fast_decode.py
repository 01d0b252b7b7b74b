"""The fast decode paths (static buffers, prefix attention, capture-ready steps) against the reference loops,
the sampling precision of each family, and batch_size auto (tiny random models, float32 on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccalign.families import get_family
from ccalign.models.graphs import StepRunner
from ccalign.models.llamagen import FastDecoder, ModelArgs, Transformer
from ccalign.models.sampling import CounterRNG
from ccalign.sample.batch import AUTO_CAP, CPU_AUTO, auto_batch_size, fit_batch
from ccalign.sample.generate import Sampler, SampleSpec, generate_batch, sample_noise

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).resolve().parent / "golden"
LLAMAGEN = get_family("llamagen")
VAR = get_family("var")
FAST = ("eager", "graph", "compile")  # on CPU all three run the same static step eagerly


def tiny_llamagen(**overrides) -> Transformer:
    torch.manual_seed(0)
    args = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=48, num_classes=6, block_size=16)
    model = Transformer(ModelArgs(**{**args, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():  # lively logits (the output layer starts at zero)
            p.add_(0.3 * torch.randn_like(p))
    return model


def tiny_var():
    torch.manual_seed(0)
    pns = (1, 2, 3, 4)
    tokenizer = VAR.build_tokenizer(
        dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=pns)
    )
    model = VAR.build_model(dict(depth=2, num_classes=10, V=64, Cvae=8, patch_nums=pns))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), tokenizer.eval()


LLAMAGEN_CASES = {
    "free": (1.0, {}),
    "cfg": (3.0, {}),
    "cfg-interval-top-k-top-p": (2.5, {"cfg_interval": 5, "top_k": 10, "top_p": 0.8}),
    "free-temperature-top-p": (1.0, {"temperature": 0.7, "top_p": 0.9}),
}


@pytest.mark.parametrize("case", list(LLAMAGEN_CASES))
def test_llamagen_fast_path_gives_the_reference_tokens(case):
    guidance, sampling = LLAMAGEN_CASES[case]
    model = tiny_llamagen()
    labels = torch.tensor([0, 3, 5, 3, 1])
    rng = CounterRNG([11, 12, 13, 14, 15])
    ref = LLAMAGEN.generate(model, None, labels, guidance=guidance, sampling=sampling, generator=rng)
    assert len(set(map(tuple, ref.tolist()))) == 5  # the rows are really sampled
    for decode in FAST:
        fast = LLAMAGEN.generate(
            model, None, labels, guidance=guidance, sampling=sampling, generator=rng, decode=decode
        )
        assert torch.equal(fast, ref), decode
    # torch generators feed both paths the same noise too
    gens = [torch.Generator().manual_seed(s) for s in range(5)]
    ref = LLAMAGEN.generate(model, None, labels, guidance=guidance, sampling=sampling, generator=gens)
    gens = [torch.Generator().manual_seed(s) for s in range(5)]
    fast = LLAMAGEN.generate(
        model, None, labels, guidance=guidance, sampling=sampling, generator=gens, decode="eager"
    )
    assert torch.equal(fast, ref)


def test_llamagen_prefix_attention_matches_the_full_cache():
    model = tiny_llamagen()
    codes = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    model.setup_caches(3)
    with torch.no_grad():
        model(None, labels, input_pos=torch.tensor([0]))
        for t in range(1, 9):  # fill positions 0..8
            model(codes[:, t - 1 : t], None, input_pos=torch.tensor([t]))
        pos = torch.tensor([9])
        full = model(codes[:, 8:9], None, input_pos=pos)[0]
        for kv_len in (10, 16, 24):  # exact prefix, a block, every slot
            torch.testing.assert_close(model(codes[:, 8:9], None, input_pos=pos, kv_len=kv_len)[0], full)


def test_llamagen_decoder_is_reused_and_rebuilt_when_needed():
    model = tiny_llamagen()
    labels, rng = torch.tensor([1, 2]), CounterRNG([5, 6])

    def fast():
        return model.generate(labels, generator=rng, cfg_scale=2.0, decode="graph")

    first = fast()
    decoder = model._decoder
    assert isinstance(decoder, FastDecoder) and not decoder.runner.capture  # no capture on CPU
    assert torch.equal(fast(), first) and model._decoder is decoder  # same shape: same buffers
    # the reference path with another batch replaces the KV caches: the decoder must not use stale ones
    model.generate(torch.tensor([1, 2, 3]), generator=CounterRNG([1, 2, 3]), cfg_scale=2.0)
    assert torch.equal(fast(), first) and model._decoder is not decoder
    model.clear_caches()
    assert model._decoder is None
    with pytest.raises(ValueError, match="needs kv_cache=True"):
        model.generate(labels, generator=rng, kv_cache=False, decode="eager")
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(labels, generator=rng, decode="fast")


VAR_CASES = {
    "free": (0.0, {"top_k": 0, "top_p": 0.0}),
    "cfg": (1.5, {"top_k": 0, "top_p": 0.0}),
    "cfg-top-k-top-p": (2.0, {"top_k": 20, "top_p": 0.9}),
    "free-more-smooth": (0.0, {"top_k": 30, "top_p": 0.96, "more_smooth": True}),
}


@pytest.mark.parametrize("case", list(VAR_CASES))
def test_var_fast_path_gives_the_reference_tokens_and_latent(case):
    guidance, sampling = VAR_CASES[case]
    model, tokenizer = tiny_var()
    labels = torch.tensor([0, 9, 4, 4])
    rng = CounterRNG([21, 22, 23, 24])
    ref_codes, ref_fhat = model.generate(tokenizer, labels, generator=rng, cfg=guidance, **sampling)
    assert len(set(map(tuple, torch.cat(ref_codes, 1).tolist()))) == 4
    for decode in FAST:
        codes, f_hat = model.generate(
            tokenizer, labels, generator=rng, cfg=guidance, decode=decode, **sampling
        )
        assert all(torch.equal(a, b) for a, b in zip(codes, ref_codes, strict=True)), decode
        torch.testing.assert_close(f_hat, ref_fhat)
    # torch generators: drawn up front in the reference's order
    gen = torch.Generator().manual_seed(3)
    ref = VAR.generate(model, tokenizer, labels, guidance=guidance, sampling=sampling, generator=gen)
    gen = torch.Generator().manual_seed(3)
    fast = VAR.generate(
        model, tokenizer, labels, guidance=guidance, sampling=sampling, generator=gen, decode="eager"
    )
    assert torch.equal(fast, ref)


def test_var_decoder_is_reused_per_shape():
    model, tokenizer = tiny_var()
    rng = CounterRNG([1, 2, 3])
    labels = torch.tensor([1, 2, 3])
    first = VAR.generate(model, tokenizer, labels, guidance=1.5, sampling={}, generator=rng, decode="graph")
    decoder = model._decoder
    again = VAR.generate(model, tokenizer, labels, guidance=1.5, sampling={}, generator=rng, decode="graph")
    assert torch.equal(again, first) and model._decoder is decoder
    VAR.generate(
        model, tokenizer, labels[:2], guidance=1.5, sampling={}, generator=CounterRNG([1, 2]), decode="graph"
    )
    assert model._decoder is not decoder
    with pytest.raises(ValueError, match="needs kv_cache=True"):
        model.generate(tokenizer, labels, generator=rng, kv_cache=False, decode="eager")


def test_step_runner_never_captures_on_cpu():
    calls = []
    runner = StepRunner("cpu", "graph")
    assert not runner.capture and not runner.compile
    assert runner("k", lambda: calls.append(1) or 7) == 7
    runner("k", lambda: calls.append(2))
    assert calls == [1, 2] and runner.graphs == {}
    with pytest.raises(ValueError, match="decode must be one of"):
        StepRunner("cpu", "cudagraph")


# ----------------------------------------------------------------------------- the sample library


def golden_models(name: str):
    """Tiny models from the golden fixture configs (as the sample-stage tests build them)."""
    g = json.loads((GOLDEN / name / "config.json").read_text())
    family = get_family(name)
    if name == "llamagen":
        model_args, tok_args = g["gpt_model_args"], {**g["vq_model_args"], "ch": g["vq_encoder_decoder_ch"]}
    else:
        kwargs = g["build_vae_var_kwargs"]
        tok_args = {k: v for k, v in g["derived"]["vqvae"].items() if k != "test_mode"}
        model_args = {**g["derived"]["var"], "V": kwargs["V"], "Cvae": kwargs["Cvae"]}
    torch.manual_seed(0)
    model, tokenizer = family.build_model(model_args), family.build_tokenizer(tok_args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return family, model.eval(), tokenizer.eval()


def spec_for(family, model, **kw) -> SampleSpec:
    guidance = {"llamagen": 2.0, "var": 1.5}[family.name]
    base = dict(family=family.name, num_classes=family.num_classes(model), per_class=2, seed=7)
    return SampleSpec(**{**base, "guidance": guidance, "sampling": dict(family.default_sampling), **kw})


@pytest.mark.parametrize("name", ["llamagen", "var"])
def test_sampler_fast_and_reference_pixels_agree_and_padding_is_invisible(name):
    family, model, tokenizer = golden_models(name)
    spec = spec_for(family, model)
    ref = generate_batch(family, model, tokenizer, spec, range(1, 5), "cpu", decode="reference")
    fast = Sampler(family, model, tokenizer, spec, "cpu")  # the jobs' default: decode "graph"
    assert fast.decode == "graph"
    assert np.array_equal(fast(range(1, 5)), ref)
    assert np.array_equal(fast(range(1, 3), rows=4), ref[:2])  # padded to the batch shape, then dropped


def test_llamagen_bf16_casts_the_weights_and_decodes_in_float32():
    family, model, tokenizer = golden_models("llamagen")
    spec = spec_for(family, model, precision="bf16")
    images = Sampler(family, model, tokenizer, spec, "cpu")(range(3))
    assert model.tok_embeddings.weight.dtype == torch.bfloat16  # official: the GPT cast to bf16
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tokenizer.parameters())
    assert images.dtype == np.uint8 and images.shape[0] == 3
    # deterministic; bf16 kernels round differently with the attention length, so the reference path (all
    # cache slots, masked) need not give the same tokens as the fast one (written prefix) in bf16
    assert np.array_equal(Sampler(family, model, tokenizer, spec, "cpu")(range(3)), images)


def test_var_bf16_autocasts_generation_and_decoding_with_float32_weights(monkeypatch):
    family, model, tokenizer = golden_models("var")
    spec = spec_for(family, model, precision="bf16")
    seen = []
    decode = family.decode
    monkeypatch.setattr(
        family,
        "decode",
        lambda tok, codes: seen.append(torch.get_autocast_dtype("cpu")) or decode(tok, codes),
    )
    images = Sampler(family, model, tokenizer, spec, "cpu")(range(3))
    assert images.dtype == np.uint8 and images.shape[0] == 3
    assert model.head.weight.dtype == torch.float32
    assert model._decoder.caches[0].k.dtype == torch.bfloat16  # attention ran under bf16 autocast
    assert seen and set(seen) == {torch.bfloat16} and torch.is_autocast_enabled("cpu") is False
    fp32 = Sampler(family, model, tokenizer, spec_for(family, model), "cpu")(range(3))
    assert fp32.shape == images.shape


def test_fit_batch_splits_shards_evenly():
    assert fit_batch(10_000, 1000) == 1000  # the whole shard at once
    assert fit_batch(600, 1000) == 500  # two batches of 500
    assert fit_batch(333, 1000) == 250  # four of 250
    assert fit_batch(300, 1001) == 251  # four, the last padded by 3
    assert fit_batch(0, 10) == 1
    assert fit_batch(100_000, 100_000) == 1021 <= AUTO_CAP  # 98 batches of at most AUTO_CAP


@pytest.mark.parametrize("name", ["llamagen", "var"])
def test_auto_batch_size_on_cpu(name, monkeypatch):
    family, model, _ = golden_models(name)
    spec = spec_for(family, model)
    batch = auto_batch_size(model, spec, "cpu", shard_size=1000)
    assert batch == 63  # 1000 = 16 batches of at most CPU_AUTO = 64 -> 63 rows each (the last one padded)
    assert auto_batch_size(model, spec, "cpu", shard_size=3) == 3
    monkeypatch.setattr("ccalign.sample.batch.free_memory", lambda device: 0)  # unknown RAM: still a batch
    assert 1 <= auto_batch_size(model, spec, "cpu", shard_size=1000) <= CPU_AUTO


def test_memory_per_row_counts_the_kv_cache():
    model = tiny_llamagen()
    free = model.sampling_bytes_per_row(1.0)
    assert model.sampling_bytes_per_row(2.0) == 2 * free - 16 * 12  # CFG doubles the rows
    assert model.sampling_bytes_per_row(1.0, torch.bfloat16) < free
    # 2 layers x (k, v) x 2 kv heads x 16 head_dim x 24 slots x 4 bytes
    assert free > 2 * 2 * 2 * 16 * 24 * 4
    var, _ = tiny_var()
    assert var.sampling_bytes_per_row(1.5) > var.sampling_bytes_per_row(0.0)


def test_sample_noise_is_the_per_sample_key():
    rng = sample_noise(3, [4, 9], "cpu")
    other = sample_noise(3, [9], "cpu")
    assert torch.equal(rng.uniform(10, 2)[1], other.uniform(10, 2)[0])
