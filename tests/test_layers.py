"""Shared blocks (jaxdiff.models.layers / attention) equal diffusers' PyTorch blocks.

Each test builds the diffusers block with random weights, maps its state dict through the real
name/layout conversion (`jaxdiff.weights.torch_state_to_flax`), and compares outputs on the
same input. Tolerance 1e-5 absolute on O(1) activations: float32 round-off of a few layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nhwc
from jaxdiff.models.attention import Attention
from jaxdiff.models.layers import (Downsample2D, GaussianFourierProjection, GroupNorm,
                                   ResnetBlock2D, TimestepEmbedding, Upsample2D,
                                   get_timestep_embedding)
from jaxdiff.weights import torch_state_to_flax

ATOL = 1e-5


def port(torch_module: torch.nn.Module, flax_module, *inputs, **kwargs):
    """(flax output fn, params) with the torch module's weights mapped onto the flax module."""
    shapes = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *inputs, **kwargs))
    seen, state = set(), []
    for k, v in torch_module.state_dict().items():  # aliased modules (Downsample2D's
        if v.data_ptr() not in seen:                 # conv/Conv2d_0) appear twice: keep one,
            seen.add(v.data_ptr())                   # as save_pretrained does
            state.append((k, v.detach().numpy()))
    params = torch_state_to_flax(state, shapes.get("params", {}), source=type(torch_module).__name__)
    return flax_module.apply({"params": params}, *inputs, **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timestep_embedding_matches_diffusers(flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding as ref

    t = np.array([0, 1, 17, 999], np.float32)
    want = ref(torch.from_numpy(t), 33, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = get_timestep_embedding(jnp.asarray(t), 33, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # sin/cos of arguments up to 999: float32 spacing there is 6e-5, so the two libraries' sin
    # (XLA vs SLEEF) may differ by that much; everything below t=100 agrees to 1e-6.
    np.testing.assert_allclose(got, want, atol=6e-5)
    np.testing.assert_allclose(got[:3], want[:3], atol=1e-6)


def test_fourier_projection_and_time_embedding_match_diffusers():
    from diffusers.models.embeddings import GaussianFourierProjection as RefFourier
    from diffusers.models.embeddings import TimestepEmbedding as RefTE

    fourier = RefFourier(embedding_size=8, scale=16)
    sigma = torch.tensor([0.5, 3.0])
    got = port(fourier, GaussianFourierProjection(embedding_size=8, scale=16), jnp.asarray(sigma.numpy()))
    np.testing.assert_allclose(got, fourier(sigma).numpy(), rtol=1e-5, atol=1e-4)

    te = RefTE(16, 32)
    x = torch.randn(3, 16)
    got = port(te, TimestepEmbedding(32), jnp.asarray(x.numpy()))
    np.testing.assert_allclose(got, te(x).detach().numpy(), atol=ATOL)


@pytest.mark.parametrize("shape", [(2, 16, 5, 6), (2, 16, 7)])
def test_group_norm_matches_torch(shape):
    """NCHW images and (B, C, L) sequences, as the UNet and its attention use them; an offset
    mean (3.0) checks the E[x²] − E[x]² statistics stay accurate in float32."""
    ref = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    x = torch.randn(*shape) + 3.0
    channels_last = (0,) + tuple(range(2, len(shape))) + (1,)
    x_last = x.permute(*channels_last).numpy()
    got = port(ref, GroupNorm(num_groups=4, epsilon=1e-6), jnp.asarray(x_last))
    np.testing.assert_allclose(got, ref(x).detach().permute(*channels_last).numpy(), atol=ATOL)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=32, out_channels=32),
    dict(in_channels=32, out_channels=64, time_embedding_norm="scale_shift", output_scale_factor=2.0),
    dict(in_channels=32, out_channels=32, down=True),
    dict(in_channels=32, out_channels=64, up=True, skip_time_act=True),
])
def test_resnet_block_matches_diffusers(kwargs):
    from diffusers.models.resnet import ResnetBlock2D as Ref

    ref = Ref(temb_channels=16, groups=8, eps=1e-5, **kwargs).eval()
    x, temb = torch.randn(2, kwargs["in_channels"], 8, 8), torch.randn(2, 16)
    ours = ResnetBlock2D(temb_channels=16, groups=8, eps=1e-5, **kwargs)
    got = port(ref, ours, jnp.asarray(nhwc(x)), jnp.asarray(temb.numpy()))
    np.testing.assert_allclose(got, nhwc(ref(x, temb)), atol=ATOL)


@pytest.mark.parametrize("use_conv,padding", [(True, 1), (True, 0), (False, 1)])
def test_downsample_matches_diffusers(use_conv, padding):
    from diffusers.models.downsampling import Downsample2D as Ref

    ref = Ref(16, use_conv=use_conv, out_channels=16, padding=padding)
    x = torch.randn(2, 16, 9 if padding == 0 else 8, 8)
    got = port(ref, Downsample2D(16, use_conv=use_conv, padding=padding), jnp.asarray(nhwc(x)))
    np.testing.assert_allclose(got, nhwc(ref(x)), atol=ATOL)


@pytest.mark.parametrize("output_size", [None, (7, 5)])
def test_upsample_matches_diffusers(output_size):
    from diffusers.models.upsampling import Upsample2D as Ref

    ref = Ref(16, use_conv=True)
    x = torch.randn(2, 16, 4, 3)
    got = port(ref, Upsample2D(16, use_conv=True), jnp.asarray(nhwc(x)), output_size)
    np.testing.assert_allclose(got, nhwc(ref(x, output_size=output_size)), atol=ATOL)


def test_spatial_self_attention_matches_diffusers():
    """The UNet2DModel / VAE attention: group norm, residual, rescale, one or more heads."""
    from diffusers.models.attention_processor import Attention as Ref

    ref = Ref(32, heads=4, dim_head=8, rescale_output_factor=2.0, eps=1e-6, norm_num_groups=8,
              residual_connection=True, bias=True, upcast_softmax=True,
              _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 32, 6, 5)
    ours = Attention(32, heads=4, dim_head=8, bias=True, norm_num_groups=8, eps=1e-6,
                     residual_connection=True, rescale_output_factor=2.0)
    got = port(ref, ours, jnp.asarray(nhwc(x)))
    np.testing.assert_allclose(got, nhwc(ref(x)), atol=ATOL)


def test_cross_attention_matches_diffusers():
    from diffusers.models.attention_processor import Attention as Ref

    ref = Ref(32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    got = port(ref, Attention(32, heads=2, dim_head=16), jnp.asarray(x.numpy()), jnp.asarray(ctx.numpy()))
    np.testing.assert_allclose(got, ref(x, ctx).detach().numpy(), atol=ATOL)


@pytest.mark.parametrize("q_shape, kv_len, block_bytes", [
    ((4, 49, 8, 8), 49, 8 << 20),        # one block
    ((3, 30, 5, 16), 30, 30 * 30 * 4 * 4),  # 15 rows in blocks of 4: the last block padded
    ((2, 64, 2, 8), 7, 1),               # cross attention, one row per block
])
def test_cache_blocked_attention_equals_xla_attention_values_and_gradients(q_shape, kv_len, block_bytes,
                                                                          monkeypatch):
    import jaxdiff.models.attention as attention

    monkeypatch.setattr(attention, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    b, t, n, d = q_shape
    q = rng.standard_normal(q_shape).astype(np.float32)
    k, v = (rng.standard_normal((b, kv_len, n, d)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(q_shape).astype(np.float32)
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    want, want_vjp = jax.vjp(reference, q, k, v)
    got, got_vjp = jax.vjp(jax.jit(attention.cache_blocked_attention), q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, w in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, w, atol=2e-5)


def test_cache_blocked_attention_keeps_bfloat16():
    from jaxdiff.models.attention import cache_blocked_attention

    q = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 4, 8)), jnp.bfloat16)
    got = cache_blocked_attention(q, q, q)
    want = jax.nn.dot_product_attention(q, q, q, implementation="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)
