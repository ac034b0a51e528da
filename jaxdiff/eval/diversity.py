"""Diversity of generated images per class: the guard against buying class accuracy with sameness
(high guidance can make every 5 look alike).

The measure is the mean pairwise pixel L2 distance between the images of one class, compared
with the same measure on real images of that class. The mean over all pairs is an unbiased
estimate of the expected distance between two independent draws, so it does not depend on how
many images each side has (10 samples against hundreds of real digits is a fair comparison).
"""
from __future__ import annotations

import numpy as np


def mean_pairwise_distance(images: np.ndarray) -> float:
    """Mean L2 distance over all pairs of `images` (N, ...) as floats in [0, 1]; N ≥ 2."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    if len(x) < 2:
        raise ValueError("mean_pairwise_distance needs at least two images")
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    i, j = np.triu_indices(len(x), 1)
    return float(np.mean(np.sqrt(d2[i, j])))


def _unit(images) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def per_class_diversity(images, labels, classes=None, *, max_per_class: int = 500,
                        seed: int = 0) -> dict[int, float]:
    """{class: mean pairwise distance} of `images` (N, H, W, C; uint8 or floats in [0, 1]) grouped
    by `labels` (N,); at most `max_per_class` images of a class (a fixed random subset) are used."""
    images, labels = _unit(images), np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = {}
    for c in (np.unique(labels) if classes is None else classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        out[int(c)] = mean_pairwise_distance(images[idx])
    return out


def diversity_ratios(samples, sample_labels, real, real_labels) -> dict[int, float]:
    """{class: sample diversity / real diversity} for every class among `sample_labels`."""
    ours = per_class_diversity(samples, sample_labels)
    theirs = per_class_diversity(real, real_labels, classes=list(ours))
    return {c: ours[c] / theirs[c] for c in ours}
