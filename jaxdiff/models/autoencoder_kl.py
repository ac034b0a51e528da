"""diffusers' `AutoencoderKL` in Flax: the Stable Diffusion VAE (Rombach et al. 2022).

    vae, params = load_autoencoder_kl("path/to/stable-diffusion")   # the pipeline's vae/ folder
    posterior = vae.apply({"params": params}, images, method=vae.encode)   # images NHWC in [-1, 1]
    latents = scale_latents(vae.config, posterior.sample(key))              # × scaling_factor
    images = vae.apply({"params": params}, unscale_latents(vae.config, latents), method=vae.decode)

Names are diffusers' (`encoder/down_blocks_0/resnets_1/conv1`, `decoder/mid_block/attentions_0/to_q`,
`quant_conv`, `post_quant_conv`). Old checkpoints that name the mid-block attention
`query/key/value/proj_attn` (the diffusers Flax VAE, and early PyTorch SD VAEs, some with 1×1-conv
shaped weights) load through the renames in `load_autoencoder_kl`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.config import diffusers_dict, freeze_fields, known_keys
from jaxdiff.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv
from jaxdiff.models.unet_2d_blocks import UNetMidBlock2D

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The keys and defaults of diffusers' `AutoencoderKL` config."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """From a diffusers `config.json` dict; other keys are ignored."""
        return cls(**known_keys(cls, d))

    def to_dict(self) -> dict:
        """The diffusers `config.json` dict."""
        return diffusers_dict(self, "AutoencoderKL")

    def __post_init__(self):
        freeze_fields(self)
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise unknown_choice("VAE down block type", t, DOWN_BLOCK_TYPES)
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise unknown_choice("VAE up block type", t, UP_BLOCK_TYPES)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise JaxdiffError(f"VAE config: down_block_types, up_block_types and block_out_channels "
                               f"must have the same length ({len(self.down_block_types)}, "
                               f"{len(self.up_block_types)}, {n})")
        if self.latents_mean is not None or self.latents_std is not None:
            raise JaxdiffError("VAE config latents_mean/latents_std (SDXL-style per-channel latent "
                               "normalisation) is not supported by jaxdiff")

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussianDistribution(NamedTuple):
    """The VAE posterior q(z|x): per-element Gaussians, NHWC (B, h, w, latent_channels).
    `logvar` is clipped to [-30, 20] as diffusers does."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussianDistribution":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per sample, (B,)."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class DownEncoderBlock2D(nn.Module):
    """Resnets without time embedding, then a stride-2 conv after a right/bottom pad."""
    in_channels: int
    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    add_downsample: bool = True
    downsample_padding: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                              temb_channels=None, groups=self.resnet_groups, eps=self.resnet_eps,
                              non_linearity=self.resnet_act_fn, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, use_conv=True, out_channels=self.out_channels,
                             padding=self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets without time embedding, then nearest ×2 and a conv."""
    in_channels: int
    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    add_upsample: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                              temb_channels=None, groups=self.resnet_groups, eps=self.resnet_eps,
                              non_linearity=self.resnet_act_fn, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, use_conv=True, out_channels=self.out_channels,
                           dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _mid_block(config: AutoencoderKLConfig, dtype) -> UNetMidBlock2D:
    c = config.block_out_channels[-1]
    return UNetMidBlock2D(c, None, resnet_eps=1e-6, resnet_act_fn=config.act_fn,
                          resnet_groups=config.norm_num_groups, attention_head_dim=c,
                          add_attention=config.mid_block_add_attention, dtype=dtype, name="mid_block")


class Encoder(nn.Module):
    """(B, H, W, in_channels) → (B, H/f, W/f, 2·latent_channels) moments (mean ‖ logvar)."""
    config: AutoencoderKLConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = conv(c.block_out_channels[0], dtype=self.dtype, name="conv_in")(x)
        out_ch = c.block_out_channels[0]
        for i in range(len(c.block_out_channels)):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            x = DownEncoderBlock2D(in_ch, out_ch, num_layers=c.layers_per_block,
                                   resnet_act_fn=c.act_fn, resnet_groups=c.norm_num_groups,
                                   add_downsample=i < len(c.block_out_channels) - 1,
                                   dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = _mid_block(c, self.dtype)(x)
        x = GroupNorm(num_groups=c.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.silu(x)
        return conv(2 * c.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """(B, h, w, latent_channels) → (B, h·f, w·f, out_channels)."""
    config: AutoencoderKLConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        rev = list(reversed(c.block_out_channels))
        x = conv(rev[0], dtype=self.dtype, name="conv_in")(z)
        x = _mid_block(c, self.dtype)(x)
        out_ch = rev[0]
        for i in range(len(rev)):
            prev, out_ch = out_ch, rev[i]
            x = UpDecoderBlock2D(prev, out_ch, num_layers=c.layers_per_block + 1,
                                 resnet_act_fn=c.act_fn, resnet_groups=c.norm_num_groups,
                                 add_upsample=i < len(rev) - 1, dtype=self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = GroupNorm(num_groups=c.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.silu(x)
        return conv(c.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode(images) -> DiagonalGaussianDistribution`, `decode(z) -> images` (float32).

    Images are NHWC in [-1, 1]; z is the *unscaled* latent (see `scale_latents`). `__call__`
    encodes and decodes (the posterior's mode, or a sample with `key`)."""
    config: AutoencoderKLConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), padding="VALID", dtype=self.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), padding="VALID", dtype=self.dtype)

    def encode(self, images: jax.Array) -> DiagonalGaussianDistribution:
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise JaxdiffError(f"VAE images must be NHWC (B, H, W, {self.config.in_channels}), "
                               f"got shape {tuple(images.shape)}")
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise JaxdiffError(f"VAE latents must be NHWC (B, h, w, {self.config.latent_channels}), "
                               f"got shape {tuple(z.shape)}")
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        posterior = self.encode(images)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))


