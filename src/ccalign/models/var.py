"""VAR: class-conditional next-scale prediction, identical in parameters and numerics to the official model.

Reference: FoundationVision/VAR @ 78b9539 (models/var.py, models/basic_var.py, models/helpers.py); checkpoints
from there and from thu-ml/CCA (VAR_finetune.py) load unchanged.

A sequence is L = Σ pn² tokens, scale by scale (row-major inside a scale). Position p's logits predict
token p itself (no shift): the first scale's input is the class token, the input of scale si ≥ 1 is the
area-downsampled sum of the upsampled coarser scales (`VQVAE.codes_to_var_input`). Attention is
block-causal: a token sees every token of its own and coarser scales. The class embedding (row
`num_classes` is the unconditional "null" class) also conditions every block through AdaLN.

Deliberate differences from the official code: class dropout only in training mode (the official forward drops
labels in eval too); the reference decode keeps its KV cache in a local of `generate`; randomness comes only
from explicit noise sources (`ccalign.models.sampling`). Besides the reference loop, a fast path
(`decode="eager" | "graph" | "compile"`) runs the same scale loop on preallocated caches and buffers,
captured as one CUDA graph per batch shape on GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ccalign.models.graphs import StepRunner, check_decode_mode
from ccalign.models.sampling import Noise, draw_uniform, sample_from_probs
from ccalign.presets import Presets
from ccalign.tokenizers.var_vqvae import VQVAE

MAX_SCALE_MUL = math.log(100)  # clamp of the log attention temperature (as float32: 4.605170249938965)


@dataclass
class VARConfig(Presets):
    depth: int = 16
    embed_dim: int | None = None  # C; None -> 64·depth
    num_heads: int | None = None  # None -> depth (head_dim 64)
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class_emb has num_classes + 1 rows; the last is the unconditional class
    V: int = 4096  # codebook size of the tokenizer
    Cvae: int = 32  # code dimension of the tokenizer
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map side per scale (256 px)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None  # None -> 0.1·depth/24, as the official builder sets it
    norm_eps: float = 1e-6
    shared_aln: bool = False  # one AdaLN projection shared by all blocks (d36-s)
    cond_drop_rate: float = 0.1  # probability of replacing the label by the null class (training only)
    attn_l2_norm: bool = True  # cosine attention with a learned, clamped per-head temperature

    def __post_init__(self) -> None:
        self.patch_nums = tuple(self.patch_nums)
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.patch_nums) < 2:
            raise ValueError(f"VAR needs at least two scales, got patch_nums={self.patch_nums}")

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


# Released ImageNet models (huggingface.co/FoundationVision/var). Width 64·depth, heads = depth, the
# vae_ch160v4096z32 tokenizer; d36 is the 512 px model with shared AdaLN ("d36-s").
_PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
_PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VARConfig.PRESETS = {
    "d16": dict(depth=16, num_classes=1000, V=4096, Cvae=32, patch_nums=_PN_256),  # 310M
    "d20": dict(depth=20, num_classes=1000, V=4096, Cvae=32, patch_nums=_PN_256),  # 600M
    "d24": dict(depth=24, num_classes=1000, V=4096, Cvae=32, patch_nums=_PN_256),  # 1.0B
    "d30": dict(depth=30, num_classes=1000, V=4096, Cvae=32, patch_nums=_PN_256),  # 2.0B
    "d36": dict(depth=36, num_classes=1000, V=4096, Cvae=32, patch_nums=_PN_512, shared_aln=True),  # 2.3B
}
PUBLISHED_PARAMS = {"d16": 310e6, "d20": 600e6, "d24": 1.0e9, "d30": 2.0e9, "d36": 2.3e9}


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class KVCache:
    """Keys and values (B, H, l, hd) of all tokens generated so far, for one attention layer."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


