"""VAR's multi-scale residual VQVAE (the `vae_ch160v4096z32.pth` tokenizer), checkpoint-compatible.

Reference: FoundationVision/VAR @ 78b9539 (models/vqvae.py, models/quant.py, models/basic_vae.py).
Module and parameter names follow the official state dict, and the quantiser repeats the official float
computation: nearest code by ||z||² + ||e||² - 2 z·e in float32 (first index on ties), area downsampling,
bicubic upsampling, and the φ conv picked per scale by a float64 argmin over "ticks" (two of the ten
default scales are exact ties in real arithmetic that only float64 rounding decides).

Token layout: scale si holds patch_nums[si]² codes in row-major (h, w) order; `encode` returns one (B, pn²)
tensor per scale, coarsest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ccalign.presets import Presets


@dataclass
class VQVAEConfig(Presets):
    vocab_size: int = 4096  # V
    z_channels: int = 32  # Cvae, the latent / code dimension
    ch: int = 160  # base channel count of encoder and decoder
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per level; downsample factor 2**(len - 1)
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    dropout: float = 0.0
    beta: float = 0.25  # commitment weight of the training loss
    using_znorm: bool = False  # nearest code by cosine instead of Euclidean distance
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # φ(h) = (1 - r)·h + r·conv(h)
    share_quant_resi: int = 4  # number of φ convs (0: one per scale, 1: a single shared one)
    default_qresi_counts: int = 0  # with share_quant_resi = 0: φ count, 0 means len(v_patch_nums)
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map side per scale
    using_sa: bool = True  # self-attention at the lowest resolution level
    using_mid_sa: bool = True  # self-attention in the middle block
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.v_patch_nums = tuple(self.v_patch_nums)
        if len(self.v_patch_nums) < 2:
            raise ValueError(f"VQVAE needs at least two scales, got v_patch_nums={self.v_patch_nums}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.v_patch_nums[-1] * self.downsample


VQVAEConfig.PRESETS = {
    # the tokenizer released with VAR (huggingface.co/FoundationVision/var, 256 px, 680 tokens)
    "vae_ch160v4096z32": dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q|k|v from one 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        w = torch.bmm(q.transpose(1, 2), k).mul(C**-0.5).softmax(dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)  # (B, C, HW_q)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # zero-pad right and bottom only


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, each optionally followed by attention, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)  # "downsample" / "upsample", as in the official keys

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.resample_name is None else getattr(self, self.resample_name)(h)


class Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, using_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks = [
                ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)
            ]
            attn = [AttnBlock(c_out) for _ in blocks] if (i == n - 1 and cfg.using_sa) else []
            down = Downsample2x(c_out) if i != n - 1 else None
            self.down.append(Level(blocks, attn, down, "downsample"))
            c_in = c_out
        self.mid = Mid(c_in, cfg.dropout, cfg.using_mid_sa)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, Cvae, H/16, W/16)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in, cfg.dropout, cfg.using_mid_sa)
        levels = []  # built coarsest first, stored by level index (up.0 is applied last)
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [
                ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout)
                for j in range(cfg.num_res_blocks + 1)
            ]
            attn = [AttnBlock(c_out) for _ in blocks] if (i == n - 1 and cfg.using_sa) else []
            up = Upsample2x(c_out) if i != 0 else None
            levels.insert(0, Level(blocks, attn, up, "upsample"))
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # (B, Cvae, h, w) -> (B, 3, 16h, 16w)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """φ(h) = (1 - r)·h + r·conv3x3(h), the residual refinement applied to each upsampled scale."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class PhiBank(nn.Module):
    """The φ convs and the per-scale choice among them.

    Official key layouts: `quant_resi.qresi` (one shared φ), `quant_resi.qresi_ls.{k}` (K partially shared φ,
    the released tokenizer uses K = 4) or `quant_resi.{k}` (one per scale). Scale si of S uses
    φ_k with k = argmin_k |ticks_k - si/(S-1)|, computed in float64 with numpy's first-minimum rule.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        S = len(cfg.v_patch_nums)
        if cfg.share_quant_resi == 1:
            K = 1
        elif cfg.share_quant_resi == 0:
            K = cfg.default_qresi_counts or S
        else:
            K = cfg.share_quant_resi
        phis = [
            Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()
            for _ in range(K)
        ]
        self.share = cfg.share_quant_resi
        if self.share == 1:
            self.qresi = phis[0]
        elif self.share == 0:
            for k, phi in enumerate(phis):
                self.add_module(str(k), phi)
        else:
            self.qresi_ls = nn.ModuleList(phis)
        if K == 1:
            self.index_per_scale = tuple(0 for _ in range(S))
        else:
            edge = 1 / 3 / K if K == 4 else 1 / 2 / K
            ticks = np.linspace(edge, 1 - edge, K)  # float64, exactly as the official code builds them
            self.index_per_scale = tuple(int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S))

    def forward(self, h: Tensor, si: int) -> Tensor:
        k = self.index_per_scale[si]
        if self.share == 1:
            return self.qresi(h)
        return getattr(self, str(k))(h) if self.share == 0 else self.qresi_ls[k](h)


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over the scales of `v_patch_nums` (VAR's VectorQuantizer2)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.v_patch_nums
        S, V = len(cfg.v_patch_nums), cfg.vocab_size
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(S, V))  # code-usage statistics, unused here
        self.quant_resi = PhiBank(cfg)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def nearest(self, z_NC: Tensor) -> Tensor:  # (N, C) -> (N,) code indices
        e_VC = self.embedding.weight.detach()
        if self.cfg.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(e_VC.T, dim=0), dim=1)
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(e_VC.square(), dim=1)
        d_NV = torch.addmm(d_NV, z_NC, e_VC.T, beta=1, alpha=-2)
        return torch.argmin(d_NV, dim=1)

    def upsampled(self, codes: Tensor, si: int, size: int) -> Tensor:
        """φ(bicubic(codebook[codes])) on the full latent grid; codes (B, pn²) -> (B, Cvae, size, size)."""
        h = self.code_map(codes, si)
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(size, size), mode="bicubic")
        return self.quant_resi(h, si)

    def code_map(self, codes: Tensor, si: int) -> Tensor:  # (B, pn²) -> (B, Cvae, pn, pn)
        pn = self.patch_nums[si]
        return self.embedding(codes).transpose(1, 2).reshape(codes.shape[0], -1, pn, pn)

    def f_to_codes(self, f: Tensor) -> list[Tensor]:
        """Quantise the encoder feature f (B, Cvae, H, W) scale by scale; returns [(B, pn²)] per scale."""
        B, C, H, W = f.shape
        if self.patch_nums[-1] != H or H != W:
            raise ValueError(f"feature map {H}x{W} does not match the last scale {self.patch_nums[-1]}")
        f_rest, codes = f.detach(), []
        with torch.no_grad():
            for si, pn in enumerate(self.patch_nums):
                last = si == len(self.patch_nums) - 1
                z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
                idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
                f_rest = f_rest - self.upsampled(idx, si, H)
                codes.append(idx)
        return codes

    def codes_to_fhat(self, codes: list[Tensor], every_scale: bool = False) -> Tensor | list[Tensor]:
        """Σ_si φ(up(codebook[codes_si])) as (B, Cvae, H, W), or the running sums after every scale."""
        H = self.patch_nums[-1]
        f_hat, out = None, []
        for si, idx in enumerate(codes):
            h = self.upsampled(idx, si, H)
            f_hat = h if f_hat is None else f_hat + h
            out.append(f_hat)
        return out if every_scale else f_hat

    def next_input(self, si: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale si's code map (B, Cvae, pn, pn) to f_hat -> (f_hat, area-downsampled next input)."""
        S, H = len(self.patch_nums), self.patch_nums[-1]
        if si != S - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        f_hat = f_hat + self.quant_resi(h_BChw, si)
        if si == S - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    def codes_to_var_input(self, codes: list[Tensor]) -> Tensor:
        """VAR's teacher-forcing input (B, L - pn₀², Cvae): scale si ≥ 1 gets the area-downsampled
        Σ_{j<si} φ(up(codes_j))."""
        B, C, H = codes[0].shape[0], self.cfg.z_channels, self.patch_nums[-1]
        f_hat = torch.zeros(B, C, H, H, device=codes[0].device)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            f_hat, nxt = self.next_input(si, f_hat, self.code_map(codes[si], si))
            next_scales.append(nxt.view(B, C, -1).transpose(1, 2))  # (B, pn_{si+1}², C)
        return torch.cat(next_scales, dim=1)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training path -> (straight-through f_hat, VQ loss, codes); the loss is codebook + β·commitment,
        averaged over scales."""
        codes = self.f_to_codes(f)
        f_hat = self.codes_to_fhat(codes, every_scale=True)  # gradients reach the codebook and the φ convs
        f_detached = f.detach()
        vq_loss = sum(F.mse_loss(fh, f_detached) + self.cfg.beta * F.mse_loss(fh.detach(), f) for fh in f_hat)
        vq_loss = vq_loss / len(f_hat)
        f_st = f + (f_hat[-1] - f).detach()  # straight-through: decoder gradients reach the encoder
        return f_st, vq_loss, codes


class VQVAE(nn.Module):
    """Encoder, multi-scale quantiser and decoder with the official state-dict layout."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        pad = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.v_patch_nums

    @property
    def phi_index_per_scale(self) -> tuple[int, ...]:
        return self.quantize.quant_resi.index_per_scale

    def features(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> f (B, Cvae, H/16, W/16)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale codes [(B, pn²)] (int64), coarsest first."""
        return self.quantize.f_to_codes(self.features(images))

    def codes_to_var_input(self, codes: list[Tensor]) -> Tensor:
        return self.quantize.codes_to_var_input(codes)

    def codes_to_fhat(self, codes: list[Tensor], every_scale: bool = False) -> Tensor | list[Tensor]:
        return self.quantize.codes_to_fhat(codes, every_scale)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:  # (B, Cvae, h, w) -> images in [-1, 1]
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode_codes(self, codes: list[Tensor]) -> Tensor:
        """Per-scale codes -> images (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.codes_to_fhat(codes))

    def split_codes(self, codes_BL: Tensor) -> list[Tensor]:
        """Flat codes (B, Σ pn²) -> per-scale list."""
        sizes = [pn * pn for pn in self.patch_nums]
        if codes_BL.shape[1] != sum(sizes):
            raise ValueError(
                f"expected {sum(sizes)} codes per image (patch_nums {self.patch_nums}), "
                f"got {codes_BL.shape[1]}"
            )
        return list(codes_BL.split(sizes, dim=1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: (reconstruction without clamping, VQ loss)."""
        f_st, vq_loss, _ = self.quantize(self.features(images))
        return self.decoder(self.post_quant_conv(f_st)), vq_loss


def tokenizer_loss(tokenizer: VQVAE, images: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction (MSE + L1) plus the VQ loss, for training small tokenizers from scratch."""
    rec, vq_loss = tokenizer(images)
    mse = F.mse_loss(rec, images)
    l1 = F.l1_loss(rec, images)
    loss = mse + l1 + vq_loss
    metrics = {"loss": loss.item(), "rec_mse": mse.item(), "rec_l1": l1.item(), "vq_loss": vq_loss.item()}
    return loss, metrics
