"""What the test files share: NHWC ↔ NCHW at the PyTorch boundary, closeness measures with
stated tolerances, and tree equality. Import as `from helpers import ...` (tests/ is on the path).

Test files never import each other: anything two files need lives here (or in conftest.py when
it is a fixture, or in subprocesses.py for tests that start programs).
"""
from __future__ import annotations

import jax
import numpy as np


def nhwc(t) -> np.ndarray:
    """A PyTorch NCHW tensor (or array) as a numpy NHWC array."""
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return a.transpose(0, 2, 3, 1)


def nchw(a):
    """A numpy/JAX NHWC array as a contiguous PyTorch NCHW tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def rel_err(got, want) -> float:
    """max |got − want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_rel_close(got, want, rtol: float, what: str = "") -> None:
    """Same shape, and max |got − want| ≤ rtol · max |want|."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what} shape {got.shape} != {want.shape}"
    err = rel_err(got, want)
    assert err <= rtol, f"{what} relative error {err:.2e} > {rtol:.0e}".strip()


def assert_close(got, want, rtol: float = 1e-5, what: str = "", scale: float | None = None) -> None:
    """max |got − want| ≤ rtol · max(1, max |want|) (or rtol · `scale`): relative for large
    values, absolute near zero."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what} shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max())) if scale is None else scale
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what} max |diff| {err:.3g} > {rtol:g} x {scale:.3g}".strip()


def assert_trees_equal(a, b) -> None:
    """Same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# Text-to-image fine-tuning: the tiny SD fixture's sizes, a captioned image folder, batches and
# the program's flags (test_text_to_image, test_program_text_to_image, test_distributed)
# ------------------------------------------------------------------------------------------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

RES = 16  # pixels: 8×8 latents with the fixture's 2× VAE
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_caption_folder(folder: Path, n: int = 16, fmt: str = "jsonl", seed: int = 0) -> Path:
    """`n` images of one coloured square each (sizes vary, not square) with captions."""
    import json

    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = list(COLORS)[i % 4]
        w, h = (24, 20) if i % 2 else (20, 28)
        im = np.full((h, w, 3), 245, np.uint8)
        y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
        im[y:y + h // 2, x:x + w // 2] = COLORS[name]
        Image.fromarray(im).save(folder / "images" / f"{i:03d}.png")
        rows.append({"file_name": f"images/{i:03d}.png", "text": f"a {name} square"})
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(
            f"{r['file_name']},{r['text']}\n" for r in rows))
    return folder


def tok_fn(pipe):
    """The pipeline's tokenizer as `tok(strings) -> (n, L) ids`."""
    from jaxdiff.tokenizer import tokenize

    return lambda strings: tokenize(pipe.tokenizer, list(strings), pipe.max_length)


def cached_batch(cache, ids):
    """The cached batch (moments, context) of examples `ids` from the (data, LatentCache) fixture."""
    data, c = cache
    ids = np.asarray(ids)
    b = c.fetch(ids, np.array([data.caption_ids[i][0] for i in ids]))
    return {"moments": b["moments"], "context": b["context"]}


OFFSET_SNR = dict(noise_offset=0.05, snr_gamma=5.0)


def run_args(model_dir, data, out, *extra):
    """train.text_to_image flags for the tiny fixture and a caption folder."""
    return ["--model-dir", str(model_dir), "--train-data", str(data), "--out", str(out),
            "--resolution", str(RES), "--batch-size", "8", "--no-progress", "--log-backend", "jsonl", *extra]


TRAIN = [sys.executable, "-m", "train.text_to_image"]
# The runs compared bit for bit: cached float32 latents, EMA, a checkpoint every 6 steps, kept.
REFERENCE_FLAGS = ["--checkpoint-every", "6", "--lr", "1e-3", "--ema-decay", "0.9", "--cache-latents",
                   "--cache-dtype", "float32", "--no-samples", "--best-metric", "none", "--keep-checkpoints", "5"]


