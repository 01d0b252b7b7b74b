"""Training a small tokenizer from scratch (stage ``train-tokenizer``), of the family's real class.

The tokenizer is ``Family.build_tokenizer(cfg.tokenizers[name].args)`` trained with ``Family.tokenizer_loss``
(reconstruction + codebook/commitment terms) on the views the ``tokenize`` stage will cache (the tokenizer's
``views`` setting), so it learns exactly the image distribution it later encodes. Batch s is drawn from
(seed, s) alone and the state (weights, optimizer, step) is saved atomically every ``ckpt_every`` steps to
``<out>.train_state.pt``: a killed run resumes where it stopped, a rerun with more steps continues, and
either ends with the same weights as one uninterrupted run. The result is saved with
``Family.save_tokenizer`` in the official checkpoint layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccalign.data.views import to_model_input
from ccalign.families import Family
from ccalign.io import atomic_save_torch, load_torch, sha256_bytes
from ccalign.log import get_logger, progress

log = get_logger("train-tokenizer")


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".train_state.pt")


def train(
    family: Family, args: dict, views: np.ndarray, settings: dict, out: str | Path, run=None
) -> torch.nn.Module:
    """Train on ``views`` (N, V, S, S, 3) uint8 for ``settings["steps"]`` steps; resumes a saved state."""
    steps, batch, seed = settings["steps"], settings["batch_size"], settings["seed"]
    torch.manual_seed(seed)
    tokenizer = family.build_tokenizer(args).train()
    opt = torch.optim.Adam(tokenizer.parameters(), lr=settings["lr"], betas=(0.9, 0.95))
    # what must match for a saved state to be continued (steps may grow: the learning rate is constant)
    key = {
        "args": args,
        "lr": settings["lr"],
        "batch_size": batch,
        "seed": seed,
        "views_sha256": sha256_bytes(views.tobytes()),
    }
    start, spath = 0, state_path(out)
    if spath.is_file():
        state = load_torch(spath)
        if state["key"] == key and state["step"] <= steps:
            tokenizer.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
            log.info("resuming from %s at step %d", spath, start)
        else:
            log.warning("ignoring %s: it was written with other settings", spath)
    n, v = views.shape[:2]
    log_every = max(1, steps // 50)
    for step in progress(
        range(start, steps), total=steps, initial=start, desc="train-tokenizer", unit="step"
    ):
        rng = np.random.default_rng([seed, step])
        x = to_model_input(views[rng.integers(0, n, batch), rng.integers(0, v, batch)])  # (B, 3, S, S)
        loss, metrics = family.tokenizer_loss(tokenizer, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if run is not None and (done % log_every == 0 or done == steps):
            run.log_metrics({"loss": loss.item(), **metrics}, step=done)
        if done % settings["ckpt_every"] == 0 or done == steps:
            atomic_save_torch(
                {"model": tokenizer.state_dict(), "optimizer": opt.state_dict(), "step": done, "key": key},
                spath,
            )
    return tokenizer.eval()
