"""Feature statistics, the Frechet distance and the Inception Score, as ADM's evaluator computes them.

FID uses float64 means and covariances (np.cov with ddof=1) and scipy's matrix square root; the
Inception Score is exp(E[KL(p(y|x) || p(y))]) averaged over consecutive splits of 5,000 samples.
Statistics of large sets are accumulated batch by batch (float64 sums), so 50,000 x 2048
features never need to be in one place to get their mean and covariance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import linalg

ADM_IS_SPLIT_SIZE = 5000


@dataclass
class FeatureStatistics:
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    count: int


class RunningStatistics:
    """Mean and covariance of feature batches, accumulated in float64; ``merge`` combines partials."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.total = np.zeros(self.dim, dtype=np.float64)
        self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> "RunningStatistics":
        features = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.outer += features.T @ features
        return self

    def merge(self, other: "RunningStatistics") -> "RunningStatistics":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim}-d features into {self.dim}-d ones")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def result(self) -> FeatureStatistics:
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return FeatureStatistics(mu=mu, sigma=sigma, count=self.count)


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    """Mean and (ddof=1) covariance of features [N, D], in float64 (ADM: np.mean, np.cov)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need features [N >= 2, D], got shape {features.shape}")
    return FeatureStatistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), count=features.shape[0])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as in ADM's evaluator.

    Works on stored reference statistics (ADM's ``mu``/``sigma``) as well as fresh ones.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "both sides must come from the same feature extractor"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular covariances (e.g. dead ReLU features) warn here; the result is checked below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            # Regularise the diagonal and retry, as ADM's evaluator does.
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"the covariance square root has an imaginary part of {largest:.3g}; the statistics are "
                "degenerate (too few samples for the feature dimension?)"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over consecutive splits of ``split_size``, averaged (ADM).

    ``logits`` are pre-softmax class scores [N, K] (Inception: the unbiased 1008-way logits).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score needs logits [N, K], got shape {logits.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    scores = []
    for start in range(0, len(probs), split_size):
        part, log_part = probs[start : start + split_size], log_probs[start : start + split_size]
        log_marginal = np.log(part.mean(axis=0, keepdims=True))
        kl = (part * (log_part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def class_accuracy(logits: np.ndarray, labels: Optional[np.ndarray]) -> Optional[float]:
    """Fraction of samples whose argmax class equals their label (None without labels)."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    logits = np.asarray(logits)
    if len(labels) != len(logits):
        raise ValueError(f"got {len(labels)} labels for {len(logits)} samples")
    return float((logits.argmax(axis=1) == labels).mean())
