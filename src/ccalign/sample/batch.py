"""The batch size of a sampling job: a number from the config, or "auto", the largest batch that fits.

"auto" sizes the batch from the device's free memory and the model's own estimate of what one sampled image
needs (``model.sampling_bytes_per_row``: KV cache and sampling workspace), then splits each shard into as few
batches as that allows, of equal size: every batch of the job has the one shape the decode graphs are
captured for (a shorter last batch is padded to it), with as little padding as possible.
"""

from __future__ import annotations

import math
import os

import torch

from ccalign.sample.generate import PRECISIONS, SampleSpec

AUTO_CAP = 1024  # rows; a decode step is compute-bound well before this on any current GPU
CPU_AUTO = 64  # CPU: throughput stops growing around here and memory is rarely the limit
MEMORY_FRACTION = 0.9  # of the free device memory, after DECODE_RESERVE
DECODE_RESERVE = 4 * 2**30  # bytes kept for the image decoder (fixed decode batches) and the allocator


def fit_batch(budget_rows: int, shard_size: int) -> int:
    """The batch for shards of ``shard_size`` samples when at most ``budget_rows`` fit (at least 1, at most
    AUTO_CAP): as few batches per shard as possible, of equal size (the last one padded)."""
    budget = max(1, min(budget_rows, AUTO_CAP))
    return math.ceil(shard_size / math.ceil(shard_size / budget))


def free_memory(device: torch.device) -> int:
    """Bytes available for sampling buffers on ``device`` (CUDA: free memory; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0  # unknown: CPU_AUTO decides


def auto_batch_size(model, spec: SampleSpec, device: torch.device | str, shard_size: int) -> int:
    """The largest batch of ``model`` sampled under ``spec`` that fits the free memory of ``device`` (on CPU,
    at most CPU_AUTO), shaped for shards of ``shard_size`` samples (see ``fit_batch``)."""
    device = torch.device(device)
    per_row = model.sampling_bytes_per_row(spec.guidance, PRECISIONS[spec.precision])
    budget = int((free_memory(device) - DECODE_RESERVE) * MEMORY_FRACTION) // per_row
    if device.type != "cuda":
        budget = CPU_AUTO if budget <= 0 else min(budget, CPU_AUTO)
    elif budget < 1:
        raise RuntimeError(
            f"batch_size auto: {free_memory(device) / 2**30:.1f} GiB free on {device} is not enough for one "
            f"sample ({per_row / 2**30:.2f} GiB plus {DECODE_RESERVE / 2**30:.0f} GiB for decoding)"
        )
    return fit_batch(budget, shard_size)
