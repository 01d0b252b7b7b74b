"""Stage ``pretrain``: maximum-likelihood training of a fresh model on the code cache (embedded experiment).

The same loop as ``finetune`` with objective ``mle``; class dropout as configured keeps the null class
trained for classifier-free guidance.
"""

from __future__ import annotations

import argparse

from ccalign.train import stage as training

HELP = "pre-train a fresh model by maximum likelihood with class dropout (same loop as finetune; resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    training.add_arguments(parser, seed_help="run seed (initial weights, data order)")


def main(cfg: dict, args: argparse.Namespace) -> None:
    training.run_stage(
        cfg,
        stage="pretrain",
        model_name=args.model,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        cache_dir=args.cache,
        out=args.out,
        objective="mle",
    )
