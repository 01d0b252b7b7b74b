"""Stage ``train-classifier``: the domain feature extractor for small datasets (FID/IS/PRC/class accuracy).

Trains :class:`ccalign.metrics.domain.DomainClassifier` on the dataset's train image folder with random
pixel shifts, reports its accuracy on the validation folder when one is given, and writes the checkpoint
atomically. Settings: ``evaluate.classifier``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage

HELP = "train the small CNN classifier used as the domain feature extractor (FID/IS/PRC on CPU)"


def jobs(plan: Plan) -> Iterator[Job]:
    if plan.cfg["evaluate"]["extractor"] == "domain":
        name, data = plan.cfg["dataset"]["name"], plan.dataset_dir()
        out = plan.path("train_classifier", dataset=name)
        flags = ["--data", f"{data}/train", "--val", f"{data}/val", "--out", out]
        yield plan.job("train_classifier", {"dataset": name}, {"dataset": name}, plan.dataset_inputs(), flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="train image folder (<class>/*.png)")
    parser.add_argument(
        "--val", type=Path, default=None, help="validation image folder, for the accuracy report"
    )
    parser.add_argument("--out", required=True, type=Path, help="classifier checkpoint to write (.pt)")


def main(cfg: dict, args: argparse.Namespace) -> None:
    import time

    import numpy as np

    from ccalign.log import get_logger
    from ccalign.metrics import domain
    from ccalign.metrics.images import read_image_folder
    from ccalign.tracking import stage_run

    log = get_logger("train-classifier")
    settings = cfg["evaluate"]["classifier"]
    num_classes = cfg["dataset"]["num_classes"]
    images, labels, classes = read_image_folder(args.data, num_classes)
    val = None
    if args.val is not None:
        val_images, val_labels, val_classes = read_image_folder(args.val, num_classes)
        if val_classes != classes:
            raise ValueError(f"{args.val}: class folders {val_classes} differ from {args.data}'s {classes}")
        val = (val_images, val_labels)
    log.info(
        "training the domain classifier on %d images of %d classes, %s px",
        len(images),
        len(classes),
        images.shape[1:3],
    )

    params = {f"classifier.{k}": v for k, v in settings.items()}
    with stage_run(cfg, SPEC.name, args.labels, params=params, inputs={"data": args.data}) as run:
        t0 = time.perf_counter()
        model, losses = domain.train(images, labels, len(classes), settings)
        seconds = time.perf_counter() - t0
        for epoch, loss in enumerate(losses):
            run.log_metrics({"train_loss": loss}, step=epoch)
        metrics = {"train_accuracy": float(np.mean(domain.predict(model, images) == labels))}
        if val is not None:
            metrics["val_accuracy"] = float(np.mean(domain.predict(model, val[0]) == val[1]))
        log.info("classifier (%.1f s): %s", seconds, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        # the checkpoint holds no timings: identical inputs give identical bytes
        domain.save(
            model, args.out, image_size=images.shape[1:3], classes=classes, settings=settings, metrics=metrics
        )
        run.log_metrics({**metrics, "train_seconds": seconds})
        run.log_artifact(args.out)


SPEC = Stage(
    name="train_classifier",
    help=HELP,
    outputs={"classifier": "classifier/{dataset}/classifier.pt"},
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("dataset", "evaluate.classifier"),
)
