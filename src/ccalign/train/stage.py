"""What the ``pretrain`` and ``finetune`` stages share: their flags, and building a run from the config.

Light at import (the stage modules import it to declare their flags); the training machinery is imported when
a run starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccalign.train.loop import TrainResult


def add_arguments(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """The flags both training stages take; ``seed_help`` says what the seed decides in this stage."""
    parser.add_argument("--model", required=True, metavar="NAME", help="entry of cfg.models")
    parser.add_argument("--seed", type=int, required=True, help=seed_help)
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer checkpoint")
    parser.add_argument("--cache", required=True, metavar="DIR", help="code cache directory")
    parser.add_argument("--out", required=True, metavar="PATH", help="model.pt (official layout)")


def state_dir_for(out: str | Path) -> Path:
    """The resumable state of the run that writes ``out`` lives beside it: ``<dir>/<stem>_state/``."""
    out = Path(out)
    return out.parent / f"{out.stem}_state"


def run_stage(
    cfg: dict,
    *,
    stage: str,
    labels: dict[str, str],
    model_name: str,
    seed: int,
    tokenizer_path: str,
    cache_dir: str,
    out: str,
    objective: str,
    lam: float | None = None,
    overrides: dict | None = None,
    base: str | None = None,
) -> TrainResult:
    """Train ``cfg.models[model_name]`` with its resolved ``stage`` settings (``overrides`` on top: the run's
    own β / uncond_ratio); ``base`` = fine-tune from it.

    Without ``base`` the model is built fresh (seeded by ``seed``); with it, the policy and the frozen
    reference are both loaded from ``base``.
    """
    import contextlib

    import torch

    from ccalign.config import entry
    from ccalign.data.dataset import CodeDataset
    from ccalign.device import world
    from ccalign.families import get_family
    from ccalign.io import output_lock
    from ccalign.tracking import flatten, stage_run
    from ccalign.train.loop import train
    from ccalign.train.settings import TrainSettings

    mcfg = entry(cfg, "models", model_name)
    family = get_family(mcfg["family"])
    settings = TrainSettings.create(
        objective, 1.0 if lam is None else lam, **{**mcfg[stage], **(overrides or {})}
    )
    model_args = {**mcfg["args"], **settings.model_args}
    tokenizer_args = cfg["tokenizers"][mcfg["tokenizer"]]["args"]

    dataset = CodeDataset(cache_dir, seed=seed)
    if dataset.family != family.name:
        raise ValueError(
            f"code cache {cache_dir} was made by a {dataset.family} tokenizer, model {model_name!r} "
            f"is {family.name}"
        )
    tokenizer = family.load_tokenizer(tokenizer_path, tokenizer_args)
    if base is None:
        torch.manual_seed(seed + settings.seed_offset)  # the same fresh weights on every rank
        model, reference = family.build_model(model_args), None
    else:
        model = family.load_model(base, model_args)
        reference = family.load_model(base, model_args) if objective != "mle" else None

    params = {f"{stage}.resolved.{k}": v for k, v in flatten(settings.to_dict()).items()}
    params.update({f"{stage}.resolved.model_args.{k}": v for k, v in model_args.items()})
    inputs = {"tokenizer": tokenizer_path, "cache": cache_dir} | ({"base": base} if base else {})
    # one job per output: its rank 0 holds the lock (a second job stops, naming the holder)
    lock = output_lock(out) if world()[0] == 0 else contextlib.nullcontext()
    with lock, stage_run(cfg, stage, labels, params=params, inputs=inputs) as run:
        run.log_input(f"code cache {Path(cache_dir).name}", dataset.manifest_sha256, str(cache_dir))
        return train(
            family,
            model,
            dataset,
            settings,
            seed=seed,
            out=out,
            state_dir=state_dir_for(out),
            reference=reference,
            tokenizer=tokenizer,
            run=run,
            config=cfg,
        )
