"""Per-sample noise, the batches of a sampling job, and the official pixel conversions.

Sample ``i`` of a run is class ``i // per_class`` and draws all its randomness from a counter-based generator
keyed by a hash of ``(seed, i)`` (``CounterRNG``: Philox4x32-10 of (key, step, lane) in integer tensor ops,
bit-identical on CPU and GPU). Row ``b``'s noise depends on its key only and the decoder always runs on
batches of one fixed size, so a sample's pixels do not depend on the batch it shares, the batch size, the
number of processes or the point a job was resumed from (exactly so in float32 on CPU; on GPU kernels may
round differently with the batch shape). Hashing instead of ``seed * N + i`` keeps runs with different
seeds from ever sharing a sample's noise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ccalign.families import Family
from ccalign.io import sha256_bytes
from ccalign.models.graphs import check_decode_mode
from ccalign.models.sampling import CounterRNG

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_BATCH = 8  # rows per decoder call (see decode_fixed_batches): small enough for 384 px on any GPU
DECODE = "graph"  # the families' decode mode for jobs: the fast path, CUDA graphs on GPU


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides the pixels of sample i. Batch size and world size are deliberately absent."""

    family: str
    num_classes: int
    per_class: int
    seed: int
    guidance: float
    sampling: dict = field(default_factory=dict)
    resize_to: int | None = None  # resize decoded images to this side (bicubic), None keeps them
    precision: str = (
        "fp32"  # fp32 | bf16 | fp16, applied as the family's official sampler does (CASTS_WEIGHTS)
    )
    decode_batch: int = DECODE_BATCH  # the decoder always sees this many rows
    checkpoint_sha256: str = ""
    tokenizer_sha256: str = ""
    noise: str = "philox4x32-10"  # the per-sample noise (shards made with other noise are never reused)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.per_class < 1:
            raise ValueError(
                f"need num_classes >= 1 and per_class >= 1, got {self.num_classes}, {self.per_class}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    @property
    def num_samples(self) -> int:
        return self.num_classes * self.per_class

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Class of samples start..stop-1: sample i has class i // per_class (class-balanced)."""
        stop = self.num_samples if stop is None else stop
        return np.arange(start, stop, dtype=np.int64) // self.per_class

    def fingerprint(self) -> str:
        """Hash of the spec; shards made under another spec are never reused."""
        return sha256_bytes(json.dumps(asdict(self), sort_keys=True).encode())


def sample_seed(seed: int, index: int) -> int:
    """64-bit noise key of sample ``index`` in a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"ccalign.sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_noise(seed: int, indices: Sequence[int], device: torch.device | str) -> CounterRNG:
    """Row b's noise keyed by ``sample_seed(seed, indices[b])``, evaluated on ``device``."""
    return CounterRNG([sample_seed(seed, i) for i in indices], device)


def to_uint8(family: Family, images: torch.Tensor, size: int | None = None) -> np.ndarray:
    """Decoded images (B,3,H,W) in [-1, 1] -> ADM pixels (B,H',W',3) uint8, as the official samplers do.

    A ``size`` other than H first resizes to size×size, bicubic (LlamaGen's 384 -> 256 px for evaluation).
    """
    images = images.float()
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bicubic")
    return family.to_uint8(images).cpu().numpy()


class Sampler:
    """The batches of one sampling job: the model is put in the spec's precision once (LlamaGen: weights cast
    in place), and every batch runs the family's ``decode`` path (its buffers and CUDA graphs are kept on the
    model for the next batch of the same shape).

    ``sampler(indices, rows)`` -> pixels (B, H, W, 3) uint8 of samples ``indices``; with ``rows``, the batch
    is padded to that many rows (copies of its first sample, dropped) so that every batch has the shape
    the graphs were captured for (``captures``: whether this sampler's decode path captures any).
    """

    def __init__(self, family: Family, model, tokenizer, spec: SampleSpec, device, decode: str = DECODE):
        check_decode_mode(decode)
        self.family, self.model, self.tokenizer, self.spec = family, model, tokenizer, spec
        self.device = torch.device(device)
        dtype = PRECISIONS[spec.precision]
        # as the family's official sampler: cast the weights (LlamaGen; decoding stays float32), or keep
        # float32 weights and autocast generation and decoding (VAR)
        self.autocast = None if family.casts_weights else dtype
        if family.casts_weights:
            model.to(dtype or torch.float32)
        self.decode = decode if spec.sampling.get("kv_cache", True) else "reference"  # fast needs the cache
        self.captures = self.device.type == "cuda" and self.decode in ("graph", "compile")

    @torch.no_grad()
    def __call__(self, indices: Sequence[int], rows: int | None = None) -> np.ndarray:
        with self.precision():
            codes = self.codes(indices, rows)  # (n, T)
            images = decode_fixed_batches(
                self.family, self.tokenizer, codes, self.spec.decode_batch
            )  # [-1, 1]
        return to_uint8(self.family, images, self.spec.resize_to)

    @torch.no_grad()
    def codes(self, indices: Sequence[int], rows: int | None = None) -> torch.Tensor:
        """The token codes (n, T) of samples ``indices`` (the generation half of a call)."""
        spec, n = self.spec, len(indices)
        indices = list(indices) + [indices[0]] * max(0, (rows or n) - n)
        labels = torch.tensor([i // spec.per_class for i in indices], device=self.device)  # (B,)
        with self.precision():
            codes = self.family.generate(
                self.model,
                self.tokenizer,
                labels,
                guidance=spec.guidance,
                sampling=dict(spec.sampling),
                generator=sample_noise(spec.seed, indices, self.device),
                decode=self.decode,
            )
        return codes[:n]

    def precision(self) -> torch.autocast:
        """The family's autocast context (disabled where the weights were cast instead). Its weight cache
        cannot live across CUDA graph captures; without it the numerics are the same."""
        dtype = self.autocast
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def generate_batch(
    family: Family, model, tokenizer, spec: SampleSpec, indices: Sequence[int], device, decode: str = DECODE
) -> np.ndarray:
    """Pixels (B,H,W,3) uint8 of samples ``indices``; each row depends only on (spec, its index)."""
    return Sampler(family, model, tokenizer, spec, device, decode)(indices)


def decode_fixed_batches(family: Family, tokenizer, codes: torch.Tensor, rows: int) -> torch.Tensor:
    """``family.decode`` in chunks of exactly ``rows`` rows, the last padded by repeating a row.

    Convolution numerics change with the batch size (~1e-5 on CPU, enough to flip pixels at rounding
    boundaries) but not with a row's position in a batch of fixed size, so the pixels of a sample do not
    depend on how many samples were generated with it.
    """
    out = []
    for start in range(0, len(codes), rows):
        chunk = codes[start : start + rows]  # (n, T)
        padded = torch.cat([chunk, chunk[:1].expand(rows - len(chunk), -1)])  # (rows, T)
        out.append(family.decode(tokenizer, padded)[: len(chunk)])
    return torch.cat(out)
