"""The mathematics of FID, KID and precision/recall on feature vectors (float64 numpy).

* FID (Heusel et al. 2017): ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians
  fitted to two feature sets.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (as NVIDIA's ``kernel_inception_distance``).
* Precision and recall (Kynkaanniemi et al. 2019): a sample of one set is covered by the other
  set's manifold when it lies within the k-th-nearest-neighbour radius of one of its points.
"""
from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``features`` ``[N, D]`` (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2).

    ``Tr((S1 S2)^(1/2))`` is computed as ``Tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: the two matrices are
    similar, and the second is symmetric positive semi-definite, so its square root comes from a
    symmetric eigendecomposition, which stays real and stable where ``sqrtm(S1 S2)`` may not.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size,) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def fid_from_features(features1, features2) -> float:
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def kernel_inception_distance(real, fake, num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> float:
    """KID: the mean over subsets of the unbiased MMD^2 with ``k(x, y) = (x.y/d + 1)^3``."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [N, D] with the same D, got {real.shape}, {fake.shape}")
    if int(num_subsets) != num_subsets or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    if int(max_subset_size) != max_subset_size or max_subset_size < 2:
        raise ValueError(f"max_subset_size must be an integer of at least 2, got "
                         f"{max_subset_size!r}")
    dim = real.shape[1]
    m = min(real.shape[0], fake.shape[0], int(max_subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {real.shape[0]}, {fake.shape[0]}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        within = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        across = (x @ y.T / dim + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - across.sum() * 2 / m
    return float(total / num_subsets / m)


def _kth_neighbour_radii(points: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    radii = []
    for start in range(0, points.shape[0], batch):
        dist = torch.cdist(points[start:start + batch], points)
        # the k+1-th smallest because each point is its own nearest neighbour at distance 0
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, probes: torch.Tensor, batch: int) -> float:
    covered = []
    for start in range(0, probes.shape[0], batch):
        dist = torch.cdist(probes[start:start + batch], manifold)
        covered.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(covered).double().mean().item()


def precision_recall(real, fake, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision (fake covered by the real manifold) and recall (real covered by fake)."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [N, D] with the same D, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    if int(k) != k or k < 1 or int(batch) != batch or batch < 1:
        raise ValueError(f"k and batch must be positive integers, got k={k!r}, batch={batch!r}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _coverage(real, _kth_neighbour_radii(real, k, batch), fake, batch)
    recall = _coverage(fake, _kth_neighbour_radii(fake, k, batch), real, batch)
    return precision, recall