class StaticKVCache:
    """``KVCache`` in preallocated (B, H, L, hd) buffers: ``extend`` writes the next slots in place and
    returns the written prefix, so every scale's step has fixed shapes and addresses (CUDA-graph friendly).
    The buffers take the dtype of the first keys and values written; ``rewind`` starts a new sequence."""

    def __init__(self, length: int) -> None:
        self.length, self.end = length, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def rewind(self) -> None:
        self.end = 0

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.length, hd)
            self.v = v.new_empty(B, H, self.length, hd)
        start, self.end = self.end, self.end + k.shape[2]
        self.k[:, :, start : self.end].copy_(k)
        self.v[:, :, start : self.end].copy_(v)
        return self.k[:, :, : self.end], self.v[:, :, : self.end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.attn_l2_norm = cfg.attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1.0  # the temperature lives in scale_mul_1H11
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # the key bias: stored and used, never trained
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        self.attn_drop = cfg.attn_drop_rate

    def forward(
        self, x: Tensor, attn_bias: Tensor | None, cache: KVCache | StaticKVCache | None = None
    ) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(k, v)  # attend to every cached token: no mask needed at inference
        q = q.to(v.dtype)  # the float32 temperature promotes q under autocast
        if attn_bias is not None:
            attn_bias = attn_bias.to(v.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=self.scale
        )
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        hidden = round(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class AdaLNBlock(nn.Module):
    """x += γ1·Attn(LN(x)·(1+s1)+β1); x += γ2·FFN(LN(x)·(1+s2)+β2); γ, s, β projected from the class."""

    def __init__(self, cfg: VARConfig, drop_path_rate: float):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.drop_path_rate = C, drop_path_rate
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:  # a per-block offset added to the shared projection of the condition
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(
        self, x: Tensor, cond: Tensor, attn_bias: Tensor | None, cache: KVCache | StaticKVCache | None = None
    ) -> Tensor:
        # cond: (B, C) class embedding, or (B, 1, 6, C) shared AdaLN projection when shared_aln
        ada = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)  # each (B, 1, C)
        h = self.attn(self.ln(x).mul(scale1.add(1)).add(shift1), attn_bias, cache)
        x = x + drop_path(h.mul(gamma1), self.drop_path_rate, self.training)
        h = self.ffn(self.ln(x).mul(scale2.add(1)).add(shift2))
        return x + drop_path(h.mul(gamma2), self.drop_path_rate, self.training)


class AdaLNHead(nn.Module):
    """LN(x)·(1 + scale) + shift, (scale, shift) projected from the class embedding; before the head."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)  # each (B, 1, C)
        return self.ln(x).mul(scale.add(1)).add(shift)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, pns = cfg.embed_dim, cfg.patch_nums
        self.num_classes, self.patch_nums, self.L = cfg.num_classes, pns, cfg.L
        self.first_l = pns[0] ** 2
        self.begin_ends = []  # token range of each scale
        cur = 0
        for pn in pns:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))  # added to the class token(s)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))  # absolute position of every token
        levels = torch.tensor([[si for si, pn in enumerate(pns) for _ in range(pn * pn)]])
        self.register_buffer("lvl_1L", levels)  # (1, L) scale index of each token
        causal = torch.where(levels.view(self.L, 1) >= levels.view(1, self.L), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", causal.view(1, 1, self.L, self.L))  # block-causal

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(pns), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if cfg.shared_aln else None
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # linearly increasing
        self.blocks = nn.ModuleList([AdaLNBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.head_nm = AdaLNHead(cfg)
        self.head = nn.Linear(C, cfg.V)

        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.init_weights()  # every Linear and Embedding
        self._decoder: FastDecoder | None = None  # the fast path's buffers and graph (see generate)

    def init_weights(
        self,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = -1,
    ) -> None:
        """The official initialisation (VAR.init_weights); init_std < 0 means sqrt(1 / 3C)."""
        C = self.cfg.embed_dim
        if init_std < 0:
            init_std = (1 / C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            if init_head >= 0:
                self.head.weight.mul_(init_head)
                self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))
                if block.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * C :].mul_(init_adaln)
                    block.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)
                    block.ada_lin[-1].bias.zero_()

    def block_cond(self, cond_BD: Tensor) -> Tensor:
        """What the blocks receive: the class embedding, or its shared AdaLN projection (B, 1, 6, C)."""
        if self.shared_ada_lin is None:
            return cond_BD
        return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.cfg.embed_dim)

    def head_input(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        """What ``head`` receives: the float32 AdaLN of h, cast to the head weights' dtype."""
        return self.head_nm(h.float(), cond_BD).to(self.head.weight.dtype)

    def get_logits(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        # the head itself in the weights' dtype (or the autocast dtype)
        return self.head(self.head_input(h, cond_BD)).float()

    def forward(self, labels: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        """Teacher forcing: labels (B,), inputs (B, L - first_l, Cvae) -> logits (B, L, V) (see
        ``hidden_states``)."""
        return self.head(self.hidden_states(labels, x_BLCv_wo_first_l)).float()

    def hidden_states(self, labels: Tensor, x_BLCv_wo_first_l: Tensor) -> Tensor:
        """Teacher forcing up to the head: labels (B,), inputs (B, L - first_l, Cvae) -> (B, L, C).

        Labels equal to num_classes are unconditional. In training mode each label is replaced by the null
        class with probability cond_drop_rate (global RNG). Under autocast the embeddings are computed in
        full precision and the blocks get their inputs in the autocast dtype, as in the official trainer.
        """
        B, device = x_BLCv_wo_first_l.shape[0], x_BLCv_wo_first_l.device.type
        with torch.autocast(device, enabled=False):
            if self.training and self.cfg.cond_drop_rate > 0:
                drop = torch.rand(B, device=labels.device) < self.cfg.cond_drop_rate
                labels = torch.where(drop, self.num_classes, labels)
            sos = cond_BD = self.class_emb(labels)  # (B, C)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            words = self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))
            x = torch.cat((sos, words), dim=1)  # (B, L, C)
            x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        cond, attn_bias = self.block_cond(cond_BD), self.attn_bias_for_masking
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, cond, attn_bias = x.to(dtype), cond.to(dtype), attn_bias.to(dtype)
        for block in self.blocks:
            x = block(x, cond, attn_bias)
        return self.head_input(x, cond_BD)

    @torch.no_grad()
    def generate(
        self,
        tokenizer: VQVAE,
        labels: Tensor,
        *,
        generator: Noise,
        cfg: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        kv_cache: bool = True,
        decode: str = "reference",
    ) -> tuple[list[Tensor], Tensor]:
        """Scale-by-scale sampling -> (per-scale codes [(B, pn²)], final latent f_hat (B, Cvae, h, w)).

        Guidance ramps linearly over scales: at scale si, t = cfg·si/(S-1) and the sampled logits are
        (1+t)·cond - t·uncond. cfg = 0 is guidance-free (and then the unconditional half is not computed at
        all). top_k / top_p follow VAR's filters (0 disables). more_smooth: the next scales are conditioned
        on a gumbel-softmax mixture of codes (visualisation only; the returned f_hat reflects it, the codes
        do not). kv_cache=False recomputes all previous scales at every step (for benchmarks).
        Randomness: scale si draws ``draw_uniform(generator, B, pn², step=si)`` for its tokens, then, with
        more_smooth, ``draw_uniform(generator, B, pn²·V, step=si, stream=1)`` for the gumbel noise.

        decode: "reference" is the plain eager loop; "eager", "graph" and "compile" run the fast path
        (``FastDecoder``: the same scale loop on preallocated caches and buffers kept for the next call of
        the same shape, captured as one CUDA graph on GPU; see ``ccalign.models.graphs``), which draws the
        same noise and, in float32 on CPU, gives the same tokens. It needs the KV cache.
        """
        check_decode_mode(decode)
        self.check_tokenizer(tokenizer)
        B, device = labels.shape[0], labels.device
        if decode == "reference":
            caches = [KVCache() for _ in self.blocks] if kv_cache else None

            def noise(si: int, n: int, stream: int) -> Tensor:
                return draw_uniform(generator, B, n, device, step=si, stream=stream)

            return self._decode_scales(tokenizer, labels, cfg, top_k, top_p, more_smooth, caches, noise)
        if not kv_cache:
            raise ValueError(f"decode={decode!r} needs kv_cache=True")
        draws = {}  # drawn up front, in the reference's order (torch generators are consumed in call order)
        for si, pn in enumerate(self.patch_nums):
            draws[si, 0] = draw_uniform(generator, B, pn * pn, device, step=si)
            if more_smooth:
                draws[si, 1] = draw_uniform(generator, B, pn * pn * self.cfg.V, device, step=si, stream=1)
        weight = self.head.weight
        key = (B, cfg, top_k, top_p, more_smooth, decode, id(tokenizer), weight.dtype, weight.device)
        key += (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type),)
        if self._decoder is None or self._decoder.key != key:
            self._decoder = None  # free the old buffers and graph first
            self._decoder = FastDecoder(self, tokenizer, key, draws)
        return self._decoder.run(labels, draws)

    def clear_caches(self) -> None:
        """Free the fast path's buffers and graph (generate() keeps them for the next call of that shape)."""
        self._decoder = None

    def sampling_bytes_per_row(self, guidance: float, dtype: torch.dtype | None = None) -> int:
        """Device memory one sampled image needs beyond the weights (KV cache in ``dtype``, default the
        weights', and the largest scale's activations and float32 sampling workspace), for sizing batches."""
        c = self.cfg
        itemsize = (dtype or self.head.weight.dtype).itemsize
        kv = 2 * c.depth * self.L * c.embed_dim * itemsize
        last = self.patch_nums[-1] ** 2  # tokens of the largest scale
        act = last * c.embed_dim * (4 + 2 * c.mlp_ratio) * itemsize * 2
        workspace = last * c.V * 48  # logits, filtered, sorted (+ int64 order), cdf
        return (2 if guidance != 0 else 1) * (kv + act + workspace) + self.L * 12  # noise and codes

    def _decode_scales(
        self,
        tokenizer: VQVAE,
        labels: Tensor,
        cfg: float,
        top_k: int,
        top_p: float,
        more_smooth: bool,
        caches: list[KVCache] | list[StaticKVCache] | None,
        noise: Callable[[int, int, int], Tensor],
    ) -> tuple[list[Tensor], Tensor]:
        """The scale loop of ``generate``; noise(si, n, stream) gives the (B, n) uniforms of scale si."""
        B, S = labels.shape[0], len(self.patch_nums)
        guided = cfg != 0
        all_labels = torch.cat((labels, torch.full_like(labels, self.num_classes))) if guided else labels
        sos = cond_BD = self.class_emb(all_labels)  # (B or 2B, C)
        cond = self.block_cond(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)
        first = sos.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start.expand(sos.shape[0], -1, -1)
        x = first + lvl_pos[:, : self.first_l]  # tokens of the current scale
        seen: list[Tensor] = []  # without a cache: the input tokens of every scale so far
        H = self.patch_nums[-1]
        f_hat = sos.new_zeros(B, tokenizer.cfg.z_channels, H, H, dtype=torch.float32)
        codes = []
        for si, pn in enumerate(self.patch_nums):
            ratio = si / (S - 1)
            if caches is not None:
                h = x
                for block, cache in zip(self.blocks, caches, strict=True):
                    h = block(h, cond, None, cache)
            else:
                seen.append(x)
                h, end = torch.cat(seen, dim=1), self.begin_ends[si][1]
                for block in self.blocks:
                    h = block(h, cond, self.attn_bias_for_masking[:, :, :end, :end])
                h = h[:, -pn * pn :]
            logits = self.get_logits(h, cond_BD)  # (B or 2B, pn², V)
            if guided:
                t = cfg * ratio
                logits = (1 + t) * logits[:B] - t * logits[B:]
            logits = filter_top_k_top_p(logits, top_k, top_p)
            idx = sample_from_probs(logits.softmax(dim=-1), noise(si, pn * pn, 0))
            codes.append(idx)
            if more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                u = noise(si, pn * pn * self.cfg.V, 1).view(logits.shape)
                emb = gumbel_softmax(logits.mul(1 + ratio), tau, u) @ tokenizer.quantize.embedding.weight
            else:
                emb = tokenizer.quantize.embedding(idx)  # (B, pn², Cvae)
            h_BChw = emb.transpose(1, 2).reshape(B, -1, pn, pn)
            f_hat, next_map = tokenizer.quantize.next_input(si, f_hat, h_BChw)
            if si != S - 1:
                a, b = self.begin_ends[si + 1]
                next_map = next_map.view(B, self.cfg.Cvae, -1).transpose(1, 2)  # (B, pn², Cvae)
                x = self.word_embed(next_map.to(self.word_embed.weight.dtype)) + lvl_pos[:, a:b]
                if guided:
                    x = x.repeat(2, 1, 1)  # the same tokens for the conditional and unconditional halves
        return codes, f_hat

    def check_tokenizer(self, tokenizer: VQVAE) -> None:
        """Fail clearly when the tokenizer's scales, vocabulary or code width differ from the model's."""
        t = tokenizer.cfg
        if (t.v_patch_nums, t.vocab_size, t.z_channels) != (self.patch_nums, self.cfg.V, self.cfg.Cvae):
            raise ValueError(
                f"tokenizer (patch_nums {t.v_patch_nums}, V {t.vocab_size}, Cvae {t.z_channels}) does not "
                f"match VAR (patch_nums {self.patch_nums}, V {self.cfg.V}, Cvae {self.cfg.Cvae})"
            )


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """VAR's filters (not LlamaGen's): logits below the k-th largest value -> -inf (ties at the k-th value
    survive); then, over the ascending-sorted softmax, tokens whose cumulative probability is <= 1 - top_p
    -> -inf, always keeping the most likely token. Returns a new tensor; 0 disables a filter."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits


def gumbel_softmax(logits: Tensor, tau: float, u: Tensor) -> Tensor:
    """Soft gumbel-softmax sample from uniforms u (same shape as logits) instead of a hidden RNG."""
    gumbels = -(-u.clamp_min(torch.finfo(u.dtype).tiny).log()).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


class FastDecoder:
    """Static-shape VAR decoding of one batch shape and sampling setting: labels, noise and KV caches live in
    buffers allocated once, and the whole scale loop (transformer, CFG ramp, top-k / top-p, categorical
    draws, next-scale inputs) reads only those, without host synchronisation, so ``StepRunner`` captures it
    as one CUDA graph whose replay returns the codes and f_hat."""

    def __init__(self, model: VAR, tokenizer: VQVAE, key: tuple, draws: dict[tuple[int, int], Tensor]):
        B, cfg, top_k, top_p, more_smooth, mode, _, _, device, _ = key
        self.model, self.tokenizer, self.key = model, tokenizer, key
        self.options = (cfg, top_k, top_p, more_smooth)
        self.labels = torch.zeros(B, dtype=torch.long, device=device)
        self.draws = {k: torch.zeros_like(u) for k, u in draws.items()}
        self.caches = [StaticKVCache(model.L) for _ in model.blocks]
        self.runner = StepRunner(device, mode)

    def run(self, labels: Tensor, draws: dict[tuple[int, int], Tensor]) -> tuple[list[Tensor], Tensor]:
        self.labels.copy_(labels)
        for k, u in draws.items():
            self.draws[k].copy_(u)
        codes, f_hat = self.runner("scales", self._scales)
        self.runner.log_capture(f"VAR batch {len(self.labels)}")
        return [c.clone() for c in codes], f_hat.clone()

    def _scales(self) -> tuple[list[Tensor], Tensor]:
        for cache in self.caches:
            cache.rewind()
        return self.model._decode_scales(
            self.tokenizer,
            self.labels,
            *self.options,
            self.caches,
            lambda si, n, stream: self.draws[si, stream],
        )
