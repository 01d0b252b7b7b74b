"""``ccalign train-classifier``: the domain feature extractor for small datasets (FID/IS/PRC/class accuracy).

Trains :class:`ccalign.metrics.domain.DomainClassifier` on the dataset's train image folder with random
pixel shifts, reports its accuracy on the validation folder when one is given, and writes the checkpoint
atomically. Settings: ``evaluate.classifier`` (see :data:`DEFAULTS`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ccalign.log import get_logger
from ccalign.metrics import domain
from ccalign.metrics.images import read_image_folder
from ccalign.tracking import stage_run

HELP = "train the small CNN classifier used as the domain feature extractor (FID/IS/PRC on CPU)"

# evaluate.classifier settings; the config schema fills the same defaults.
DEFAULTS = {
    "channels": [32, 64],  # conv widths, one block (2 convs + 2x2 max-pool) each
    "hidden": 128,  # penultimate width: the FID / Precision-Recall feature dimension
    "dropout": 0.1,
    "epochs": 20,
    "batch_size": 64,
    "lr": 3.0e-3,  # one-cycle peak
    "weight_decay": 1.0e-4,
    "shift": 1,  # random translation of up to this many pixels (the embedded study's augmentation)
    "seed": 0,
}

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="train image folder (<class>/*.png)")
    parser.add_argument(
        "--val", type=Path, default=None, help="validation image folder, for the accuracy report"
    )
    parser.add_argument("--out", required=True, type=Path, help="classifier checkpoint to write (.pt)")


def main(cfg: dict, args: argparse.Namespace) -> None:
    settings = {**DEFAULTS, **(cfg.get("evaluate", {}).get("classifier") or {})}
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
    with stage_run(cfg, stage="train-classifier", params=params, inputs={"data": args.data}) as run:
        t0 = time.perf_counter()
        model, losses = domain.train(images, labels, len(classes), settings)
        seconds = time.perf_counter() - t0
        for epoch, loss in enumerate(losses):
            run.log_metrics({"train_loss": loss}, step=epoch)
        metrics = {"train_accuracy": float(np.mean(domain.predict(model, images) == labels))}
        if val is not None:
            metrics["val_accuracy"] = float(np.mean(domain.predict(model, val[0]) == val[1]))
        log.info(
            "classifier: %s; trained in %.1f s",
            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            seconds,
        )
        domain.save(  # no timings in the file: identical inputs give identical bytes
            model, args.out, image_size=images.shape[1:3], classes=classes, settings=settings, metrics=metrics
        )
        run.log_metrics(metrics | {"train_seconds": seconds})
        run.log_artifact(args.out)
