"""Stage ``pretrain``: maximum-likelihood training of a fresh model on the code cache (embedded experiment).

The same loop as ``finetune`` with objective ``mle``; class dropout as configured keeps the null class
trained for classifier-free guidance. Settings: ``models.<name>.pretrain`` over the top-level ``pretrain``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ccalign.pipeline import Job, Plan, Stage
from ccalign.train import stage as training

HELP = "pre-train a fresh model by maximum likelihood with class dropout (same loop as finetune; resumable)"


def jobs(plan: Plan) -> Iterator[Job]:
    for model, m in plan.cfg["models"].items():
        if m["weights"] or m["checkpoint"]:
            continue  # released base models are fetched or given
        tokenizer = plan.tokenizer_ckpt(m["tokenizer"])
        cache = plan.cache_manifest(m["tokenizer"])
        for seed in plan.cfg["seeds"]:
            out = plan.path("pretrain", family=m["family"], model=model, seed=seed)
            flags = ["--model", model, "--seed", str(seed), "--tokenizer", tokenizer]
            flags += ["--cache", cache.rpartition("/")[0], "--out", out]
            wildcards = {"family": m["family"], "model": model, "seed": seed}
            inputs = {"tokenizer": tokenizer, "cache": cache}
            yield plan.job("pretrain", wildcards, wildcards, inputs, flags, model=model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    training.add_arguments(parser, seed_help="run seed (initial weights, data order)")


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
        objective="mle",
    )


SPEC = Stage(
    name="pretrain",
    help=HELP,
    outputs={
        "model": "pretrain/{family}/{model}/seed{seed}/model.pt",
        "args": "pretrain/{family}/{model}/seed{seed}/model.args.json",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("pretrain", "models.{model}.args", "models.{model}.pretrain", "tokenizers.{tokenizer}"),
    persist=True,
)
