"""Metric math on extracted features: FID/sFID, Inception Score, Precision/Recall, class accuracy.

The formulas are torch-fidelity 0.4.0's own (``metric_fid``, ``metric_isc``, ``metric_prc``), called on
features extracted once per image set, so one forward pass serves every metric. They match the ADM
evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) as follows:
- FID: ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2)``; the trace of the square root is summed from
  the eigenvalues of ``S1 S2`` (ADM takes ``scipy.linalg.sqrtm``: the same number up to rounding).
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` per split, on the softmax of the logits *without* the fc bias (ADM's
  ``softmax/logits/MatMul``). Splits as ADM's: consecutive parts of 5,000 samples (10 for 50k; one below
  5,000; the last part may be shorter), so a 10k quick check is comparable too. Unlike ADM the samples are
  shuffled first (a fixed permutation): in file order a class-ordered sample file would give each split only
  a tenth of the classes.
- Precision/Recall: k-NN manifolds (k = 3, the point itself counted as its 0-th neighbour); precision is the
  fraction of samples inside some reference ball, recall the fraction of references inside some sample ball.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed: the split assignment is fixed and reproducible


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N >= 2, D) array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return out[KEY_METRIC_FID]


def inception_score(
    logits: np.ndarray, split_size: int = 5000, seed: int = IS_SHUFFLE_SEED
) -> tuple[float, float]:
    """Mean and std over ADM's splits (consecutive parts of ``split_size`` after a fixed shuffle) of
    exp(E KL(p(y|x) || p(y))), p = softmax(logits (N, C))."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"inception score needs (N >= 1, C) logits, got shape {logits.shape}")
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # (N, C)
    p = p[np.random.RandomState(seed).permutation(len(p))]
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]  # (n, C)
        kl = part * (np.log(part, where=part > 0, out=np.zeros_like(part)) - np.log(part.mean(axis=0)))
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = 3, batch_size: int = 10000, device: str = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples (N, D) against reference (M, D)."""
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(
            f"precision/recall needs (N, D) features of one D, got {reference.shape} and {samples.shape}"
        )
    if min(len(reference), len(samples)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set")
    fake = torch.from_numpy(np.ascontiguousarray(samples, np.float32)).to(device)
    real = torch.from_numpy(np.ascontiguousarray(reference, np.float32)).to(device)
    # torch-fidelity's order: generated first, real second; save_cpu_ram keeps memory O(batch * N)
    out = prc_features_to_metric(
        fake, real, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax class is their conditioning label."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"class accuracy needs logits (N, C) and labels (N,), got {logits.shape}, {labels.shape}"
        )
    return float(np.mean(logits.argmax(axis=1) == labels))
