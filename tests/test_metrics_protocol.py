"""The evaluation protocol's bookkeeping with a stub feature extractor (no network weights needed)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ccalign.metrics.fidelity import feature_stats
from ccalign.metrics.protocol import ImageSet, evaluate

SETTINGS = {"batch_size": 3, "is_split_size": 5, "prc_k": 3, "prc_batch_size": 100}


class Stub(nn.Module):
    """Pixels as features: pool = 8 values, logits = 5, spatial = 6 per image."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = images.float().flatten(1) / 255  # (B, 3 * H * W)
        return {"pool": f[:, :8], "logits": 4 * f[:, 8:13], "spatial": f[:, 13:19]}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def _pool(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)[:, :8] / 255  # as Stub sees them (NCHW)


def test_metrics_from_computed_and_stored_statistics(tmp_path):
    fake_images, real_images = _images(10, 0), _images(12, 1)
    np.savez(tmp_path / "ref.npz", arr_0=real_images)
    fake, real = ImageSet(Path("fake"), array=fake_images), ImageSet.open(tmp_path / "ref.npz")
    computed = evaluate(fake, real, Stub(), SETTINGS, labels=np.arange(10) % 5)
    assert set(computed) == {"fid", "sfid", "is", "is_std", "precision", "recall", "class_accuracy"}
    assert computed["fid"] > 0 and computed["sfid"] > 0

    mu, sigma = feature_stats(_pool(fake_images))
    np.savez(tmp_path / "ref_stats.npz", arr_0=real_images, mu=mu + 2.0, sigma=sigma)  # pool statistics only
    stored = evaluate(fake, ImageSet.open(tmp_path / "ref_stats.npz"), Stub(), SETTINGS)
    assert stored["fid"] == pytest.approx(8 * 2.0**2)  # the stored statistics, not arr_0's
    assert stored["sfid"] == pytest.approx(computed["sfid"])  # no mu_s/sigma_s stored: computed from arr_0
    assert (stored["precision"], stored["recall"]) == (computed["precision"], computed["recall"])
    ignored = evaluate(
        fake, ImageSet.open(tmp_path / "ref_stats.npz"), Stub(), SETTINGS, use_stored_stats=False
    )
    assert ignored["fid"] == pytest.approx(computed["fid"])


def test_stored_statistics_of_another_dimension_name_the_file(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_images(12, 1), mu=np.zeros(2048), sigma=np.eye(2048))
    fake = ImageSet(Path("fake"), array=_images(10, 0))
    with pytest.raises(
        ValueError,
        match=r"ref.npz: stored mu/sigma have shapes \(2048,\)/\(2048, 2048\) but the "
        r"pool features are 8-d",
    ):
        evaluate(fake, ImageSet.open(path), Stub(), SETTINGS)


def test_labels_outside_the_classes_name_the_samples(tmp_path):
    fake = ImageSet(Path("samples.npz"), array=_images(10, 0))
    with pytest.raises(
        ValueError, match=r"samples.npz: labels span \[0, 5\] but the classifier has 5 classes"
    ):
        evaluate(fake, fake, Stub(), SETTINGS, labels=np.arange(10) % 6)
