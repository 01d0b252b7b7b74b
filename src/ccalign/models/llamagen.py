"""LlamaGen class-conditional GPT (c2i), checkpoint-exact, with KV-cached sampling and CFG.

Follows ``autoregressive/models/gpt.py`` and ``autoregressive/models/generate.py`` of
FoundationVision/LlamaGen @ ce98ec4 (the commit thu-ml/CCA pins): same parameter names and shapes, same
numerics, so released and CCA-fine-tuned checkpoints load with ``strict=True`` and reproduce the official
logits.

Sequence layout (block_size = T image tokens on a square grid, one class token):
    position 0      class embedding (row ``num_classes`` = the null class used by CFG)
    position p >= 1 image token z_{p-1}
``model(idx=z[:, :-1], cond_idx=labels, targets=z)`` returns logits (B, T, V) with logits[:, t] predicting
z[:, t], and the mean cross-entropy, exactly as the official fine-tuning call.

Deliberate differences from upstream (see tests/golden/llamagen/README.md):
- the teacher-forcing call works in eval mode too (upstream only slices logits in train mode);
- the KV cache stores n_kv_head heads, so grouped-query attention also works when decoding;
- caches (RoPE table, KV cache, mask) never enter ``state_dict()``; checkpoints containing them still load;
- sampling randomness comes only from explicit noise sources (``ccalign.models.sampling``);
- besides the reference decode loop, a static-shape fast path (``decode="eager" | "graph" | "compile"``) whose
  token steps are captured as CUDA graphs on GPU and attend to the written prefix of the cache only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ccalign.models.graphs import StepRunner, check_decode_mode
from ccalign.models.sampling import Noise, draw_uniform, sample_from_probs
from ccalign.presets import Presets


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs(Presets):
    """Every field of the official ``ModelArgs`` (defaults as upstream)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = n_head (plain multi-head attention)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    caption_dim: int = 2048  # t2i only; kept so every official field round-trips
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row `num_classes`
    model_type: str = "c2i"

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens = (image_size / 16) ** 2
    max_batch_size: int = 32  # upstream bookkeeping; caches here are sized per generate() call
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


