"""The LlamaGen family: the c2i GPT (``ccalign.models.llamagen``) over VQ codes
(``ccalign.tokenizers.llamagen_vq``).

Guidance is LlamaGen's ``cfg_scale``: ``logits = uncond + s · (cond − uncond)``, so s = 1 is guidance-free.
Codes are the raster-order grid, (B, T) with T = block_size. The family's facts (class attributes) cost no
import; the model code is imported by the methods that use it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ccalign.models.llamagen import Transformer
    from ccalign.models.sampling import Noise
    from ccalign.tokenizers.llamagen_vq import VQModel


class LlamaGenFamily:
    name = "llamagen"
    guidance_free = 1.0
    # CCA's LlamaGen_sample_ddp.py: no filtering, bf16 weights; kv_cache False = the naive full-pass sampler
    default_sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_interval": -1, "kv_cache": True}
    default_precision = "bf16"
    casts_weights = True  # sample_c2i.py casts the transformer to the precision; the VQ decoder stays fp32
    default_views = {"mode": "tencrop"}  # extract_codes_c2i.py --ten-crop, crop ranges 1.1 and 1.05
    no_decay_keys = ()  # every tensor with ndim < 2, nothing else (the model has no biases)

    # -- models and tokenizers
    def build_model(self, args: dict) -> Transformer:
        from ccalign.models.llamagen import ModelArgs, Transformer

        return Transformer(ModelArgs.from_dict(args))

    def load_model(self, path: str | os.PathLike, args: dict | None = None) -> Transformer:
        """Strict load from any official layout, in eval mode (call ``.train()`` to fine-tune)."""
        from ccalign.models.checkpoint import checkpoint_args, load_weights
        from ccalign.models.llamagen import CACHE_KEY_SUFFIXES, ModelArgs, Transformer

        model = Transformer(checkpoint_args(ModelArgs, path, args))
        return load_weights(model, path, ignore=CACHE_KEY_SUFFIXES).eval()

    def save_model(self, model: Transformer, path: str | os.PathLike) -> None:
        from ccalign.models.checkpoint import save_weights

        save_weights({"model": model.state_dict()}, path, model.config.to_dict())  # what the samplers read

    def build_tokenizer(self, args: dict) -> VQModel:
        from ccalign.tokenizers.llamagen_vq import VQArgs, VQModel

        return VQModel(VQArgs.from_dict(args))

    def load_tokenizer(self, path: str | os.PathLike, args: dict | None = None) -> VQModel:
        from ccalign.models.checkpoint import checkpoint_args, load_weights
        from ccalign.tokenizers.llamagen_vq import VQArgs, VQModel

        return load_weights(VQModel(checkpoint_args(VQArgs, path, args)), path).eval()

    def save_tokenizer(self, tokenizer: VQModel, path: str | os.PathLike) -> None:
        from ccalign.models.checkpoint import save_weights

        save_weights({"model": tokenizer.state_dict()}, path, tokenizer.args.to_dict())

    def tokenizer_loss(self, tokenizer: VQModel, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Pixel MSE + codebook + commitment (+ entropy) loss, for training tiny tokenizers."""
        import torch.nn.functional as F

        recon, _, losses = tokenizer(images)
        rec = F.mse_loss(recon, images)
        loss = rec + sum(losses.values())
        metrics = {"rec": rec.item(), **{k: v.item() for k, v in losses.items()}}
        if tokenizer.args.codebook_show_usage and tokenizer.training:
            metrics["codebook_usage"] = tokenizer.quantize.usage()
        return loss, metrics

    # -- codes
    def codebook_size(self, tokenizer: VQModel) -> int:
        return tokenizer.args.codebook_size

    def encode(self, tokenizer: VQModel, images: torch.Tensor) -> torch.Tensor:
        return tokenizer.encode(images)

    def decode(self, tokenizer: VQModel, codes: torch.Tensor) -> torch.Tensor:
        return tokenizer.decode_codes(codes)

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """CCA's sampler: clamp(127.5 · x + 128, 0, 255), truncated to uint8, channels last."""
        import torch

        return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)

    # -- the model on codes
    def seq_len(self, model: Transformer) -> int:
        return model.config.block_size

    def vocab_size(self, model: Transformer) -> int:
        return model.config.vocab_size

    def num_classes(self, model: Transformer) -> int:
        return model.config.num_classes

    def logits(
        self, model: Transformer, tokenizer: VQModel, labels: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """Teacher forcing as the official fine-tuning call: (B, T, V), logits[:, t] predicts codes[:, t]."""
        return model(codes[:, :-1], labels)[0]

    def hidden(
        self, model: Transformer, tokenizer: VQModel, labels: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Teacher forcing up to the head: (hidden (B, T, dim), head weight (V, dim), no bias), with
        ``F.linear(hidden, weight)`` the logits of ``logits`` (for the fused log-probability)."""
        return model.hidden_states(codes[:, :-1], labels), model.output.weight, None

    def generate(
        self,
        model: Transformer,
        tokenizer: VQModel,
        labels: torch.Tensor,
        *,
        guidance: float,
        sampling: dict,
        generator: Noise,
        decode: str = "reference",
    ) -> torch.Tensor:
        """Codes (B, T); ``sampling`` overrides :attr:`default_sampling`; ``decode``: the path of
        ``Transformer.generate`` (the eager reference, or the fast eager / CUDA-graph / compiled decoder)."""
        unknown = sorted(set(sampling) - set(self.default_sampling))
        if unknown:
            known = sorted(self.default_sampling)
            raise ValueError(f"unknown LlamaGen sampling options {unknown}; known: {known}")
        opts = {**self.default_sampling, **sampling}
        return model.generate(labels, generator=generator, cfg_scale=guidance, decode=decode, **opts)


FAMILY = LlamaGenFamily()
