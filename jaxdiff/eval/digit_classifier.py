"""A small CNN that reads MNIST digits: the judge of whether generated digits are the ones asked for.

Trained on MNIST (a held-out slice measures its own accuracy, ~99%) with small random shifts, so
it reads centred and slightly off-centre digits alike. Command line::

    python -m jaxdiff.eval.digit_classifier --samples samples.npz [--data-dir DIR]

prints the fraction of `images` in the npz (N, 28, 28, 1 in [0, 1]) classified as their `labels`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.data.mnist import Dataset, load_mnist
from jaxdiff.errors import JaxdiffError, cli_main

DEFAULT_CACHE = Path.home() / ".cache" / "jaxdiff"


class DigitClassifier(nn.Module):
    """(N, 28, 28, 1) images in [0, 1] → (N, 10) logits."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def _to_unit(images) -> jax.Array:
    images = jnp.asarray(images)
    return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)


def _shift(key, images, max_shift: int = 2):
    """Random translations by up to `max_shift` pixels (zero fill), one per image."""
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
        padded, offsets)


def train_classifier(data: Dataset, *, steps: int = 1000, batch_size: int = 128, lr: float = 1e-3,
                     holdout: int = 1000, seed: int = 0) -> tuple[dict, float]:
    """Train on all but the last `holdout` images (a fixed shuffle); returns (params, accuracy
    on the held-out images)."""
    order = np.random.default_rng(seed).permutation(len(data))
    train_ids, test_ids = order[:-holdout], order[-holdout:]
    images = jnp.asarray(data.images)
    labels = jnp.asarray(data.labels)
    model = DigitClassifier()
    key = jax.random.PRNGKey(seed)
    params = model.init(key, jnp.zeros((1,) + data.image_shape))["params"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, key):
        k_shift, k_drop = jax.random.split(key)
        x = _shift(k_shift, _to_unit(images[ids]))

        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": k_drop})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[ids]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed + 1)
    for i in range(steps):
        ids = rng.choice(train_ids, batch_size, replace=False)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(ids), jax.random.fold_in(key, i))
    accuracy = float(np.mean(classify(params, data.images[test_ids]) == data.labels[test_ids]))
    return params, accuracy


@jax.jit
def _logits(params, images):
    return DigitClassifier().apply({"params": params}, _to_unit(images))


def classify(params, images, batch_size: int = 500) -> np.ndarray:
    """Predicted digits (N,) for uint8 0..255 or float [0, 1] images (N, 28, 28, 1)."""
    images = np.asarray(images)
    out = [np.asarray(jnp.argmax(_logits(params, images[i:i + batch_size]), -1))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def accuracy(params, images, labels) -> float:
    """Fraction of `images` classified as `labels`."""
    return float(np.mean(classify(params, images) == np.asarray(labels)))


def _data_key(data: Dataset) -> str:
    h = hashlib.sha1(data.images.tobytes())
    h.update(data.labels.tobytes())
    return h.hexdigest()[:12]


def load_or_train(data: Dataset, cache_dir: str | Path | None = DEFAULT_CACHE, *,
                  verbose: bool = True) -> tuple[dict, float]:
    """A classifier for `data`, from `cache_dir` when one was trained on the same images before;
    else trained now (about a minute on a CPU) and cached. Returns (params, held-out accuracy)."""
    from flax import serialization

    path = meta_path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"digit_classifier-{_data_key(data)}.msgpack"
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            try:
                template = DigitClassifier().init(jax.random.PRNGKey(0), jnp.zeros((1,) + data.image_shape))["params"]
                params = serialization.from_bytes(template, path.read_bytes())
                return params, float(json.loads(meta_path.read_text())["holdout_accuracy"])
            except Exception as e:  # a damaged cache is retrained, not trusted
                print(f"warning: cached classifier {path} unreadable ({type(e).__name__}); retraining",
                      file=sys.stderr)
    if verbose:
        print("training the digit classifier...", file=sys.stderr)
    params, acc = train_classifier(data)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.to_bytes(params))
        meta_path.write_text(json.dumps({"holdout_accuracy": acc}))
    if verbose:
        print(f"digit classifier: {acc:.1%} on {1000} held-out images", file=sys.stderr)
    return params, acc


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`images` and `labels` from a `sample.mnist --save-array` npz."""
    path = Path(path)
    if not path.is_file():
        raise JaxdiffError(f"no samples file {path}; write one with sample.mnist --save-array")
    try:
        with np.load(path) as f:
            return f["images"], f["labels"]
    except (KeyError, ValueError, OSError) as e:
        raise JaxdiffError(f"{path} is not a samples npz with 'images' and 'labels' ({e})") from None


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="npz with images (N,28,28,1 in [0,1]) and labels (N,)")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder to train the classifier on "
                   "(default: the copy shipped with jaxdiff)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where trained classifiers are kept")
    args = p.parse_args(argv)
    images, labels = load_samples(args.samples)
    params, holdout = load_or_train(load_mnist(args.data_dir, use_hf=False), args.cache_dir)
    predicted = classify(params, images)
    acc = float(np.mean(predicted == labels))
    per_class = {int(c): round(float(np.mean(predicted[labels == c] == c)), 3) for c in np.unique(labels)}
    print(json.dumps({"accuracy": acc, "n": int(len(labels)), "classifier_holdout_accuracy": holdout,
                      "per_class": per_class}))


if __name__ == "__main__":
    main()
