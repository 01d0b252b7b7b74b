"""The evaluation protocol: which features of which images are compared with which reference.

ADM protocol (``inception``): FID on pool features and sFID on spatial features, each against the reference
batch's stored ``mu``/``sigma`` and ``mu_s``/``sigma_s`` (computed from its ``arr_0`` when absent); IS on the
samples' unbiased logits with 10 splits; Precision/Recall (k = 3) of the samples' pool features against the
reference ``arr_0``'s. The ``domain`` protocol is the same on the domain classifier's features (no sFID, no
stored statistics, which would be Inception's) plus class accuracy when the samples carry labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccalign.log import get_logger
from ccalign.metrics.features import Features, extract
from ccalign.metrics.fidelity import (
    class_accuracy,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from ccalign.metrics.images import NpzImages, read_image_folder

log = get_logger(__name__)

# Stored reference statistics in an ADM reference batch: feature name -> (mean key, covariance key).
STORED_STATS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
FRECHET = {"pool": "fid", "spatial": "sfid"}


@dataclass
class ImageSet:
    """Images to run through an extractor: a streamed .npz ``arr_0`` or an in-memory folder array."""

    path: Path
    npz: NpzImages | None = None
    array: np.ndarray | None = None  # (N, H, W, 3) uint8

    @classmethod
    def open(cls, path: str | Path) -> ImageSet:
        path = Path(path)
        if path.is_dir():
            return cls(path, array=read_image_folder(path)[0])
        return cls(path, npz=NpzImages(path))

    def __len__(self) -> int:
        return len(self.npz) if self.npz is not None else len(self.array)

    @property
    def image_size(self) -> tuple[int, int]:
        shape = self.npz.shape if self.npz is not None else self.array.shape
        return shape[1], shape[2]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.npz is not None:
            yield from self.npz.batches(batch_size)
        else:
            for i in range(0, len(self.array), batch_size):
                yield self.array[i : i + batch_size]

    def stored_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Statistics stored in the file, by feature name (ADM reference batches have them)."""
        if self.npz is None:
            return {}
        return {
            feat: (self.npz.load(mu), self.npz.load(sigma))
            for feat, (mu, sigma) in STORED_STATS.items()
            if mu in self.npz.keys and sigma in self.npz.keys
        }


def evaluate(
    samples: ImageSet,
    reference: ImageSet,
    features: Features,
    settings: dict,
    *,
    labels: np.ndarray | None = None,
    use_stored_stats: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """All metrics of ``samples`` against ``reference``.

    settings: batch_size, is_split_size, prc_k, prc_batch_size. ``labels`` (N,) adds class accuracy.
    ``use_stored_stats``: take the reference's stored statistics (Inception features only).
    """
    if samples.image_size != reference.image_size:
        log.warning(
            "samples are %s px but the reference is %s px: metrics are not comparable to published ones",
            samples.image_size,
            reference.image_size,
        )
    bs = settings["batch_size"]
    fake = extract(features, samples.batches(bs), len(samples), device, desc="sample features")
    # check what can be checked before the reference pass
    stored = reference.stored_stats() if use_stored_stats else {}
    for feat, (mu, sigma) in stored.items():
        d = fake[feat].shape[1]
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ValueError(
                f"{reference.path}: stored {'/'.join(STORED_STATS[feat])} have shapes {mu.shape}/"
                f"{sigma.shape} but the {feat} features are {d}-d"
            )
    num_classes = fake["logits"].shape[1]
    if labels is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{samples.path}: labels span [{labels.min()}, {labels.max()}] but the classifier has "
            f"{num_classes} classes"
        )
    real = extract(features, reference.batches(bs), len(reference), device, desc="reference features")

    metrics: dict[str, float] = {}
    for feat, name in FRECHET.items():
        if feat in fake:
            ref_mu, ref_sigma = stored[feat] if feat in stored else feature_stats(real[feat])
            metrics[name] = frechet_distance(*feature_stats(fake[feat]), ref_mu, ref_sigma)
            log.info(
                "%s %.4f (reference statistics %s)",
                name,
                metrics[name],
                "stored" if feat in stored else "computed",
            )
    metrics["is"], metrics["is_std"] = inception_score(fake["logits"], settings["is_split_size"])
    metrics["precision"], metrics["recall"] = precision_recall(
        real["pool"], fake["pool"], k=settings["prc_k"], batch_size=settings["prc_batch_size"], device=device
    )
    if labels is not None:
        metrics["class_accuracy"] = class_accuracy(fake["logits"], labels)
    return metrics
