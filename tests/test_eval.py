"""The sample-quality measures the MNIST benchmarks report: per-class diversity."""
import numpy as np
import pytest

from jaxdiff.data.mnist import load_mnist
from jaxdiff.eval.diversity import diversity_ratios, mean_pairwise_distance, per_class_diversity


def test_mean_pairwise_distance_is_the_mean_over_all_pairs():
    x = np.random.default_rng(0).uniform(size=(6, 4, 4, 1))
    brute = [np.linalg.norm(x[i] - x[j]) for i in range(6) for j in range(i + 1, 6)]
    assert mean_pairwise_distance(x) == pytest.approx(np.mean(brute), rel=1e-9)
    with pytest.raises(ValueError):
        mean_pairwise_distance(x[:1])


def test_copies_have_no_diversity_and_real_digits_match_real_digits(mnist_dir):
    data = load_mnist(mnist_dir, use_hf=False, verbose=False)
    rng = np.random.default_rng(1)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), 10, replace=False) for c in range(10)])
    labels = data.labels[idx]
    real = diversity_ratios(data.images[idx], labels, data.images, data.labels)
    assert sorted(real) == list(range(10))
    assert 0.8 < min(real.values()) and max(real.values()) < 1.2  # 10 real digits vs all: about 1
    copies = np.repeat(data.images[idx[::10]], 10, axis=0)        # one image per class, 10 times
    assert max(diversity_ratios(copies, labels, data.images, data.labels).values()) < 1e-6
    # uint8 and [0, 1] floats are the same images
    as_float = per_class_diversity(data.images[idx].astype(np.float32) / 255.0, labels)
    assert as_float[3] == pytest.approx(per_class_diversity(data.images[idx], labels)[3], rel=1e-6)
