"""A third model family, only through the ``ccalign.families.Family`` protocol (a test double).

Tokenizer: each 2×2 patch's grey level snapped to the nearest of ``levels`` learned scalars (a scalar VQ).
Model: logits of token t from the class, the position and the previous token (no attention). Guidance as
LlamaGen's: ``uncond + s · (cond − uncond)``, s = 1 guidance-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ccalign.models.checkpoint import checkpoint_args, load_weights, save_weights
from ccalign.models.sampling import Noise, draw_uniform, sample_from_probs
from ccalign.presets import Presets


@dataclass
class TokenizerArgs(Presets):
    levels: int = 8
    patch: int = 2


@dataclass
class ModelArgs(Presets):
    vocab: int = 8
    seq_len: int = 16
    num_classes: int = 10
    dim: int = 16


class Quantizer(nn.Module):
    def __init__(self, levels: int):
        super().__init__()
        self.embedding = nn.Embedding(levels, 1)
        self.embedding.weight.data = torch.linspace(-1, 1, levels)[:, None]


class Tokenizer(nn.Module):
    def __init__(self, args: TokenizerArgs):
        super().__init__()
        self.args, self.quantize = args, Quantizer(args.levels)

    def grey(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, T) patch means
        return F.avg_pool2d(images.mean(1, keepdim=True), self.args.patch).flatten(1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.grey(images)[..., None] - self.quantize.embedding.weight[:, 0]).abs().argmin(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        side = int(codes.shape[1] ** 0.5)
        grey = self.quantize.embedding.weight[codes, 0].view(-1, 1, side, side)
        return F.interpolate(grey, scale_factor=self.args.patch).expand(-1, 3, -1, -1).clamp(-1, 1)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.cls = nn.Embedding(args.num_classes + 1, args.dim)  # row num_classes: the null class
        self.pos = nn.Parameter(torch.zeros(args.seq_len, args.dim))
        self.prev = nn.Embedding(args.vocab + 1, args.dim)  # row vocab: "no previous token"
        self.head = nn.Linear(args.dim, args.vocab)

    def forward(self, labels: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:  # (B,), (B, T) -> (B, T, V)
        return self.head(torch.tanh(self.cls(labels)[:, None] + self.pos[: prev.shape[1]] + self.prev(prev)))

    def shifted(self, codes: torch.Tensor) -> torch.Tensor:
        return F.pad(codes[:, :-1], (1, 0), value=self.args.vocab)


class ToyFamily:
    name = "toy"
    guidance_free = 1.0
    default_sampling: dict = {}
    default_precision = "fp32"
    casts_weights = False
    default_views = {"mode": "shifts", "pad": 1}
    no_decay_keys = ()

    def build_model(self, args: dict) -> Model:
        return Model(ModelArgs.from_dict(args))

    def load_model(self, path: str | os.PathLike, args: dict | None = None) -> Model:
        return load_weights(Model(checkpoint_args(ModelArgs, path, args)), path).eval()

    def save_model(self, model: Model, path: str | os.PathLike) -> None:
        save_weights({"model": model.state_dict()}, path, model.args.to_dict())

    def build_tokenizer(self, args: dict) -> Tokenizer:
        return Tokenizer(TokenizerArgs.from_dict(args))

    def load_tokenizer(self, path: str | os.PathLike, args: dict | None = None) -> Tokenizer:
        return load_weights(Tokenizer(checkpoint_args(TokenizerArgs, path, args)), path).eval()

    def save_tokenizer(self, tokenizer: Tokenizer, path: str | os.PathLike) -> None:
        save_weights({"model": tokenizer.state_dict()}, path, tokenizer.args.to_dict())

    def tokenizer_loss(self, tokenizer: Tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        grey = tokenizer.grey(images)
        nearest = tokenizer.quantize.embedding.weight[tokenizer.encode(images), 0]
        loss = F.mse_loss(nearest, grey)
        return loss, {"rec": loss.item()}

    def codebook_size(self, tokenizer: Tokenizer) -> int:
        return tokenizer.args.levels

    def encode(self, tokenizer: Tokenizer, images: torch.Tensor) -> torch.Tensor:
        return tokenizer.encode(images)

    def decode(self, tokenizer: Tokenizer, codes: torch.Tensor) -> torch.Tensor:
        return tokenizer.decode(codes)

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        return images.add(1).mul(127.5).round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8)

    def seq_len(self, model: Model) -> int:
        return model.args.seq_len

    def vocab_size(self, model: Model) -> int:
        return model.args.vocab

    def num_classes(self, model: Model) -> int:
        return model.args.num_classes

    def logits(self, model: Model, tokenizer, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return model(labels, model.shifted(codes))

    @torch.no_grad()
    def generate(self, model, tokenizer, labels, *, guidance, sampling, generator: Noise, decode="reference"):
        B, T = labels.shape[0], model.args.seq_len
        codes = torch.full((B, T), model.args.vocab, dtype=torch.long, device=labels.device)
        null = torch.full_like(labels, model.args.num_classes)
        for t in range(T):
            prev = model.shifted(codes)[:, : t + 1]
            logits = model(labels, prev)[:, t]
            if guidance != self.guidance_free:
                uncond = model(null, prev)[:, t]
                logits = uncond + guidance * (logits - uncond)
            u = draw_uniform(generator, B, 1, labels.device, step=t)[:, 0]
            codes[:, t] = sample_from_probs(logits.softmax(-1), u)
        return codes


FAMILY = ToyFamily()
