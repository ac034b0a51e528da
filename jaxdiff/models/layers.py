"""Network blocks shared by the UNets and the VAE, with diffusers' parameter names.

NHWC throughout. Each block is the Flax twin of the diffusers class of the same name:
`get_timestep_embedding` / `Timesteps`, `TimestepEmbedding`, `GaussianFourierProjection`,
`ResnetBlock2D`, `Downsample2D`, `Upsample2D`; and `GroupNorm`, a faster drop-in for
`flax.linen.GroupNorm`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import unknown_choice

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.silu,
    "silu": nn.silu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise unknown_choice("activation function", name, ACTIVATIONS) from None


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps → (B, embedding_dim), float32 (as diffusers)."""
    half_dim = embedding_dim // 2
    # The frequencies are constants: computed once in float32 on the host, as torch does.
    exponent = np.float32(-math.log(max_period)) * np.arange(half_dim, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half_dim - downscale_freq_shift))
    emb = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers `Timesteps`)."""
    num_channels: int
    flip_sin_to_cos: bool = True
    downscale_freq_shift: float = 0.0
    scale: float = 1.0

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of log(σ) (diffusers `GaussianFourierProjection`, fixed weights)."""
    embedding_size: int = 256
    scale: float = 1.0
    log: bool = True
    flip_sin_to_cos: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", lambda key, shape: jax.random.normal(key, shape) * self.scale,
                            (self.embedding_size,))
        weight = jax.lax.stop_gradient(weight)
        x = jnp.asarray(x, jnp.float32)
        if self.log:
            x = jnp.log(x)
        x_proj = x[:, None] * weight[None, :] * 2 * math.pi
        if self.flip_sin_to_cos:
            return jnp.concatenate([jnp.cos(x_proj), jnp.sin(x_proj)], axis=-1)
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 → act → linear_2 (diffusers `TimestepEmbedding`)."""
    time_embed_dim: int
    out_dim: Optional[int] = None
    act_fn: str = "silu"
    post_act_fn: Optional[str] = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array) -> jax.Array:
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = get_activation(self.act_fn)(sample)
        sample = nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample


class GroupNorm(nn.Module):
    """Group normalisation over (spatial…, channels-in-group), NHWC or (B, L, C); parameters
    `scale`/`bias` as `flax.linen.GroupNorm`, same float32 statistics (E[x²] − E[x]²).

    Written as per-channel sums followed by one fused affine pass (`x * a + b`, with a and b
    per sample and channel), which XLA on CPU runs ~2× faster than `nn.GroupNorm`'s grouped
    reshape-and-reduce (the UNet2DModel forward gets ~15% faster)."""
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)
        mean = xf.sum(axis=axes).reshape(x.shape[0], g, -1).sum(-1) / count
        mean_sq = jnp.square(xf).sum(axis=axes).reshape(x.shape[0], g, -1).sum(-1) / count
        inv_std = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        a = scale * jnp.repeat(inv_std, c // g, axis=1)  # (B, C)
        b = bias - jnp.repeat(mean, c // g, axis=1) * a
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
        return (xf * a.reshape(shape) + b.reshape(shape)).astype(self.dtype or x.dtype)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | Sequence = 1,
         dtype=jnp.float32, name: Optional[str] = None, use_bias: bool = True) -> nn.Conv:
    """A torch-style Conv2d: symmetric integer padding, NHWC."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   use_bias=use_bias, dtype=dtype, name=name,
                   conv_general_dilated=conv_general_dilated)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` (same values, same gradients) whose input gradient convolves
    with an explicitly transposed kernel.

    Autodiff's input gradient convolves with the kernel's in/out dimensions swapped in the
    dimension numbers; inside a `lax.scan`/`while` body (a sampling loop that differentiates
    through the UNet, e.g. guidance) XLA:CPU keeps that `01oi` kernel layout and falls back to a
    naive loop emitter, ~7x slower than its Eigen convolution. Materialising the transposed
    kernel (tiny next to the activations) keeps every convolution on the fast path."""
    if _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count):
        # A 1×1 convolution is a matmul over channels; XLA:CPU's dot runs it ~2x faster than its
        # convolution (the UNet's conv_shortcut layers), with the same sum over input channels.
        return jax.lax.dot_general(lhs, rhs[0, 0], (((lhs.ndim - 1,), (0,)), ((), ())),
                                   precision=precision, preferred_element_type=preferred_element_type)
    if feature_group_count != 1 or batch_group_count != 1:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    pad = padding if isinstance(padding, str) else tuple(tuple(int(v) for v in p) for p in padding)
    static = (tuple(window_strides), pad, None if lhs_dilation is None else tuple(lhs_dilation),
              None if rhs_dilation is None else tuple(rhs_dilation), dn, precision, preferred_element_type)
    return _conv(static, lhs, rhs)


def _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count) -> bool:
    """A 1×1, stride-1, unpadded, undilated, ungrouped NHWC/HWIO convolution (flax's layout)."""
    if lhs.ndim != 4 or rhs.shape[:2] != (1, 1) or feature_group_count != 1 or batch_group_count != 1:
        return False
    if tuple(window_strides) != (1, 1) or any(d not in (None, (1, 1)) for d in
                                              (None if lhs_dilation is None else tuple(lhs_dilation),
                                               None if rhs_dilation is None else tuple(rhs_dilation))):
        return False
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return False
    elif tuple(tuple(int(v) for v in p) for p in padding) != ((0, 0), (0, 0)):
        return False
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
            and tuple(dn.out_spec) == (0, 3, 1, 2))


def _plain_conv(static, lhs, rhs, dn=None):
    strides, pad, lhs_dilation, rhs_dilation, dn0, precision, preferred = static
    return jax.lax.conv_general_dilated(lhs, rhs, strides, pad, lhs_dilation, rhs_dilation, dn or dn0,
                                        precision=precision, preferred_element_type=preferred)


def _conv(static, lhs, rhs):
    return _conv_nondiff(lhs, rhs, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_nondiff(lhs, rhs, static):
    return _plain_conv(static, lhs, rhs)


def _conv_fwd(lhs, rhs, static):
    return _plain_conv(static, lhs, rhs), (lhs, rhs)


def _conv_bwd(static, residuals, g):
    lhs, rhs = residuals
    dn = static[4]
    o, i = dn.rhs_spec[0], dn.rhs_spec[1]
    rhs_t = jnp.swapaxes(rhs, o, i)  # the same kernel with out/in features swapped in memory
    dn_t = jax.lax.ConvDimensionNumbers(dn.lhs_spec, (i, o) + tuple(dn.rhs_spec[2:]), dn.out_spec)
    _, vjp_lhs = jax.vjp(lambda x: _plain_conv(static, x, rhs_t, dn_t), lhs)
    _, vjp_rhs = jax.vjp(lambda w: _plain_conv(static, lhs, w), rhs)
    return vjp_lhs(g)[0], vjp_rhs(g)[0]


_conv_nondiff.defvjp(_conv_fwd, _conv_bwd)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample_nearest(x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
    """Nearest-neighbour upsampling as torch's F.interpolate: ×2, or to `output_size` (H, W)."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    in_h, in_w = x.shape[1:3]
    out_h, out_w = output_size
    rows = jnp.floor(jnp.arange(out_h) * (in_h / out_h)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(out_w) * (in_w / out_w)).astype(jnp.int32)
    return x[:, rows][:, :, cols]


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv (`use_conv`), or 2×2 average pooling. padding=0 pads right/bottom by one
    first, as the SD VAE encoder does."""
    channels: int
    use_conv: bool = False
    out_channels: Optional[int] = None
    padding: int = 1
    kernel_size: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.use_conv:
            return avg_pool_2x2(x)
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels or self.channels, self.kernel_size, 2, self.padding,
                    dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest ×2 (or to `output_size`), then an optional 3×3 conv."""
    channels: int
    use_conv: bool = False
    out_channels: Optional[int] = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        if self.use_conv:
            x = conv(self.out_channels or self.channels, 3, 1, 1, dtype=self.dtype, name="conv")(x)
        return x


class ResnetBlock2D(nn.Module):
    """diffusers' `ResnetBlock2D`: norm1 → act → conv1 (+ time_emb_proj) → norm2 → act →
    dropout → conv2, plus a 1×1 `conv_shortcut` when channels change; `up`/`down` resample
    both paths (nearest / average pooling) as in the SDE-style UNets."""
    in_channels: int
    out_channels: Optional[int] = None
    temb_channels: Optional[int] = 512
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-6
    non_linearity: str = "swish"
    time_embedding_norm: str = "default"  # "default" | "scale_shift"
    output_scale_factor: float = 1.0
    use_in_shortcut: Optional[bool] = None
    skip_time_act: bool = False
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise unknown_choice("resnet time_embedding_norm", self.time_embedding_norm,
                                 ("default", "scale_shift"))
        out_channels = self.out_channels or self.in_channels
        act = get_activation(self.non_linearity)
        residual = x
        h = GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = act(h)
        if self.up:
            residual, h = upsample_nearest(residual), upsample_nearest(h)
        elif self.down:
            residual, h = avg_pool_2x2(residual), avg_pool_2x2(h)
        h = conv(out_channels, dtype=self.dtype, name="conv1")(h)

        scale_shift = None
        if self.temb_channels is not None and temb is not None:
            t = temb if self.skip_time_act else act(temb)
            width = out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = nn.Dense(width, dtype=self.dtype, name="time_emb_proj")(t)[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = h + t
            else:
                scale_shift = jnp.split(t, 2, axis=-1)
        h = GroupNorm(num_groups=self.groups_out or self.groups, epsilon=self.eps,
                         dtype=self.dtype, name="norm2")(h)
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (1 + scale) + shift
        h = act(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(out_channels, dtype=self.dtype, name="conv2")(h)

        use_shortcut = (self.in_channels != out_channels if self.use_in_shortcut is None
                        else self.use_in_shortcut)
        if use_shortcut:
            residual = conv(out_channels, 1, 1, 0, dtype=self.dtype, name="conv_shortcut")(residual)
        out = residual + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out
