"""Flax `UNet2DModel`: diffusers' unconditional / class-conditional UNet, NHWC, same config keys
and parameter names, so diffusers folders load without torch (`load_unet_2d`) and export back
(`save_unet_2d`).

    module, params = load_unet_2d("google/ddpm-cat-256")          # a local folder
    eps = module.apply({"params": params}, x_t, t)                  # x_t: (B, H, W, C), t: () or (B,)
    module = UNet2DModel(UNet2DConfig(sample_size=32, in_channels=1, out_channels=1))
    params = init_params(module, jax.random.key(0))

`dtype` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay as given (float32 by
default). Time embeddings are always computed in float32.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.config import diffusers_dict, freeze_fields, known_keys
from jaxdiff.models.layers import (GaussianFourierProjection, GroupNorm, TimestepEmbedding,
                                   Timesteps, conv, get_activation)
from jaxdiff.models.unet_2d_blocks import (MID_BLOCKS, RESAMPLE_TYPES, UNetMidBlock2D,
                                           check_down_block_type, check_up_block_type,
                                           get_down_block, get_up_block)
from jaxdiff.weights import find_weights, load_params, read_config, save_model_folder

CLASS_NAME = "UNet2DModel"
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The keys (and defaults) of diffusers' `UNet2DModel` config; checked at construction
    (one clear error per bad value)."""
    sample_size: Optional[int | tuple[int, int]] = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: Optional[int] = 8
    norm_num_groups: Optional[int] = 32
    attn_norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: Optional[str] = None
    num_class_embeds: Optional[int] = None
    num_train_timesteps: Optional[int] = None

    def __post_init__(self):
        freeze_fields(self)
        _validate(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConfig":
        """From a diffusers `config.json` dict. Keys starting with "_" are metadata; other
        unknown keys are ignored with a warning, as diffusers does."""
        return cls(**known_keys(cls, d, warn_unknown=CLASS_NAME))

    def to_dict(self) -> dict:
        """The diffusers `config.json` dict."""
        return diffusers_dict(self, CLASS_NAME)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def has_class_embedding(self) -> bool:
        return self.class_embed_type is not None or self.num_class_embeds is not None

    @property
    def downscale_factor(self) -> int:
        """Height and width must be multiples of this (2 ** downsampling levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def image_size(self) -> Optional[tuple[int, int]]:
        """`sample_size` as (height, width), or None."""
        size = self.sample_size
        return None if size is None else (size, size) if isinstance(size, int) else tuple(size)


class UNet2DModel(nn.Module):
    """diffusers' `UNet2DModel`, built from a `UNet2DConfig`.

    ``__call__(sample, timestep, class_labels=None, train=False)``:
      sample (B, H, W, in_channels), H and W divisible by `config.downscale_factor`;
      timestep: a scalar or (B,) array, int or float (a noise level σ for Fourier embeddings);
      class_labels: (B,) int class ids (`num_class_embeds`), (B,) timesteps-like values
      (`class_embed_type="timestep"`) or (B, time_embed_dim) vectors (`"identity"`).
      Returns (B, H, W, out_channels) in `dtype`. `train=True` enables dropout (needs a
      'dropout' rng).
    """
    config: UNet2DConfig
    dtype: jnp.dtype = jnp.float32

    # ---------------------------------------------------------------- forward
    @nn.compact
    def __call__(self, sample: jax.Array, timestep, class_labels: Optional[jax.Array] = None,
                 train: bool = False) -> jax.Array:
        c = self.config
        deterministic = not train
        batch = self._check_sample(sample)
        sample = jnp.asarray(sample)
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time
        timesteps = _batch_vector(timestep, batch, "timestep")
        if c.time_embedding_type == "fourier":
            time_proj = GaussianFourierProjection(embedding_size=c.block_out_channels[0],
                                                  scale=16, name="time_proj")
        elif c.time_embedding_type == "learned":
            time_proj = _LearnedTimeProjection(c.num_train_timesteps, c.block_out_channels[0],
                                               name="time_proj")
        else:
            time_proj = Timesteps(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        t_emb = time_proj(timesteps).astype(self.dtype)
        emb = TimestepEmbedding(c.time_embed_dim, dtype=self.dtype, name="time_embedding")(t_emb)

        if c.has_class_embedding:
            if class_labels is None:
                raise JaxdiffError("this UNet is class-conditional (class_embed_type="
                                   f"{c.class_embed_type!r}, num_class_embeds="
                                   f"{c.num_class_embeds}); pass class_labels")
            emb = emb + self._class_embedding(class_labels, batch, time_proj).astype(emb.dtype)
        elif class_labels is not None:
            raise JaxdiffError("class_labels given, but this UNet has no class embedding "
                               "(its config sets neither class_embed_type nor num_class_embeds)")

        # 2. pre-process
        sample = conv(c.block_out_channels[0], 3, 1, 1, dtype=self.dtype, name="conv_in")(sample)

        # 3. down
        n_levels = len(c.block_out_channels)
        down_block_res_samples = (sample,)
        output_channel = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            input_channel, output_channel = output_channel, c.block_out_channels[i]
            block = get_down_block(
                block_type, num_layers=c.layers_per_block, in_channels=input_channel,
                out_channels=output_channel, temb_channels=c.time_embed_dim,
                add_downsample=i < n_levels - 1, resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn, resnet_groups=c.norm_num_groups,
                attention_head_dim=c.attention_head_dim, downsample_padding=c.downsample_padding,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                downsample_type=c.downsample_type, dropout=c.dropout, dtype=self.dtype,
                name=f"down_blocks_{i}")
            sample, res_samples = block(sample, emb, deterministic=deterministic)
            down_block_res_samples += res_samples

        # 4. mid
        if c.mid_block_type is not None:
            sample = UNetMidBlock2D(
                in_channels=c.block_out_channels[-1], temb_channels=c.time_embed_dim,
                dropout=c.dropout, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                output_scale_factor=c.mid_block_scale_factor,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                attention_head_dim=c.attention_head_dim, resnet_groups=c.norm_num_groups,
                attn_groups=c.attn_norm_num_groups, add_attention=c.add_attention,
                dtype=self.dtype, name="mid_block")(sample, emb, deterministic=deterministic)

        # 5. up
        reversed_channels = list(reversed(c.block_out_channels))
        output_channel = reversed_channels[0]
        n_res = c.layers_per_block + 1
        for i, block_type in enumerate(c.up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_levels - 1)]
            block = get_up_block(
                block_type, num_layers=n_res, in_channels=input_channel, out_channels=output_channel,
                prev_output_channel=prev_output_channel, temb_channels=c.time_embed_dim,
                add_upsample=i < n_levels - 1, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                resnet_groups=c.norm_num_groups, attention_head_dim=c.attention_head_dim,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                upsample_type=c.upsample_type, dropout=c.dropout, dtype=self.dtype,
                name=f"up_blocks_{i}")
            res_samples = down_block_res_samples[-n_res:]
            down_block_res_samples = down_block_res_samples[:-n_res]
            sample = block(sample, res_samples, emb, deterministic=deterministic)

        # 6. post-process (the output activation is SiLU whatever act_fn says, as in diffusers)
        groups_out = c.norm_num_groups or min(c.block_out_channels[0] // 4, 32)
        sample = GroupNorm(num_groups=groups_out, epsilon=c.norm_eps, dtype=self.dtype,
                           name="conv_norm_out")(sample)
        sample = nn.silu(sample)
        sample = conv(c.out_channels, 3, 1, 1, dtype=self.dtype, name="conv_out")(sample)

        if c.time_embedding_type == "fourier":
            sample = sample / timesteps.astype(jnp.float32).reshape(batch, 1, 1, 1).astype(sample.dtype)
        return sample

    def _class_embedding(self, class_labels, batch: int, time_proj: nn.Module) -> jax.Array:
        c = self.config
        if c.class_embed_type == "identity":
            labels = jnp.asarray(class_labels)
            if labels.ndim == 1:
                labels = labels[None]
            if labels.ndim != 2 or labels.shape[-1] != c.time_embed_dim or labels.shape[0] not in (1, batch):
                raise JaxdiffError(
                    f"class_labels for class_embed_type='identity' must be ({batch}, "
                    f"{c.time_embed_dim}) embedding vectors, got shape {labels.shape}")
            return labels
        labels = _batch_vector(class_labels, batch, "class_labels")
        if c.class_embed_type == "timestep":
            return TimestepEmbedding(c.time_embed_dim, dtype=self.dtype,
                                     name="class_embedding")(time_proj(labels).astype(self.dtype))
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise JaxdiffError(f"class_labels must be integer class ids in [0, {c.num_class_embeds}),"
                               f" got dtype {labels.dtype}")
        return nn.Embed(c.num_class_embeds, c.time_embed_dim, name="class_embedding")(labels)

    def _check_sample(self, sample) -> int:
        c = self.config
        shape = tuple(np.shape(sample))
        if len(shape) != 4:
            raise JaxdiffError(f"sample must be a (batch, height, width, {c.in_channels}) NHWC "
                               f"array, got shape {shape}")
        if shape[-1] != c.in_channels:
            hint = (" (it looks NCHW: move channels last with x.transpose(0, 2, 3, 1))"
                    if shape[1] == c.in_channels else "")
            raise JaxdiffError(f"sample has {shape[-1]} channels in its last axis, but this UNet "
                               f"takes in_channels={c.in_channels}{hint}")
        factor = c.downscale_factor
        if shape[1] % factor or shape[2] % factor:
            raise JaxdiffError(f"sample height and width {shape[1:3]} must be multiples of {factor} "
                               f"(2 ** number of downsampling levels); pad or resize the input")
        return shape[0]


class _LearnedTimeProjection(nn.Module):
    """`time_embedding_type="learned"`: a table of `num_train_timesteps` learned vectors."""
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features))
        return jnp.take(table, jnp.asarray(timesteps).astype(jnp.int32), axis=0)


def _batch_vector(value, batch: int, what: str) -> jax.Array:
    """A scalar, (1,) or (B,) array → (B,), as diffusers broadcasts timesteps."""
    value = jnp.asarray(value)
    if value.ndim == 0:
        value = value[None]
    if value.ndim != 1 or value.shape[0] not in (1, batch):
        raise JaxdiffError(f"{what} must be a scalar or a ({batch},) array for a batch of {batch}, "
                           f"got shape {value.shape}")
    return jnp.broadcast_to(value, (batch,))


# --------------------------------------------------------------------------------------------
# Config validation: one clear error per bad value, at construction time
# --------------------------------------------------------------------------------------------

def _validate(m: UNet2DConfig) -> None:
    n = len(m.block_out_channels)
    if n == 0:
        raise JaxdiffError("block_out_channels is empty; give one channel count per level")
    if len(m.down_block_types) != n or len(m.up_block_types) != n:
        raise JaxdiffError(
            f"down_block_types ({len(m.down_block_types)}), up_block_types "
            f"({len(m.up_block_types)}) and block_out_channels ({n}) must have the same length")
    for t in m.down_block_types:
        check_down_block_type(t)
    for t in m.up_block_types:
        check_up_block_type(t)
    if m.mid_block_type not in MID_BLOCKS:
        raise unknown_choice("mid_block_type", m.mid_block_type, MID_BLOCKS)
    if m.time_embedding_type not in TIME_EMBEDDING_TYPES:
        raise unknown_choice("time_embedding_type", m.time_embedding_type, TIME_EMBEDDING_TYPES)
    if m.time_embedding_type == "learned" and not m.num_train_timesteps:
        raise JaxdiffError("time_embedding_type='learned' needs num_train_timesteps in the config")
    if m.class_embed_type not in CLASS_EMBED_TYPES:
        raise unknown_choice("class_embed_type", m.class_embed_type, CLASS_EMBED_TYPES)
    if m.class_embed_type is None and m.num_class_embeds is not None and m.num_class_embeds < 1:
        raise JaxdiffError(f"num_class_embeds={m.num_class_embeds} must be a positive number of classes")
    for key, value in (("downsample_type", m.downsample_type), ("upsample_type", m.upsample_type)):
        if value not in RESAMPLE_TYPES:
            raise unknown_choice(key, value, RESAMPLE_TYPES)
    if m.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
        raise unknown_choice("resnet_time_scale_shift", m.resnet_time_scale_shift, TIME_SCALE_SHIFTS)
    get_activation(m.act_fn)
    if m.layers_per_block < 1:
        raise JaxdiffError(f"layers_per_block={m.layers_per_block} must be at least 1")
    if not 0.0 <= m.dropout < 1.0:
        raise JaxdiffError(f"dropout={m.dropout} must be in [0, 1)")
    if not isinstance(m.norm_num_groups, int) or m.norm_num_groups < 1:
        raise JaxdiffError(f"norm_num_groups={m.norm_num_groups!r} must be a positive integer "
                           "(diffusers' resnet blocks need it too)")
    for c in m.block_out_channels:
        if c % m.norm_num_groups:
            raise JaxdiffError(f"block_out_channels {list(m.block_out_channels)} must all be "
                               f"divisible by norm_num_groups={m.norm_num_groups}")
    if m.attn_norm_num_groups is not None and m.block_out_channels[-1] % m.attn_norm_num_groups:
        raise JaxdiffError(f"block_out_channels[-1]={m.block_out_channels[-1]} must be divisible "
                           f"by attn_norm_num_groups={m.attn_norm_num_groups}")
    head_dim = m.attention_head_dim
    if head_dim is not None:
        attn_channels = [c for c, t in zip(m.block_out_channels, m.down_block_types) if "Attn" in t]
        attn_channels += [c for c, t in zip(reversed(m.block_out_channels), m.up_block_types) if "Attn" in t]
        if m.mid_block_type is not None and m.add_attention:
            attn_channels.append(m.block_out_channels[-1])
        if head_dim < 1 or any(head_dim > c for c in attn_channels):
            raise JaxdiffError(f"attention_head_dim={head_dim} must be between 1 and the channels of "
                               f"every attention block ({sorted(set(attn_channels))}); null means one head")
    size = m.sample_size
    if size is not None:
        sizes = (size, size) if isinstance(size, int) else tuple(size)
        factor = 2 ** (n - 1)
        if len(sizes) != 2 or any(s % factor for s in sizes):
            raise JaxdiffError(f"sample_size={size!r} must be (a pair of) multiples of {factor}")


# --------------------------------------------------------------------------------------------
# Loading and saving diffusers folders
# --------------------------------------------------------------------------------------------

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _legacy_rename(key: str) -> str:
    """Names of checkpoints saved before diffusers 0.15 (old `AttentionBlock`, Fourier `W`) →
    current names, as diffusers' `_fix_state_dict_keys_on_load` does."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES and "attentions" in parts:
        parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
    elif parts == ["time_proj", "W"]:
        parts = ["time_proj", "weight"]
    return ".".join(parts)


def dummy_inputs(config: UNet2DConfig, batch: int = 1) -> tuple:
    """(sample, timestep, class_labels) of the right shapes and dtypes, for `init`."""
    h, w = config.image_size or (config.downscale_factor,) * 2
    sample = jnp.zeros((batch, h, w, config.in_channels), jnp.float32)
    timestep = jnp.ones((batch,), jnp.float32)
    labels = None
    if config.class_embed_type == "identity":
        labels = jnp.zeros((batch, config.time_embed_dim), jnp.float32)
    elif config.class_embed_type == "timestep":
        labels = jnp.ones((batch,), jnp.float32)
    elif config.num_class_embeds is not None:
        labels = jnp.zeros((batch,), jnp.int32)
    return sample, timestep, labels


def param_shapes(module: UNet2DModel, param_dtype=jnp.float32) -> dict:
    """The module's parameter tree as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *dummy_inputs(module.config)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), shapes["params"])


def init_params(module: UNet2DModel, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Freshly initialised parameters (the 'params' collection), built by one jitted init."""
    params = jax.jit(lambda k: module.init(k, *dummy_inputs(module.config))["params"])(key)
    return jax.tree.map(lambda p: p.astype(param_dtype), params)


def load_unet_2d(folder: str | os.PathLike, *, subfolder: Optional[str] = "unet", dtype=jnp.float32,
                 param_dtype=jnp.float32, variant: Optional[str] = None,
                 allow_outside_paths: bool = False) -> tuple[UNet2DModel, dict]:
    """A diffusers `UNet2DModel` folder (`config.json` + `diffusion_pytorch_model[.fp16]
    .safetensors`, at `folder` or at `folder/subfolder` of a pipeline) → (module, params).

    `dtype`: compute dtype; `param_dtype`: dtype of the returned parameters (fp16 files are
    upcast to it); `variant`: prefer `diffusion_pytorch_model.<variant>.safetensors`. With no
    variant and no plain weights file, an `fp16` file is used. `allow_outside_paths`: see
    `jaxdiff.weights.find_weights`."""
    path, raw = read_config(folder, subfolder, expect_class=CLASS_NAME)
    module = UNet2DModel(UNet2DConfig.from_dict(raw), dtype=dtype)
    if variant is None:
        try:
            find_weights(path, allow_outside_paths=allow_outside_paths)
        except JaxdiffError:
            if any(path.glob("*.fp16.safetensors")) or any(path.glob("*.fp16.safetensors.index.json")):
                variant = "fp16"
    params = load_params(path, param_shapes(module), variant=variant, torch_rename=_legacy_rename,
                         dtype=param_dtype, allow_outside_paths=allow_outside_paths)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def save_unet_2d(folder: str | os.PathLike, module: UNet2DModel, params: Mapping, *,
                 dtype=np.float32, variant: Optional[str] = None) -> Path:
    """Write `module` and `params` as a diffusers folder (`config.json` +
    `diffusion_pytorch_model[.<variant>].safetensors`) that `UNet2DModel.from_pretrained` loads.
    `dtype=np.float16, variant="fp16"` writes half-precision weights."""
    return save_model_folder(folder, params, param_shapes(module), module.config.to_dict(),
                             dtype=dtype, variant=variant)


__all__ = ["UNet2DConfig", "UNet2DModel", "dummy_inputs", "init_params", "load_unet_2d",
           "param_shapes", "save_unet_2d"]