def scale_latents(config: AutoencoderKLConfig, z: jax.Array) -> jax.Array:
    """VAE latent → diffusion latent: (z − shift_factor) · scaling_factor."""
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def unscale_latents(config: AutoencoderKLConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latent → VAE latent: latents / scaling_factor + shift_factor."""
    z = latents / config.scaling_factor
    if config.shift_factor is not None:
        z = z + config.shift_factor
    return z


def tile_sizes(config: AutoencoderKLConfig) -> tuple[int, int]:
    """(latent, image) side of the tiles `decode_tiled` decodes: the config's `sample_size`
    (the image side) and that / the downscale factor, as diffusers' `enable_tiling`."""
    size = config.sample_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(size / config.downscale_factor), size


def decode_tiled(vae: AutoencoderKL, params: dict, z: jax.Array, *,
                 overlap_factor: float = 0.25) -> jax.Array:
    """`vae.decode` of unscaled latents z (B, h, w, C) in overlapping tiles, as diffusers'
    `AutoencoderKL.tiled_decode` (`vae.enable_tiling()`): tiles of `tile_sizes(config)` latent
    pixels every `tile · (1 − overlap_factor)`, each decoded alone (`post_quant_conv` and decoder),
    then in raster order each blended linearly into its (already blended) upper and left
    neighbours over `image_tile · overlap_factor` pixels and cropped to the stride. Tiles of one
    shape are decoded by one `lax.map` (one at a time), so device memory holds one tile's
    activations and the decoded tiles, not a whole-image decoder pass. Latents no larger than a
    tile are decoded whole. Returns (B, H, W, out_channels) float32."""
    latent_tile, sample_tile = tile_sizes(vae.config)
    b, h, w, _ = z.shape

    def decode(tile):
        return vae.apply({"params": params}, tile, method=vae.decode)

    if h <= latent_tile and w <= latent_tile:
        return decode(z)
    stride = int(latent_tile * (1 - overlap_factor))
    blend = int(sample_tile * overlap_factor)
    keep = sample_tile - blend
    rows, cols = range(0, h, stride), range(0, w, stride)
    groups: dict[tuple[int, int], list] = {}
    for a, i in enumerate(rows):
        for c, j in enumerate(cols):
            groups.setdefault((min(latent_tile, h - i), min(latent_tile, w - j)), []).append((a, c, i, j))
    decoded = {}
    for (th, tw), items in groups.items():
        tiles = jnp.stack([z[:, i:i + th, j:j + tw] for _, _, i, j in items])
        out = jax.lax.map(decode, tiles)
        for k, (a, c, _, _) in enumerate(items):
            decoded[a, c] = out[k]
    done, image_rows = {}, []
    for a in range(len(rows)):
        row = []
        for c in range(len(cols)):
            tile = decoded[a, c]
            if a > 0:
                tile = _blend(done[a - 1, c], tile, blend, axis=1)
            if c > 0:
                tile = _blend(done[a, c - 1], tile, blend, axis=2)
            done[a, c] = tile
            row.append(tile[:, :keep, :keep])
        image_rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(image_rows, axis=1)


def _blend(prev: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v (axis 1) / blend_h (axis 2): the first `extent` rows (columns) of
    `tile` fade in linearly from the last ones of `prev`."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    y = np.arange(extent, dtype=np.float64)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w_new = jnp.asarray((y / extent).astype(np.float32).reshape(shape))
    w_old = jnp.asarray((1 - y / extent).astype(np.float32).reshape(shape))
    head = (jax.lax.slice_in_dim(prev, prev.shape[axis] - extent, prev.shape[axis], axis=axis) * w_old
            + jax.lax.slice_in_dim(tile, 0, extent, axis=axis) * w_new)
    return jnp.concatenate([head, jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)], axis=axis)


def decode_dtype(config: AutoencoderKLConfig, dtype) -> jnp.dtype:
    """The dtype the VAE should run in when the rest runs in `dtype`: float32 for a
    `force_upcast` VAE (SD 1.x/2.x: its decoder overflows in half precision, diffusers upcasts
    it), else `dtype`."""
    return jnp.dtype(jnp.float32) if config.force_upcast else jnp.dtype(dtype)


# --------------------------------------------------------------------------------------------
# Parameters and loading
# --------------------------------------------------------------------------------------------

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def _flax_rename(name: str) -> str:
    parts = name.split("/")
    return "/".join(_OLD_ATTENTION.get(p, p) if i == len(parts) - 2 and "attentions_" in name else p
                    for i, p in enumerate(parts))


def _torch_rename(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION and ".attentions." in name:
        parts[-2] = {"proj_attn": "to_out.0"}.get(parts[-2], _OLD_ATTENTION[parts[-2]])
    return ".".join(parts)


def _dummy_images(config: AutoencoderKLConfig):
    size = config.downscale_factor
    return jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)


def param_shapes(module: AutoencoderKL, param_dtype=jnp.float32) -> dict:
    shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), _dummy_images(module.config))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), shapes["params"])


