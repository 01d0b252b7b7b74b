"""The VAR family: next-scale prediction (``ccalign.models.var``) over multi-scale VQVAE codes
(``ccalign.tokenizers.var_vqvae``).

Guidance is VAR's ``cfg``, ramped linearly over scales; cfg = 0 is guidance-free. Codes are flat (B, L), the
scales concatenated coarsest first (L = Σ pn², 680 at 256 px). The family's facts (class attributes) cost
no import; the model code is imported by the methods that use it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from ccalign.models.sampling import Noise
    from ccalign.models.var import VAR
    from ccalign.tokenizers.var_vqvae import VQVAE


class VARFamily:
    name = "var"
    guidance_free = 0.0
    default_sampling = {"top_k": 900, "top_p": 0.96, "more_smooth": False, "kv_cache": True}  # sample.py
    default_precision = "fp16"  # VAR's sampler: fp16 autocast, VAE decode included
    casts_weights = False
    default_views = {"mode": "random", "count": 1}  # VAR's training augmentation: one random crop per image
    # Beyond every tensor with ndim < 2: utils/lr_control.filter_params with the name fragments VAR/train.py
    # and CCA's VAR_finetune.py pass to it.
    no_decay_keys = (
        "bias",
        "cls_token",
        "start_token",
        "task_token",
        "cfg_uncond",
        "pos_embed",
        "pos_1LC",
        "pos_start",
        "start_pos",
        "lvl_embed",
        "gamma",
        "beta",
        "ada_gss",
        "moe_bias",
        "scale_mul",
    )

    # -- models and tokenizers
    def build_model(self, args: dict) -> VAR:
        from ccalign.models.var import VAR, VARConfig

        return VAR(VARConfig.from_dict(args))

    def load_model(self, path: str | os.PathLike, args: dict | None = None) -> VAR:
        from ccalign.models.checkpoint import checkpoint_args, load_weights
        from ccalign.models.var import VAR, VARConfig

        model = VAR(checkpoint_args(VARConfig, path, args))
        return load_weights(model, path, inner="var_wo_ddp").eval()

    def save_model(self, model: VAR, path: str | os.PathLike) -> None:
        """A raw state dict, like the released var_d*.pth; the arguments go beside it."""
        from ccalign.models.checkpoint import save_weights

        save_weights({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, model.cfg.to_dict())

    def build_tokenizer(self, args: dict) -> VQVAE:
        from ccalign.tokenizers.var_vqvae import VQVAE, VQVAEConfig

        return VQVAE(VQVAEConfig.from_dict(args))

    def load_tokenizer(self, path: str | os.PathLike, args: dict | None = None) -> VQVAE:
        """Strict load into eval mode with frozen parameters. As in the official loader, a stored
        `quantize.ema_vocab_hit_SV` (usage statistics, unused by any forward) with another scale count
        is ignored."""
        from ccalign.io import load_torch
        from ccalign.models.checkpoint import checkpoint_args, load_state_dict_strict, unwrap_state_dict
        from ccalign.tokenizers.var_vqvae import VQVAE, VQVAEConfig

        tokenizer = VQVAE(checkpoint_args(VQVAEConfig, path, args))
        sd = dict(unwrap_state_dict(load_torch(path), path, "vae_local"))
        own = tokenizer.quantize.ema_vocab_hit_SV
        key = "quantize.ema_vocab_hit_SV"
        if key in sd and sd[key].shape[0] != own.shape[0]:
            sd[key] = own
        load_state_dict_strict(tokenizer, sd, path)
        return tokenizer.eval().requires_grad_(False)

    def save_tokenizer(self, tokenizer: VQVAE, path: str | os.PathLike) -> None:
        from ccalign.models.checkpoint import save_weights

        state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
        save_weights(state, path, tokenizer.cfg.to_dict())

    def tokenizer_loss(self, tokenizer: VQVAE, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        from ccalign.tokenizers.var_vqvae import tokenizer_loss

        return tokenizer_loss(tokenizer, images)

    # -- codes
    def codebook_size(self, tokenizer: VQVAE) -> int:
        return tokenizer.cfg.vocab_size

    def encode(self, tokenizer: VQVAE, images: Tensor) -> Tensor:
        import torch

        return torch.cat(tokenizer.encode(images), dim=1)  # (B, L)

    def decode(self, tokenizer: VQVAE, codes: Tensor) -> Tensor:
        return tokenizer.decode_codes(tokenizer.split_codes(codes))

    def to_uint8(self, images: Tensor) -> Tensor:
        """VAR's sampler: the decoder's [-1, 1] output -> (x + 1) · 0.5 · 255, truncated to uint8."""
        import torch

        return images.clamp(-1, 1).add(1).mul(0.5).permute(0, 2, 3, 1).mul(255).to(torch.uint8)

    # -- the model on codes
    def seq_len(self, model: VAR) -> int:
        return model.L

    def vocab_size(self, model: VAR) -> int:
        return model.cfg.V

    def num_classes(self, model: VAR) -> int:
        return model.num_classes

    def logits(self, model: VAR, tokenizer: VQVAE, labels: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forcing logits (B, L, V); logits[:, t] predicts codes[:, t]."""
        return model(labels, self._inputs(model, tokenizer, codes))

    def hidden(
        self, model: VAR, tokenizer: VQVAE, labels: Tensor, codes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher forcing up to the head: (hidden (B, L, C), head weight (V, C), head bias (V,)), with
        ``F.linear(hidden, weight, bias)`` the logits of ``logits`` (for the fused log-probability)."""
        hidden = model.hidden_states(labels, self._inputs(model, tokenizer, codes))
        return hidden, model.head.weight, model.head.bias

    @staticmethod
    def _inputs(model: VAR, tokenizer: VQVAE, codes: Tensor) -> Tensor:
        """The teacher-forcing inputs (B, L - first_l, Cvae) of flat codes (B, L)."""
        import torch

        model.check_tokenizer(tokenizer)
        with torch.no_grad():
            return tokenizer.codes_to_var_input(tokenizer.split_codes(codes))

    def generate(
        self,
        model: VAR,
        tokenizer: VQVAE,
        labels: Tensor,
        *,
        guidance: float,
        sampling: dict,
        generator: Noise,
        decode: str = "reference",
    ) -> Tensor:
        """Codes (B, L); ``sampling`` overrides :attr:`default_sampling`; ``decode``: see ``VAR.generate``."""
        unknown = sorted(set(sampling) - set(self.default_sampling))
        if unknown:
            raise ValueError(
                f"unknown VAR sampling options {unknown}; known: {sorted(self.default_sampling)}"
            )
        import torch

        opts = {**self.default_sampling, **sampling}
        codes, _ = model.generate(tokenizer, labels, generator=generator, cfg=guidance, decode=decode, **opts)
        return torch.cat(codes, dim=1)


FAMILY = VARFamily()
