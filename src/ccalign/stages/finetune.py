"""Stage ``finetune``: align a base model with CCA, DPO or unlearning against its frozen copy.

Launch with ``torchrun --nproc_per_node G ccalign finetune ...`` for several processes. Restarting the same
command resumes from the state directory beside ``--out``. Settings: ``models.<name>.finetune`` over the
top-level ``finetune``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ccalign.align import OBJECTIVES
from ccalign.pipeline import Job, Plan, Stage, fmt
from ccalign.train import stage as training

HELP = "fine-tune a base model with CCA / DPO / unlearning (torchrun DDP or FSDP; resumable)"


def jobs(plan: Plan) -> Iterator[Job]:
    for model, m in plan.cfg["models"].items():
        tokenizer = plan.tokenizer_ckpt(m["tokenizer"])
        cache = plan.cache_manifest(m["tokenizer"])
        for seed in plan.cfg["seeds"]:
            base = plan.base_ckpt(model, seed)
            for variant in plan.finetune_runs(model):
                wildcards = {"family": m["family"], "model": model, "seed": seed, "variant": variant.name}
                labels = {"family": m["family"], "model": model, "seed": seed, **variant.labels()}
                out = plan.path("finetune", **wildcards)
                flags = ["--model", model, "--seed", str(seed), "--objective", variant.objective]
                flags += ["--lam", fmt(variant.lam)]
                flags += ["--beta", fmt(variant.beta)] if variant.beta is not None else []
                flags += (
                    ["--uncond-ratio", fmt(variant.uncond_ratio)] if variant.uncond_ratio is not None else []
                )
                flags += ["--base", base, "--tokenizer", tokenizer, "--cache", cache.rpartition("/")[0]]
                flags += ["--out", out]
                inputs = {"base": base, "tokenizer": tokenizer, "cache": cache}
                yield plan.job("finetune", wildcards, labels, inputs, flags, model=model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    training.add_arguments(parser, seed_help="run seed (data order, uncond masks, dropout)")
    parser.add_argument("--objective", required=True, choices=OBJECTIVES, help="alignment objective")
    parser.add_argument("--lam", type=float, required=True, metavar="FLOAT", help="λ (ignored by dpo)")
    parser.add_argument("--beta", type=float, metavar="FLOAT", help="β (default: finetune.beta)")
    parser.add_argument(
        "--uncond-ratio", type=float, metavar="FLOAT", help="uncond_ratio (default: finetune.uncond_ratio)"
    )
    parser.add_argument(
        "--base", required=True, metavar="PATH", help="base model checkpoint (any official layout)"
    )


def main(cfg: dict, args: argparse.Namespace) -> None:
    training.run_stage(
        cfg,
        stage=SPEC.name,
        labels=args.labels,
        model_name=args.model,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        cache_dir=args.cache,
        out=args.out,
        objective=args.objective,
        lam=args.lam,
        overrides={
            k: v for k, v in (("beta", args.beta), ("uncond_ratio", args.uncond_ratio)) if v is not None
        },
        base=args.base,
    )


SPEC = Stage(
    name="finetune",
    help=HELP,
    outputs={
        "model": "finetune/{family}/{model}/seed{seed}/{variant}/model.pt",
        "args": "finetune/{family}/{model}/seed{seed}/{variant}/model.args.json",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("finetune", "models.{model}.args", "models.{model}.finetune", "tokenizers.{tokenizer}"),
    persist=True,
)
