"""Stage ``prepare-data``: write the embedded dataset as image folders ``<out>/{train,val}/<class>/*.png``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ccalign.pipeline import Job, Plan, Stage

HELP = "write the embedded dataset (scikit-learn digits) as train/val image folders"
SOURCES = ("sklearn_digits",)  # dataset.source values this stage writes; "imagefolder" is the user's


def jobs(plan: Plan) -> Iterator[Job]:
    ds = plan.cfg["dataset"]
    if ds["source"] in SOURCES:
        wildcards = {"dataset": ds["name"]}
        yield plan.job("prepare_data", wildcards, wildcards, {}, ["--out", plan.dataset_dir()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. data/raw/digits")


def main(cfg: dict, args: argparse.Namespace) -> None:
    from ccalign.data.digits import write_digits
    from ccalign.log import get_logger
    from ccalign.tracking import stage_run

    ds = cfg["dataset"]
    if ds["source"] not in SOURCES:
        raise ValueError(
            f"prepare-data writes only the embedded datasets (dataset.source in {list(SOURCES)}); "
            f"dataset.source is {ds['source']!r}: put that image folder in place yourself"
        )
    settings = {"val_count": ds["val_count"], "seed": ds["seed"], "image_size": ds["image_size"]}
    with stage_run(
        cfg, SPEC.name, args.labels, params={f"prepare.{k}": v for k, v in settings.items()}
    ) as run:
        summary = write_digits(args.out, num_classes=ds["num_classes"], **settings)
        run.log_metrics({"images_train": summary["train"], "images_val": summary["val"]})
    get_logger("prepare-data").info(
        "wrote %s: %d train / %d val images, %d px, to %s",
        ds["name"],
        summary["train"],
        summary["val"],
        summary["image_size"],
        args.out,
    )


SPEC = Stage(
    name="prepare_data",
    help=HELP,
    outputs={"manifest": "raw/{dataset}/dataset.json"},
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("dataset",),
    folder=True,
)
