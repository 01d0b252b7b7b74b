"""Stage ``finetune``: align a base model with CCA, DPO or unlearning against its frozen copy.

Launch with ``torchrun --nproc_per_node G ccalign finetune ...`` for several processes. Restarting the same
command resumes from the state directory beside ``--out``.
"""

from __future__ import annotations

import argparse

from ccalign.align.losses import OBJECTIVES
from ccalign.train import stage as training

HELP = "fine-tune a base model with CCA / DPO / unlearning (torchrun DDP or FSDP; resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    training.add_arguments(parser, seed_help="run seed (data order, uncond masks, dropout)")
    parser.add_argument("--objective", required=True, choices=OBJECTIVES, help="alignment objective")
    parser.add_argument("--lam", type=float, required=True, metavar="FLOAT", help="λ (ignored by dpo)")
    parser.add_argument(
        "--base", required=True, metavar="PATH", help="base model checkpoint (any official layout)"
    )


def main(cfg: dict, args: argparse.Namespace) -> None:
    training.run_stage(
        cfg,
        stage="finetune",
        model_name=args.model,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        cache_dir=args.cache,
        out=args.out,
        objective=args.objective,
        lam=args.lam,
        base=args.base,
    )