def checkpoint_part(out, step, part="params"):
    """(tree, meta) of one part of RUN's checkpoint at `step`."""
    from jaxdiff.training import Checkpointer

    ckpt = Checkpointer(out / "checkpoints", create=False)
    tree, meta = ckpt.restore_part(step, part)
    ckpt.close()
    return tree, meta


def perturb(torch_model, scale: float = 0.02):
    """Add N(0, scale²) noise to every parameter of a PyTorch model, in place (from torch's
    global generator: seed it first), so no weight is zero and every path matters; returns it."""
    import torch

    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(scale * torch.randn_like(p))
    return torch_model


# ------------------------------------------------------------------------------------------------
# Schedulers and the sampling loop: a deterministic fake model and the trajectory runners that
# drive diffusers' PyTorch scheduler and ours side by side (test_schedulers*, test_sampling)
# ------------------------------------------------------------------------------------------------

TRAJ_SHAPE = (2, 8, 8, 3)  # NHWC
TRAJ_RTOL = 1e-5


def uniform_pattern(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


PATTERN = uniform_pattern(TRAJ_SHAPE, 1)
VAR_PATTERN = uniform_pattern(TRAJ_SHAPE, 2)  # the "predicted variance" half of a learned-variance model


def x_T(seed=0, shape=TRAJ_SHAPE) -> np.ndarray:
    """Unit Gaussian float32 noise (NHWC) from a numpy seed."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# The fake model: out = 0.9 x + 0.1 pattern (1 + t/T), the same float32 ops in both frameworks.
# A learned-variance model appends a variance half: in [-1, 1] for `learned_range`, a positive
# variance for `learned`.
def _variance_half(learned):
    return VAR_PATTERN if learned == "learned_range" else (VAR_PATTERN + 1) * np.float32(0.01)


def fake_torch(x, t, T=1000, learned=None):
    """The fake model on an NCHW torch tensor."""
    import torch

    tt = torch.as_tensor(t).to(torch.float32)
    out = 0.9 * x + 0.1 * nchw(PATTERN) * (1 + tt / T)
    if learned:
        out = torch.cat([out, nchw(_variance_half(learned))], dim=1)
    return out


def fake_jax(x, t, T=1000, learned=None):
    """The fake model on an NHWC JAX array."""
    import jax.numpy as jnp

    out = 0.9 * x + 0.1 * jnp.asarray(PATTERN) * (1 + jnp.asarray(t, jnp.float32) / T)
    if learned:
        out = jnp.concatenate([out, jnp.asarray(_variance_half(learned))], axis=-1)
    return out


def torch_trajectory(dsched, x_T: np.ndarray, *, seed=0, eta=None, learned=None, step_kwargs=None,
                     timesteps=None):
    """Run diffusers' loop; returns (prev_samples, x0_preds or None, noises) as NHWC stacks.
    `noises[i]` is the noise diffusers drew at step i (zeros where it drew none)."""
    import inspect

    import torch

    T = dsched.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    x = nchw(x_T)
    xs, x0s, noises = [], [], []
    timesteps = dsched.timesteps if timesteps is None else timesteps
    for t in timesteps:
        x_in = dsched.scale_model_input(x, t)
        out = fake_torch(x_in, t, T, learned)
        kwargs = dict(step_kwargs or {})
        before = gen.get_state()
        if eta is not None:
            noise = torch.randn(x.shape, generator=gen) if eta > 0 else None
            out_step = dsched.step(out, t, x, eta=eta, variance_noise=noise, **kwargs)
        elif "generator" in inspect.signature(dsched.step).parameters:
            out_step = dsched.step(out, t, x, generator=gen, **kwargs)
        else:
            out_step = dsched.step(out, t, x, **kwargs)
        after = gen.get_state()
        if torch.equal(before, after):
            noises.append(np.zeros(x_T.shape, np.float32))
        else:  # replay the draw diffusers made
            g2 = torch.Generator()
            g2.set_state(before)
            noises.append(nhwc(torch.randn(x.shape, generator=g2)))
        x = out_step.prev_sample
        xs.append(nhwc(x))
        x0 = getattr(out_step, "pred_original_sample", None)
        x0s.append(None if x0 is None else nhwc(x0))
    x0s = None if any(a is None for a in x0s) else np.stack(x0s)
    return np.stack(xs), x0s, np.stack(noises)


def jax_trajectory(sched, state, x_T, noises=None, learned=None):
    """Our loop as one jitted scan, with the noise of each step injected."""
    import jax.numpy as jnp

    T = sched.num_train_timesteps

    @jax.jit
    def run(state, x_T, noises):
        state = sched.init_history(state, x_T.shape)

        def body(carry, inp):
            x, st = carry
            t, z = inp
            out = fake_jax(sched.scale_model_input(st, x, t), t, T, learned)
            o = sched.step(st, out, t, x, noise=z)
            return (o.prev_sample, o.state), (o.prev_sample, o.pred_original_sample)

        _, (xs, x0s) = jax.lax.scan(body, (x_T, state), (state.loop_timesteps, noises))
        return xs, x0s

    xs, x0s = run(state, jnp.asarray(x_T), None if noises is None else jnp.asarray(noises))
    return np.asarray(xs), np.asarray(x0s)


def assert_trajectories(xs, xs_ref, x0s, x0_ref, x0_weight=None, rtol=TRAJ_RTOL):
    """x_{t-1}: |diff| <= rtol * max(1, max|x|). x0: the same bound on |diff| * x0_weight[step]:
    for VP schedulers x0 = (x - sqrt(1-ᾱ) eps) / sqrt(ᾱ) magnifies 1-ulp differences of x_t by
    1/sqrt(ᾱ_t) (160x at t=999), so x0 is compared in the units of x_t (weight sqrt(ᾱ_t))."""
    assert xs.shape == xs_ref.shape, (xs.shape, xs_ref.shape)
    assert np.all(np.isfinite(xs)), "x_{t-1}: non-finite values"
    assert_close(xs, xs_ref, rtol, what="x_{t-1}")
    if x0_ref is not None:
        scale = max(1.0, float(np.abs(xs_ref).max()))
        w = np.ones(len(x0s)) if x0_weight is None else np.asarray(x0_weight, np.float64)
        w = w.reshape((-1,) + (1,) * (x0s.ndim - 1))
        assert np.all(np.isfinite(x0s)), "pred_original_sample: non-finite values"
        assert_close(x0s * w, x0_ref * w, rtol, what="pred_original_sample (x_t units)", scale=scale)


def vp_weight(state) -> np.ndarray:
    """sqrt(ᾱ_t) of each loop step: the x0-to-x_t scale of a VP scheduler."""
    t = np.asarray(state.loop_timesteps).astype(np.int64)
    return np.sqrt(np.asarray(state.alphas_cumprod, np.float64)[t])


# ------------------------------------------------------------------------------------------------
# Depth-to-image: a tiny DPT-hybrid (test_dpt, test_depth)
# ------------------------------------------------------------------------------------------------

DPT_SIZE = 64  # the tiny DPT's input side (BiT stride 16 → a 4×4 token grid)


def build_tiny_dpt(folder: Path | None = None, batch_norm: bool = True):
    """A tiny transformers DPT-hybrid (BiT bottleneck backbone, 4 ViT layers; batch norm in the
    fusion residuals), perturbed so no weight or running statistic is trivial; saved to `folder`
    with `save_pretrained` when given. Seeded from torch's global generator (seed it first)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        is_hybrid=True, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        image_size=DPT_SIZE, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
        backbone_featmap_shape=[1, 64, 4, 4], use_batch_norm_in_fusion_residual=batch_norm,
        backbone_config={"global_padding": "same", "layer_type": "bottleneck", "depths": [1, 1, 2],
                         "hidden_sizes": [16, 32, 64], "embedding_size": 8, "num_groups": 2,
                         "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True})
    model = perturb(DPTForDepthEstimation(config).eval(), 0.05)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.1 * torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.mul_(1 + torch.rand_like(buf))
    if folder is not None:
        model.save_pretrained(folder)
    return model