def init_params(module: AutoencoderKL, key: jax.Array, param_dtype=jnp.float32) -> dict:
    x = jnp.zeros(_dummy_images(module.config).shape, jnp.float32)
    params = jax.jit(lambda k: module.init(k, x)["params"])(key)
    return jax.tree.map(lambda p: p.astype(param_dtype), params)


VAE_CLASSES = ("AutoencoderKL",)


def load_autoencoder_kl(folder: str | os.PathLike, *, subfolder: str | None = "vae", dtype=jnp.float32,
                        param_dtype=None, variant: str | None = None,
                        allow_outside_paths: bool = False) -> tuple[AutoencoderKL, dict]:
    """`(module, params)` from a diffusers `AutoencoderKL` folder (or a pipeline's `vae/`),
    safetensors (current or old attention names) or the old Flax msgpack.
    `allow_outside_paths`: see `jaxdiff.weights.find_weights`."""
    path, raw = W.read_config(folder, subfolder, expect_class=VAE_CLASSES)
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(raw), dtype=dtype)
    param_dtype = param_dtype or dtype
    params = W.load_params(path, param_shapes(module, param_dtype), variant=variant, dtype=param_dtype,
                           torch_rename=_torch_rename, flax_rename=_flax_rename,
                           allow_outside_paths=allow_outside_paths)
    return module, params
