"""Family-independent randomness for sampling: counter-based per-row noise and inverse-CDF categorical draws.

Every random number a sampler uses comes from ``draw_uniform``, from one of two kinds of source:

- ``CounterRNG`` (what the sample stage uses): row b's uniforms are a pure function of (keys[b], step, lane,
  stream), computed with Philox4x32-10 in integer tensor ops on the sampler's device. Nothing is stateful, so
  a sample's noise depends on neither its batch nor the order of draws, the draws can be made before a
  decode loop (or inside a captured CUDA graph) without any host round trip, and they are bit-identical on
  CPU and GPU.
- ``torch.Generator``s (one, or one per row), consumed in call order: the official samplers' kind of noise,
  kept for tests against their outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

M32 = 0xFFFFFFFF
# Philox4x32 multipliers and Weyl key increments (Salmon et al., "Parallel random numbers: as easy as 1, 2,
# 3", SC 2011; the Random123 constants)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit a (int64 tensor) and a 32-bit constant m.

    Computed from 16-bit halves, so every intermediate is below 2**49: no int64 overflow on any device.
    """
    mh, ml = m >> 16, m & 0xFFFF
    ah, al = a >> 16, a & 0xFFFF
    ll, lh, hl, hh = al * ml, al * mh, ah * ml, ah * mh  # each < 2**32
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)  # bits 16.. of the product, < 2**18
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)  # < 2**32 since a * m < 2**64
    return hi, lo


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = PHILOX_ROUNDS):
    """Philox4x32-R: four 32-bit counter words and two key words (int64 tensors of values in [0, 2**32),
    broadcastable) -> four 32-bit output words (int64). Matches Random123's known-answer vectors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:  # bump the key before every round but the first
            k0, k1 = (k0 + PHILOX_W[0]) & M32, (k1 + PHILOX_W[1]) & M32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class CounterRNG:
    """Per-row counter-based uniforms: row b's value at (step, lane, stream) depends only on keys[b].

    keys: one 64-bit integer per row (e.g. ``sample_seed(seed, i)``). The value is the top 24 bits of the
    first word of Philox4x32-10 with key (low, high 32 bits of keys[b]) and counter (lane, step, stream, 0),
    times 2**-24: exactly representable in float32, uniform on {0, 2**-24, ..., 1 - 2**-24}.
    """

    def __init__(self, keys: Sequence[int], device: torch.device | str = "cpu"):
        keys = [int(k) for k in keys]
        if any(not 0 <= k < 2**64 for k in keys):
            raise ValueError("CounterRNG keys must be integers in [0, 2**64)")
        words = torch.tensor([[k & M32, k >> 32] for k in keys], dtype=torch.int64).view(-1, 2)
        self.keys = words.to(device)  # (B, 2): low, high word
        self.device = self.keys.device

    def __len__(self) -> int:
        return len(self.keys)

    def uniform(self, n: int, step: int = 0, stream: int = 0) -> torch.Tensor:
        """(B, n) float32 uniforms of lanes 0..n-1 at ``step`` in ``stream``, on the keys' device."""
        lane = torch.arange(n, dtype=torch.int64, device=self.device).view(1, n)
        const = torch.zeros((), dtype=torch.int64, device=self.device)
        k0, k1 = self.keys[:, :1], self.keys[:, 1:]  # (B, 1) each
        word = philox4x32((lane, const + (step & M32), const + (stream & M32), const), (k0, k1))[0]
        return (word >> 8).to(torch.float32) * 2.0**-24  # (B, n)


Noise = CounterRNG | torch.Generator | Sequence[torch.Generator]


def draw_uniform(
    generator: Noise, batch: int, n: int, device: torch.device | str, step: int = 0, stream: int = 0
) -> torch.Tensor:
    """Uniform [0, 1) draws of shape (batch, n), float32, on ``device``.

    CounterRNG: its lanes 0..n-1 at (step, stream), computed on its own device. One torch generator:
    ``torch.rand((batch, n))`` from it. A sequence: row b = ``torch.rand(n)`` from generator[b]. Torch
    generators are consumed in call order (step and stream do not address them); draws are made on each
    generator's own device and then moved, so a CPU generator can drive a GPU sampler.
    """
    if isinstance(generator, CounterRNG):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} CounterRNG keys for a batch of {batch}")
        u = generator.uniform(n, step, stream)
    elif isinstance(generator, torch.Generator):
        u = torch.rand((batch, n), generator=generator, device=generator.device)
    else:
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        u = torch.stack([torch.rand(n, generator=g, device=g.device).to(device) for g in generator])
    return u.to(device)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draw by inverse CDF: the first index whose cumulative probability exceeds ``u``.

    probs (..., V) non-negative (need not sum to one exactly), u (...) in [0, 1) -> int64 indices (...).
    Tokens of probability zero are never chosen. Only tensor ops: no host synchronisation.
    """
    cdf = probs.float().cumsum(-1)  # (..., V)
    x = (u.float() * cdf[..., -1]).unsqueeze(-1)  # (..., 1) scaled to the total mass
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # first i with cdf[i] > x
    # Rounding can put x at the total mass; fall back to the last token that has any probability.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last)
