"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8) and its image preprocessing.

Parameter names, shapes and numerics follow the official ``tokenizer/tokenizer_image/vq_model.py`` of
FoundationVision/LlamaGen @ ce98ec4, so released checkpoints (e.g. ``vq_ds16_c2i.pt``) load with
``strict=True``. Deliberate difference: the encoder/decoder base channel count ``ch`` is a constructor
argument (upstream hard-codes 128), so tiny tokenizers can be built and trained.

Code layout: ``encode(images)`` gives (B, h*w) int64 indices in row-major (h, w) order, exactly the indices
``extract_codes_c2i.py`` stores for one image; ``decode_codes`` is the inverse used by the samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ccalign.presets import Presets


@dataclass
class VQArgs(Presets):
    """Every field of the official VQ ``ModelArgs`` plus the base channel count ``ch``."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # adds the 65536-long `quantize.codebook_used` buffer
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128  # encoder/decoder base channels; upstream always uses 128


# Official presets (vq_model.py: VQ_8, VQ_16). downsample factor = 2 ** (len(ch_mult) - 1).
VQArgs.PRESETS = {
    "VQ-16": dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),
}

CODEBOOK_USAGE_WINDOW = 65536  # length of the official `codebook_used` buffer, independent of codebook_size


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 projection of the shortcut only when the channel count changes
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)  # (b, hw, c)
        k = k.reshape(b, c, h * w)  # (b, c, hw)
        att = torch.bmm(q, k) * (int(c) ** (-0.5))  # (b, hw_q, hw_k)
        att = F.softmax(att, dim=2)
        v = v.reshape(b, c, h * w)
        out = torch.bmm(v, att.permute(0, 2, 1)).reshape(b, c, h, w)  # (b, c, hw_q)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, attention after each (only at the lowest resolution), resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, attn: bool, dropout: float):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_res):
            self.res.append(ResnetBlock(in_ch, out_ch, dropout))
            in_ch = out_ch
            if attn:
                self.attn.append(AttnBlock(out_ch))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid(ch: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout)])


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, dropout: float, num_res_blocks: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = [1, *ch_mult]
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            level = Level(ch * in_mult[i], ch * mult, num_res_blocks, attn=last, dropout=dropout)
            if not last:
                level.downsample = Downsample(ch * mult)
            self.conv_blocks.append(level)
        block_ch = ch * ch_mult[-1]
        self.mid = _mid(block_ch, dropout)
        self.norm_out = _norm(block_ch)
        self.conv_out = nn.Conv2d(block_ch, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder. ``conv_blocks.0`` is the LOWEST resolution (levels built in reverse)."""

    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, dropout: float, num_res_blocks: int = 2):
        super().__init__()
        block_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_ch, 3, padding=1)
        self.mid = _mid(block_ch, dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            out_ch = ch * ch_mult[i]
            level = Level(block_ch, out_ch, num_res_blocks + 1, attn=i == len(ch_mult) - 1, dropout=dropout)
            if i != 0:
                level.upsample = Upsample(out_ch)
            self.conv_blocks.append(level)
            block_ch = out_ch
        self.norm_out = _norm(block_ch)
        self.conv_out = nn.Conv2d(block_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus batch-average entropy of softmax(affinity / temperature) (upstream form)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantizer; with ``l2_norm`` latents and rows are unit-normalised at use time."""

    def __init__(self, args: VQArgs):
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(args.codebook_size, args.codebook_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / args.codebook_size, 1.0 / args.codebook_size)
        if args.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if args.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight  # (n_e, e_dim), stored unnormalised
        return F.normalize(w, p=2, dim=-1) if self.args.codebook_l2_norm else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, C, h, w) -> straight-through z_q (B, C, h, w), indices (B, h, w), losses."""
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)
        flat = z.view(-1, self.args.codebook_embed_dim)
        emb = self.codebook()
        if self.args.codebook_l2_norm:
            z = F.normalize(z, p=2, dim=-1)
            flat = F.normalize(flat, p=2, dim=-1)
        # squared distance |z|^2 + |e|^2 - 2 z.e; argmin keeps the first index on ties
        d = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(emb**2, dim=1) - 2 * (flat @ emb.t())
        indices = torch.argmin(d, dim=1)  # (B*h*w,)
        z_q = emb[indices].view(z.shape)
        losses = {
            "vq": torch.mean((z_q - z.detach()) ** 2),
            "commit": self.args.commit_loss_beta * torch.mean((z_q.detach() - z) ** 2),
        }
        if self.args.entropy_loss_ratio > 0:
            losses["entropy"] = self.args.entropy_loss_ratio * _entropy_loss(-d)
        if self.training and self.args.codebook_show_usage:
            self._record_usage(indices)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2), indices.view(z.shape[:3]), losses

    @torch.no_grad()
    def _record_usage(self, indices: torch.Tensor) -> None:
        """Slide the most recent code indices into the ``codebook_used`` window (training only)."""
        recent = indices[-CODEBOOK_USAGE_WINDOW:].float()
        n = recent.shape[0]
        self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = recent

    def usage(self) -> float:
        """Fraction of codebook rows seen in the usage window."""
        return len(torch.unique(self.codebook_used)) / self.args.codebook_size

    def lookup(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """codes (B, h*w) -> codebook rows as a latent (B, C, h, w)."""
        z_q = self.codebook()[codes]  # (B, h*w, C)
        return z_q.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (official key names)."""

    def __init__(self, args: VQArgs):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args.ch, args.encoder_ch_mult, args.z_channels, args.dropout_p)
        self.decoder = Decoder(args.ch, args.decoder_ch_mult, args.z_channels, args.dropout_p)
        self.quantize = VectorQuantizer(args)
        self.quant_conv = nn.Conv2d(args.z_channels, args.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(args.codebook_embed_dim, args.z_channels, 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.args.encoder_ch_mult) - 1)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> unquantised latent (B, codebook_embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction (B, 3, H, W), code indices (B, h, w) and quantizer losses."""
        z_q, indices, losses = self.quantize(self.encode_latent(images))
        return self.decode_latent(z_q), indices, losses

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, h*w) int64, row-major over the latent grid."""
        _, indices, _ = self.quantize(self.encode_latent(images))
        return indices.flatten(1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """codes (B, h*w) -> images (B, 3, H, W) in about [-1, 1]; a square grid unless ``grid`` is given."""
        codes = codes.long()
        if grid is None:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} codes do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        return self.decode_latent(self.quantize.lookup(codes, *grid))
