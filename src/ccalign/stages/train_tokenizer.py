"""Stage ``train-tokenizer`` (small experiments): train a tokenizer of the family's real class from scratch,
on the views the ``tokenize`` stage will cache (``ccalign.train.tokenizer``); resumable. Settings:
``tokenizers.<name>.train``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage

HELP = "train a small tokenizer (embedded experiment) on an image folder; resumable"


def jobs(plan: Plan) -> Iterator[Job]:
    for name, tok in plan.cfg["tokenizers"].items():
        if tok["weights"] or tok["checkpoint"]:
            continue  # released tokenizers are fetched or given
        out = plan.path("train_tokenizer", tokenizer=name)
        flags = ["--name", name, "--data", plan.dataset_dir(), "--out", out]
        labels = {"tokenizer": name, "family": tok["family"]}
        yield plan.job("train_tokenizer", {"tokenizer": name}, labels, plan.dataset_inputs(), flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, metavar="NAME", help="entry of cfg.tokenizers to train")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root: DIR/<split>/<class>/*")
    parser.add_argument("--split", default="train", help="sub-folder of --data to train on (default train)")
    parser.add_argument("--out", required=True, metavar="PATH", help="tokenizer checkpoint to write")


def main(cfg: dict, args: argparse.Namespace) -> None:
    import numpy as np

    from ccalign.config import entry
    from ccalign.data.folder import list_image_folder
    from ccalign.data.views import make_views
    from ccalign.families import get_family
    from ccalign.log import get_logger
    from ccalign.stages.tokenize import view_spec
    from ccalign.tracking import stage_run
    from ccalign.train.tokenizer import train

    tcfg = entry(cfg, "tokenizers", args.name)
    settings = tcfg["train"]
    family = get_family(tcfg["family"])
    spec = view_spec(cfg, args.name)
    folder = list_image_folder(Path(args.data, args.split), cfg["dataset"]["num_classes"])
    views = np.stack([make_views(folder.load(i), spec, i) for i in range(len(folder))])  # (N, V, S, S, 3)
    params = {f"train_tokenizer.{k}": v for k, v in settings.items()}
    with stage_run(cfg, SPEC.name, args.labels, params=params) as run:
        tokenizer = train(family, tcfg["args"], views, settings, args.out, run)
        family.save_tokenizer(tokenizer, args.out)
    get_logger("train-tokenizer").info(
        "saved %s tokenizer %s (%d steps) to %s", family.name, args.name, settings["steps"], args.out
    )


SPEC = Stage(
    name="train_tokenizer",
    help=HELP,
    outputs={
        "tokenizer": "tokenizers/{tokenizer}/tokenizer.pt",
        "args": "tokenizers/{tokenizer}/tokenizer.args.json",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("dataset", "tokenizers.{tokenizer}"),
)
