"""Metric math against closed forms and independent numpy/scipy computations on synthetic features."""

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.special import softmax

from ccalign.metrics.fidelity import (
    IS_SHUFFLE_SEED,
    class_accuracy,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_feature_set_against_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 64)) * 3 + 1
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_of_diagonal_gaussians_equals_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.5, 3, 16), rng.uniform(0.5, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_full_gaussians_equals_sqrtm_formula():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = _spd(rng, 32), _spd(rng, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_from_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2 + 1  # N(1, 4 I): FID = 4 * 1 + 4 * (2 - 1)^2 = 8
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(8.0, rel=0.03)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's evaluator (guided-diffusion evaluations/evaluator.py), independently: softmax, then consecutive
    parts of ``split_size`` rows in file order, exp of the mean KL to the part's marginal, mean over parts."""
    preds = softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


@pytest.mark.parametrize("n", [50_000, 10_000, 4_999, 50])
def test_inception_score_splits_as_adm_after_a_fixed_shuffle(n):
    logits = np.random.default_rng(4).normal(size=(n, 10)).astype(np.float32) * 3
    shuffled = logits[np.random.RandomState(IS_SHUFFLE_SEED).permutation(n)]
    mean, std = inception_score(logits)
    assert mean == pytest.approx(_adm_inception_score(shuffled), rel=1e-9)
    parts = -(-n // 5000)  # 10 splits for 50k; one below 5,000
    assert (std == 0.0) == (parts == 1)
    assert inception_score(logits, split_size=n)[0] == pytest.approx(
        _adm_inception_score(logits, n), rel=1e-9
    )


def test_a_class_ordered_file_is_shuffled_before_splitting():
    n, c = 50_000, 1000
    logits = np.full((n, c), -30.0, np.float32)
    logits[np.arange(n), np.arange(n) // 50] = 30.0  # ADM's layout: 50 samples of each class, in order
    mean, _ = inception_score(logits)
    assert mean > 850  # each split of 5,000 sees most of the classes, about 5 samples each
    assert _adm_inception_score(logits) == pytest.approx(100, rel=1e-3)  # in file order: 100 per split


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = np.full((1000, 10), -50.0, np.float32)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0
    mean, _ = inception_score(logits)
    assert mean == pytest.approx(10.0, rel=1e-6)  # one split of all 1000


def test_inception_score_needs_logits():
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.zeros((0, 3), np.float32))


def _precision_recall_scipy(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    r_real = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)  # (N_fake, N_real)
    precision = np.mean((d <= r_real[None, :]).any(axis=1))
    recall = np.mean((r_fake[None, :] >= d.T).any(axis=1))
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_scipy(k):
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(257, 16)) * 0.7 + 0.4).astype(np.float32)
    precision, recall = precision_recall(real, fake, k=k, batch_size=100)
    ref_p, ref_r = _precision_recall_scipy(real.astype(np.float64), fake.astype(np.float64), k)
    assert precision == pytest.approx(ref_p, abs=1e-6)  # float32 means; one sample is 1/257
    assert recall == pytest.approx(ref_r, abs=1e-6)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0


def test_precision_recall_of_a_set_with_itself_is_one():
    feats = np.random.default_rng(6).normal(size=(50, 8)).astype(np.float32)
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_class_accuracy():
    logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    assert class_accuracy(logits, np.array([0, 1, 2, 0, 0])) == pytest.approx(0.8)