# Class-conditional presets of gpt.py (published parameter counts at 256 px, vocab 16384, 1000 classes).
ModelArgs.PRESETS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
}


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32, then back to the input dtype
        xf = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (training only), rescaled by 1/keep."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class LabelEmbedder(nn.Module):
    """Label -> token; row ``num_classes`` is the null class. Labels are dropped only in training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = int(2 * (4 * args.dim) / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, args.multiple_of)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.ffn_dropout = nn.Dropout(args.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv_head, L, head_dim); non-persistent, so never in ``state_dict()``."""

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (S,), k/v (B, n_kv_head, S, head_dim)
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """2-D RoPE table (cls_token_num + grid_size**2, head_dim // 2, 2) of (cos, sin).

    Image token k sits at row k // grid, column k % grid; its head_dim/2 angles are the row angles followed by
    the column angles, each with frequencies 1 / base ** (2i / (head_dim / 2)). The class-token rows are all
    zero (cos = sin = 0), which zeroes the class token's query and key, as upstream.
    """
    half = head_dim // 2
    cpu = torch.device("cpu")  # built on CPU in float32 whatever the default device; moved on first use
    exponents = torch.arange(0, half, 2, device=cpu)[: half // 2].float() / half  # (head_dim/4,)
    freqs = 1.0 / (base**exponents)
    pos = torch.arange(grid_size, device=cpu).float()
    angles = torch.outer(pos, freqs)  # (grid, head_dim/4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (grid rows, grid cols, head_dim/2)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # (grid**2, head_dim/2, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2, device=cpu), table])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: elements (2j, 2j+1) of each head rotate by angle j. x (B, S, H, hd)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, hd/2, 2)
    f = freqs_cis.view(1, xs.shape[1], 1, xs.shape[3], 2)  # (1, S, 1, hd/2, 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        self.n_head = args.n_head
        self.n_kv_head = args.n_kv_head or args.n_head
        self.head_dim = args.head_dim
        # fused projection; output rows = [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]
        self.wqkv = nn.Linear(args.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout_p = args.attn_dropout_p
        self.resid_dropout = nn.Dropout(args.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs_cis, mask=None, input_pos=None, kv_len=None) -> torch.Tensor:
        B, S, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(B, S, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(B, S, self.n_kv_head, self.head_dim), freqs_cis)
        v = v.view(B, S, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, hd)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv_head, L, hd), all cache slots
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # the first kv_len slots (None: all)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # query head h reads kv head h // (n_head / n_kv_head)
        )  # (B, n_head, S, hd)
        y = y.transpose(1, 2).contiguous().view(B, S, self.dim)
        return self.resid_dropout(self.wo(y))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, drop_path: float):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, freqs_cis, mask=None, input_pos=None, kv_len=None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, mask, input_pos, kv_len))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """The c2i GPT (upstream class name ``Transformer``)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        if config.model_type != "c2i":
            raise ValueError(f"only model_type 'c2i' is supported, got {config.model_type!r}")
        if config.cls_token_num != 1:
            raise ValueError("c2i uses one class token; upstream is inconsistent for cls_token_num != 1")
        if config.grid_size**2 != config.block_size:
            raise ValueError(f"block_size {config.block_size} is not a square grid of tokens")
        n_kv = config.n_kv_head or config.n_head
        if config.dim % config.n_head or config.n_head % n_kv:
            raise ValueError(f"need dim % n_head == 0 and n_head % n_kv_head == 0, got {config}")
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        # stochastic-depth rate rising linearly over the layers
        dpr = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, dpr[i]) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # RoPE table: a plain float32 attribute (not a buffer) so dtype casts of the model never touch it
        self.freqs_cis = precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num
        )
        self.register_buffer("causal_mask", None, persistent=False)  # set by setup_caches
        self._decoder: FastDecoder | None = None  # the fast path's buffers and graphs (see generate)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)  # fresh models predict uniform logits, as upstream

    def _rope(self, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    # -- caches

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> None:
        """KV caches for ``batch_size`` sequences (length rounded up to a multiple of 8).

        Caches that already fit are kept (stale slots are masked out and overwritten before they are read),
        so repeated generate() calls reuse the same memory, which also keeps CUDA graphs valid.
        """
        device = torch.device(device or self.tok_embeddings.weight.device)
        dtype = dtype or self.tok_embeddings.weight.dtype
        length = find_multiple(self.config.cls_token_num + self.config.block_size, 8)
        cache = self.layers[0].attention.kv_cache
        k = cache.k_cache if cache is not None else None
        if k is not None and (len(k), k.dtype, k.device) == (batch_size, dtype, device):
            return
        for layer in self.layers:
            a = layer.attention
            layer.attention.kv_cache = KVCache(batch_size, a.n_kv_head, length, a.head_dim, dtype, device)
        self.causal_mask = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
        self._rope(device)

    def clear_caches(self) -> None:
        """Free the KV caches and the fast path's buffers and graphs (generate() keeps them for the next call
        of the same batch size)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None
        self._decoder = None

    def sampling_bytes_per_row(self, guidance: float, dtype: torch.dtype | None = None) -> int:
        """Device memory one sampled image needs beyond the weights (KV cache in ``dtype``, default the
        weights', and the float32 sampling workspace of one step), for sizing batches."""
        c = self.config
        itemsize = (dtype or self.tok_embeddings.weight.dtype).itemsize
        length = find_multiple(c.cls_token_num + c.block_size, 8)
        kv = 2 * c.n_layer * (c.n_kv_head or c.n_head) * c.head_dim * length * itemsize
        workspace = c.vocab_size * 48 + c.dim * 16 * itemsize  # logits, filtered, sorted (+ int64 order), cdf
        return (2 if guidance > 1.0 else 1) * (kv + workspace) + c.block_size * 12  # noise and codes

    # -- forward

    def hidden_states(
        self,
        idx: torch.Tensor | None,
        cond_idx: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states (B, S', dim) that ``output`` maps to the logits of ``forward``
        (same arguments and modes)."""
        if input_pos is None:
            h = torch.cat([self.cls_embedding(cond_idx), self.tok_embeddings(idx)], dim=1)  # (B, 1+S, dim)
            freqs_cis = self._rope(h.device)[: h.shape[1]]
            mask = None
        else:
            h = self.cls_embedding(cond_idx) if cond_idx is not None else self.tok_embeddings(idx)
            freqs_cis = self._rope(h.device)[input_pos]  # (S, hd/2, 2)
            mask = self.causal_mask[input_pos][None, None, :, :kv_len]  # (1, 1, S, kv_len): slots <= pos
        h = self.tok_dropout(h)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask, input_pos, kv_len)
        return self.norm(h)

    def forward(
        self,
        idx: torch.Tensor | None,
        cond_idx: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Two modes (argument order as upstream).

        Full causal pass (``input_pos`` None): idx (B, S) image tokens z_0..z_{S-1} (S <= block_size) and
        cond_idx (B,) labels -> logits (B, S + 1, V), logits[:, t] predicting z_t; loss = mean cross-entropy
        against ``targets`` (B, S + 1) when given.

        Cached decoding (``input_pos`` (S,) sequence positions, caches set up): the class token when
        ``cond_idx`` is given (position 0), else tokens ``idx`` (B, S) -> logits (B, S, V) there. Attention
        reads the first ``kv_len`` cache slots (None: all of them), which must cover every position <= the
        largest of ``input_pos``.
        """
        logits = self.output(self.hidden_states(idx, cond_idx, input_pos, kv_len)).float()  # (B, S', V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    # -- sampling

    @torch.no_grad()
    def generate(
        self,
        cond: torch.Tensor,
        *,
        generator: Noise,
        cfg_scale: float = 1.0,
        cfg_interval: float = -1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        kv_cache: bool = True,
        return_logits: bool = False,
        decode: str = "reference",
    ):
        """Sample block_size tokens per label: cond (B,) -> codes (B, T) int64.

        CFG as upstream: with cfg_scale > 1 the batch runs as [cond; null] and the sampler sees
        uncond + (cond - uncond) * cfg_scale; cfg_scale <= 1 (1.0 = guidance-free) runs the conditional half
        only. The first token is always guided; decode step i (making token i + 1) is guided unless
        cfg_interval > -1 and i > cfg_interval. Token t draws uniform t of its row from ``generator``
        (``draw_uniform(generator, B, T)``, all drawn up front). kv_cache=False recomputes the whole prefix
        every step (for benchmarks). return_logits=True also returns the logits handed to the sampler,
        (B, T, V).

        decode: "reference" is the plain eager loop below; "eager", "graph" and "compile" run the fast path
        (``FastDecoder``: static buffers kept for the next call of the same shape, attention over the
        written prefix, CUDA graphs on GPU; see ``ccalign.models.graphs``), which draws the same noise and,
        in float32 on CPU, the same tokens. It needs the KV cache and does not return logits.
        """
        check_decode_mode(decode)
        was_training = self.training
        self.eval()  # upstream sampling is only valid in eval mode
        B, T, device = cond.shape[0], self.config.block_size, cond.device
        guided = cfg_scale > 1.0
        labels = torch.cat([cond, torch.full_like(cond, self.config.num_classes)]) if guided else cond
        u = draw_uniform(generator, B, T, device)  # (B, T)
        try:
            if decode != "reference":
                if not kv_cache or return_logits:
                    raise ValueError(f"decode={decode!r} needs kv_cache=True and return_logits=False")
                key = (B, guided, cfg_scale, cfg_interval, temperature, top_k, top_p, decode)
                return self._fast_decoder(key).run(labels, u)
            return self._reference_decode(
                labels, u, cfg_scale, cfg_interval, temperature, top_k, top_p, kv_cache, return_logits
            )
        finally:
            self.train(was_training)

    def _reference_decode(
        self, labels, u, cfg_scale, cfg_interval, temperature, top_k, top_p, kv_cache, return_logits
    ):
        """The plain eager decode loop (the reference the fast path is tested against)."""
        (B, T), guided = u.shape, cfg_scale > 1.0
        codes = torch.zeros(B, T, dtype=torch.long, device=u.device)
        step_logits = []
        if kv_cache:
            self.setup_caches(labels.shape[0])
        positions = torch.arange(T + 1, device=u.device)
        for t in range(T):
            if not kv_cache:  # naive: full pass over the class token and all tokens so far
                prefix = torch.cat([codes[:, :t], codes[:, :t]]) if guided else codes[:, :t]
                logits = self(prefix, labels)[0][:, -1]
            elif t == 0:  # prefill: the class token at position 0
                logits = self(None, labels, input_pos=positions[:1])[0][:, -1]
            else:  # token z_{t-1} at position t
                prev = codes[:, t - 1 : t]
                prev = torch.cat([prev, prev]) if guided else prev
                logits = self(prev, None, input_pos=positions[t : t + 1])[0][:, -1]
            if guided:
                logits = mix_cfg(logits, cfg_scale, guided_step(t, cfg_interval))
            if return_logits:
                step_logits.append(logits)
            probs = sampling_probs(logits, temperature, top_k, top_p)
            codes[:, t] = sample_from_probs(probs, u[:, t])
        return (codes, torch.stack(step_logits, dim=1)) if return_logits else codes

    def _fast_decoder(self, key: tuple) -> FastDecoder:
        """The cached decoder for ``key`` (batch, guidance and filters, decode mode); a new one (new buffers
        and graphs) when the key, the weights' dtype or device, or the KV caches changed."""
        d = self._decoder
        weight = self.tok_embeddings.weight
        key = (*key, weight.dtype, weight.device)
        if d is None or d.key != key or not d.caches_current():
            self._decoder = d = None  # free the old buffers and graphs first
            self._decoder = d = FastDecoder(self, key)
        return d


def guided_step(t: int, cfg_interval: float) -> bool:
    """Whether token t is sampled from the CFG mix (upstream: always the first token, then while
    cfg_interval is -1 or the step index t - 1 is at most cfg_interval)."""
    return t == 0 or not (cfg_interval > -1 and t - 1 > cfg_interval)


def mix_cfg(logits: torch.Tensor, cfg_scale: float, guided: bool | torch.Tensor) -> torch.Tensor:
    """[cond; uncond] logits (2B, V) -> uncond + (cond - uncond) * cfg_scale where ``guided`` (a bool, or a
    bool tensor broadcastable to (B, V)), else cond."""
    cond, uncond = logits.chunk(2, dim=0)
    if guided is False:
        return cond
    mixed = uncond + (cond - uncond) * cfg_scale
    return mixed if guided is True else torch.where(guided, mixed, cond)


class FastDecoder:
    """Static-shape decoding of one batch shape and sampling setting: every buffer (labels, noise, codes,
    position, KV caches) is allocated once, and each token step (transformer, CFG mix, temperature /
    top-k / top-p, categorical draw, write of the token, position + 1) is a function of those buffers only,
    without host synchronisation, so ``StepRunner`` can capture it as a CUDA graph.

    Step t attends to the first kv_len(t) cache slots: t + 1 rounded up to a multiple of ``EAGER_BLOCK``
    when run eagerly (exactly the written prefix), of ``ATTN_BLOCK`` when captured (one graph per block
    count; the causal mask hides the unwritten slots), all slots under torch.compile (one compiled graph).
    """

    EAGER_BLOCK = 1
    ATTN_BLOCK = 64

    def __init__(self, model: Transformer, key: tuple):
        B, guided, cfg_scale, cfg_interval, temperature, top_k, top_p, mode, _, device = key
        self.model, self.key = model, key
        T, rows = model.config.block_size, 2 * B if guided else B
        model.setup_caches(rows)
        self.cache0 = model.layers[0].attention.kv_cache.k_cache  # graphs hold the caches' addresses
        self.length = len(self.cache0[0, 0])
        self.runner = StepRunner(device, mode)
        self.block = self.ATTN_BLOCK if self.runner.capture else self.EAGER_BLOCK
        if self.runner.compile:
            self.block = self.length
        self.guided, self.cfg_scale = guided, cfg_scale
        self.filters = (temperature, top_k, top_p)
        self.labels = torch.zeros(rows, dtype=torch.long, device=device)
        self.u = torch.zeros(B, T, device=device)
        self.codes = torch.zeros(B, T, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # position of the step's input token
        self.zero = torch.zeros(1, dtype=torch.long, device=device)
        guide = [guided_step(t, cfg_interval) for t in range(T)]
        self.guide = True if all(guide) else torch.tensor(guide, device=device)  # (T,) per token

    def caches_current(self) -> bool:
        cache = self.model.layers[0].attention.kv_cache
        return cache is not None and cache.k_cache is self.cache0

    def run(self, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """labels (rows,) and uniforms (B, T) -> codes (B, T), a new tensor."""
        self.labels.copy_(labels)
        self.u.copy_(u)
        self.runner("prefill", self._prefill, compile=False)
        for t in range(1, self.u.shape[1]):
            kv_len = min(find_multiple(t + 1, self.block), self.length)
            self.runner(kv_len, partial(self._step, kv_len))
        self.runner.log_capture(f"LlamaGen batch {len(self.labels)}")
        return self.codes.clone()

    def _prefill(self) -> None:
        logits = self.model(None, self.labels, input_pos=self.zero)[0][:, -1]  # (rows, V)
        self._draw(logits, self.zero)
        self.pos.fill_(1)

    def _step(self, kv_len: int) -> None:
        prev = self.codes.index_select(1, self.pos - 1)  # (B, 1) the last token
        prev = torch.cat([prev, prev]) if self.guided else prev
        logits = self.model(prev, None, input_pos=self.pos, kv_len=kv_len)[0][:, -1]  # (rows, V)
        self._draw(logits, self.pos)
        self.pos.add_(1)

    def _draw(self, logits: torch.Tensor, pos: torch.Tensor) -> None:
        """Token ``pos`` of every row from its logits (rows, V), written into ``codes``."""
        if self.guided:
            guide = self.guide if self.guide is True else self.guide.index_select(0, pos)
            logits = mix_cfg(logits, self.cfg_scale, guide)
        probs = sampling_probs(logits, *self.filters)
        token = sample_from_probs(probs, self.u.index_select(1, pos).squeeze(1))  # (B,)
        self.codes.index_copy_(1, pos, token.unsqueeze(1))


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Upstream ``sample()`` filtering: logits (B, V) -> probs (B, V).

    Divide by max(temperature, 1e-5); top-k keeps every logit >= the k-th largest (ties kept); then top-p on
    the top-k-filtered logits removes sorted tokens whose cumulative probability exceeds top_p, keeping the
    first one that crosses it (and always the top token). The input is not modified.
    """
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the first token over the threshold
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return F.softmax(logits, dim=-1)


CACHE_KEY_SUFFIXES = ("freqs_cis", ".kv_cache.k_cache", ".kv_cache.v_cache", "causal_mask")  # never loaded
