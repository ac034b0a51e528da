"""AutoencoderKL equals diffusers' PyTorch AutoencoderKL, and loads every published layout.

diffusers builds a tiny 3-level VAE from a config, adds N(0, 0.02) noise to every weight and
`save_pretrained`s it; jaxdiff loads the folder. Tolerance: max |ours − torch| ≤ 1e-4 · max |torch|
(float32; observed ~1e-6).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from helpers import nhwc, perturb, rel_err
from jaxdiff.models.autoencoder_kl import (AutoencoderKLConfig, DiagonalGaussianDistribution,
                                           decode_dtype, load_autoencoder_kl, scale_latents,
                                           unscale_latents)

RTOL = 1e-4
CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
              layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.13025)


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = perturb(AutoencoderKL(**CONFIG).eval())
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def images():
    # 20×28: odd multiples of the 4× factor, so the encoder's asymmetric padding matters
    return np.random.default_rng(0).uniform(-1, 1, size=(2, 20, 28, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ours(torch_vae):
    vae, params = load_autoencoder_kl(torch_vae[1], subfolder=None)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    return vae, params, encode, decode


def test_encode_matches_diffusers(torch_vae, ours, images):
    model, _ = torch_vae
    _, params, encode, _ = ours
    with torch.no_grad():
        want = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    got = encode(params, images)
    assert got.mean.shape == (2, 5, 7, 4)
    assert rel_err(got.mean, nhwc(want.mean)) < RTOL
    assert rel_err(got.logvar, nhwc(want.logvar)) < RTOL


def test_decode_matches_diffusers(torch_vae, ours):
    model, _ = torch_vae
    _, params, _, decode = ours
    z = np.random.default_rng(1).normal(size=(2, 5, 7, 4)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample)
    got = decode(params, z)
    assert got.shape == (2, 20, 28, 3) and got.dtype == jnp.float32
    assert rel_err(got, want) < RTOL


def test_old_attention_names_with_conv_shaped_weights_load(torch_vae, ours, tmp_path):
    """Early PyTorch SD VAEs name the mid-block attention query/key/value/proj_attn and some store
    them as 1×1 convolutions (C, C, 1, 1); they load onto the same parameters."""
    model, folder = torch_vae
    _, params, _, _ = ours
    state = {}
    for k, v in W.iter_safetensors(folder / "diffusion_pytorch_model.safetensors"):
        v = np.array(v)
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        state[k] = v
    assert any(".query.weight" in k and state[k].ndim == 4 for k in state)
    W.save_safetensors(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, old = load_autoencoder_kl(tmp_path, subfolder=None)
    flat_new, flat_old = W.flatten(params), W.flatten(old)
    assert flat_new.keys() == flat_old.keys()
    for k in flat_new:
        np.testing.assert_array_equal(flat_new[k], flat_old[k], err_msg="/".join(k))


def test_flax_msgpack_and_safetensors_fixtures_agree(fixtures_dir):
    """The old Flax VAE (query/key/value/proj_attn names) and its PyTorch twin."""
    _, flax_params = load_autoencoder_kl(fixtures_dir / "tiny-sd-flax-v1")
    _, pt_params = load_autoencoder_kl(fixtures_dir / "tiny-sd-pt-v1")
    flat_f, flat_p = W.flatten(flax_params), W.flatten(pt_params)
    assert flat_f.keys() == flat_p.keys()
    for k in flat_f:
        np.testing.assert_array_equal(flat_f[k], flat_p[k], err_msg="/".join(k))


def test_posterior_sampling_and_kl_follow_the_gaussian():
    mean = jnp.full((4, 8, 8, 4), 0.5)
    logvar = jnp.full((4, 8, 8, 4), np.log(0.25))
    dist = DiagonalGaussianDistribution(mean, logvar)
    z = dist.sample(jax.random.key(0))
    assert abs(float(z.mean()) - 0.5) < 0.03 and abs(float(z.std()) - 0.5) < 0.03
    assert jnp.array_equal(dist.mode(), mean)
    want_kl = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25)) * 8 * 8 * 4
    np.testing.assert_allclose(dist.kl(), want_kl, rtol=1e-5)
    clipped = DiagonalGaussianDistribution.from_moments(jnp.concatenate([mean, jnp.full_like(mean, 50.0)], -1))
    assert float(clipped.logvar.max()) == 20.0  # diffusers clamps logvar to [-30, 20]


def test_scaling_and_force_upcast():
    config = AutoencoderKLConfig(scaling_factor=0.5, shift_factor=0.1)
    z = jnp.arange(4.0)
    np.testing.assert_allclose(scale_latents(config, z), (z - 0.1) * 0.5)
    np.testing.assert_allclose(unscale_latents(config, scale_latents(config, z)), z, atol=1e-6)
    assert decode_dtype(AutoencoderKLConfig(force_upcast=True), jnp.bfloat16) == jnp.float32
    assert decode_dtype(AutoencoderKLConfig(force_upcast=False), jnp.bfloat16) == jnp.bfloat16


def test_bfloat16_decode_stays_close_to_float32(torch_vae, ours):
    vae, params, _, decode = ours
    from jaxdiff.models.autoencoder_kl import AutoencoderKL

    z = np.random.default_rng(2).normal(size=(1, 5, 7, 4)).astype(np.float32)
    want = decode(params, z)
    vae16 = AutoencoderKL(vae.config, dtype=jnp.bfloat16)
    got = jax.jit(lambda p, z: vae16.apply({"params": p}, z, method=vae16.decode))(params, z)
    assert rel_err(got, want) < 0.05


def test_unsupported_config_raises_one_clear_error():
    with pytest.raises(JaxdiffError, match="AttnDownEncoderBlock2D"):
        AutoencoderKLConfig.from_dict(dict(CONFIG, down_block_types=["AttnDownEncoderBlock2D"] * 3))
