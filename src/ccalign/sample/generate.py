"""Per-sample seeding, one generated batch, and the official pixel conversions.

Sample ``i`` of a run is class ``i // per_class`` and draws all its randomness from its own generator,
seeded by a hash of ``(seed, i)``. The families' ``generate`` keeps row ``b``'s randomness inside
``generator[b]`` and the decoder always runs on batches of one fixed size, so a sample's pixels do not depend
on the batch it shares, the batch size, the number of processes or the point a job was resumed from.
Hashing instead of ``seed * N + i`` keeps runs with different seeds from ever sharing a sample's noise.
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

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_BATCH = 8  # rows per decoder call (see decode_fixed_batches): small enough for 384 px on any GPU


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
    precision: str = "fp32"  # autocast dtype of the transformer during generation: fp32 | bf16 | fp16
    decode_batch: int = DECODE_BATCH  # the decoder always sees this many rows
    checkpoint_sha256: str = ""
    tokenizer_sha256: str = ""

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.per_class < 1:
            raise ValueError(
                f"need num_classes >= 1 and per_class >= 1, got {self.num_classes}, {self.per_class}"
            )
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")

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
    """64-bit generator seed of sample ``index`` in a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"ccalign.sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (``draw_uniform`` moves the draws): the same noise on any device."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def to_uint8(family: Family, images: torch.Tensor, size: int | None = None) -> np.ndarray:
    """Decoded images (B,3,H,W) in [-1, 1] -> ADM pixels (B,H',W',3) uint8, as the official samplers do.

    A ``size`` other than H first resizes to size×size, bicubic (LlamaGen's 384 -> 256 px for evaluation).
    """
    images = images.float()
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bicubic")
    return family.to_uint8(images).cpu().numpy()


@torch.no_grad()
def generate_batch(
    family: Family, model, tokenizer, spec: SampleSpec, indices: Sequence[int], device: torch.device | str
) -> np.ndarray:
    """Pixels (B,H,W,3) uint8 of samples ``indices``; each row depends only on (spec, its index)."""
    labels = torch.tensor([i // spec.per_class for i in indices], device=device)  # (B,)
    generators = sample_generators(spec.seed, indices)
    dtype = _PRECISIONS[spec.precision]
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        codes = family.generate(
            model,
            tokenizer,
            labels,
            guidance=spec.guidance,
            sampling=dict(spec.sampling),
            generator=generators,
        )  # (B, T)
    images = decode_fixed_batches(family, tokenizer, codes, spec.decode_batch)  # (B, 3, H, W) in [-1, 1]
    return to_uint8(family, images, spec.resize_to)


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
