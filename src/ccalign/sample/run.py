"""Fill a rank's shards: skip the verified ones, generate the rest batch by batch, write each atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccalign.log import get_logger, progress
from ccalign.sample.batch import auto_batch_size
from ccalign.sample.generate import DECODE, Sampler, SampleSpec
from ccalign.sample.shards import Shard, check_shard, write_shard

log = get_logger(__name__)


def pending_shards(shard_dir: Path, shards: list[Shard], spec: SampleSpec) -> list[Shard]:
    """Shards that are missing or cannot be trusted (interrupted, corrupt, or made with other settings)."""
    fingerprint, todo = spec.fingerprint(), []
    for shard in shards:
        why = check_shard(shard_dir, shard, fingerprint)
        if why is not None:
            if why != "not written yet":
                log.warning("redoing %s: %s", shard.name, why)
            todo.append(shard)
    return todo


def fill_shards(
    family,
    model,
    tokenizer,
    spec: SampleSpec,
    shard_dir: Path,
    shards: list[Shard],
    batch_size: int | str,
    device: torch.device | str,
    decode: str = DECODE,
) -> int:
    """Generate every shard of ``shards`` not already valid on disk; returns how many images it made.

    batch_size: images per generate call (at most a shard), or "auto" (``auto_batch_size``). Where the decode
    path captures CUDA graphs, every batch is padded to that size, so its buffers and graphs are made once
    per job.
    """
    todo = pending_shards(shard_dir, shards, spec)
    log.info("%d of %d shards to generate in %s", len(todo), len(shards), shard_dir)
    if not todo:
        return 0
    sampler = Sampler(family, model, tokenizer, spec, device, decode)
    largest = max(s.stop - s.start for s in todo)
    if batch_size == "auto":
        batch_size = auto_batch_size(model, spec, device, largest)
        log.info("batch_size auto: %d images per batch on %s", batch_size, device)
    batch_size = min(batch_size, largest)
    rows = batch_size if sampler.captures else None
    fingerprint = spec.fingerprint()
    total = sum(s.stop - s.start for s in todo)
    bar = progress(total=total, desc="sampling", unit="img")
    for shard in todo:
        batches = []
        for start in range(shard.start, shard.stop, batch_size):
            indices = range(start, min(start + batch_size, shard.stop))
            batches.append(sampler(indices, rows))
            bar.update(len(indices))
        labels = spec.labels(shard.start, shard.stop)
        write_shard(shard_dir, shard, np.concatenate(batches), labels, fingerprint)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    return total
