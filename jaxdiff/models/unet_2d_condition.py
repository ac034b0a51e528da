"""diffusers' `UNet2DConditionModel` in Flax: the text-conditioned UNet of Stable Diffusion 1.x/2.x.

    config = UNet2DConditionConfig.from_dict(read_config(folder, "unet")[1])
    unet = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    eps = unet.apply({"params": params}, sample, timestep, encoder_hidden_states)

sample: (B, H, W, in_channels) NHWC latents; timestep: scalar or (B,); encoder_hidden_states:
(B, S, cross_attention_dim) text embeddings. Returns (B, H, W, out_channels) float32.

Parameter names are diffusers' (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`,
`mid_block/resnets_0/conv1`, `time_embedding/linear_1`, ...), so a published `unet/` folder loads
by rule with `jaxdiff.weights.load_params` (see `load_unet_2d_condition`). SD1 and SD2 settings are covered:
`attention_head_dim` int or per-block list (which diffusers reads as the number of heads),
`num_attention_heads`, `use_linear_projection`, `upcast_attention`, `cross_attention_dim`,
`transformer_layers_per_block`, `only_cross_attention`, class embeddings; SDXL's
`addition_embed_type="text_time"` (`add_time_proj` sinusoids of the micro-conditioning time ids,
`add_embedding` on them and the pooled text embedding). Heights and widths
that are not multiples of 2**(levels-1) work as in diffusers (upsamplers get the skip's size).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.config import diffusers_dict, freeze_fields, known_keys
from jaxdiff.models.layers import (GaussianFourierProjection, Timesteps, TimestepEmbedding,
                                   conv, get_activation)
from jaxdiff.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from jaxdiff.models.transformer_2d import Transformer2DModel
from jaxdiff.models.remat import remat_block
from jaxdiff.models.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
DOWN_BLOCK_TYPES = (CROSS_ATTN_DOWN, "DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCK_TYPES = (CROSS_ATTN_UP, "UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ADDITION_EMBED_TYPES = (None, "text_time")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The keys (and defaults) of diffusers' `UNet2DConditionModel` config; defaults are SD1.x's
    except `cross_attention_dim` (1280, as diffusers)."""
    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Optional[int] = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Optional[bool] = None
    cross_attention_norm: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConditionConfig":
        """From a diffusers `config.json` dict (PyTorch or Flax class); other keys are ignored."""
        return cls(**known_keys(cls, d))

    def to_dict(self) -> dict:
        """The diffusers `config.json` dict."""
        return diffusers_dict(self, "UNet2DConditionModel")

    def __post_init__(self):
        freeze_fields(self)
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise JaxdiffError(
                f"UNet config: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({len(self.block_out_channels)}) must have the same length")
        for key in ("only_cross_attention", "attention_head_dim", "num_attention_heads",
                    "cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise JaxdiffError(f"UNet config: {key} has {len(value)} entries for {n} blocks")
        if any(isinstance(v, tuple) for v in self._per_block("transformer_layers_per_block")) \
                and self.reverse_transformer_layers_per_block is None:
            raise JaxdiffError("UNet config: per-layer transformer_layers_per_block needs "
                               "reverse_transformer_layers_per_block (as diffusers requires)")
        unsupported = {
            "dual_cross_attention": (self.dual_cross_attention, False, "not implemented"),
            "attention_type": (self.attention_type, "default", "GLIGEN gated attention is not implemented"),
            "time_cond_proj_dim": (self.time_cond_proj_dim, None, "LCM timestep conditioning is not implemented"),
            "cross_attention_norm": (self.cross_attention_norm, None, "not implemented"),
        }
        for key, (value, ok, why) in unsupported.items():
            if value != ok:
                raise JaxdiffError(f"UNet config {key}={value!r} is not supported by jaxdiff ({why}); "
                                   f"only {key}={ok!r} is")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise JaxdiffError(f"UNet config addition_embed_type={self.addition_embed_type!r} is not "
                               "supported by jaxdiff (Kandinsky / IP-style added embeddings are not "
                               "implemented); only null or 'text_time' (SDXL) is")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None or
                                                        self.projection_class_embeddings_input_dim is None):
            raise JaxdiffError("UNet config: addition_embed_type='text_time' needs "
                               "addition_time_embed_dim and projection_class_embeddings_input_dim")
        if self.encoder_hid_dim_type not in (None, "text_proj"):
            raise JaxdiffError(f"UNet config encoder_hid_dim_type={self.encoder_hid_dim_type!r} is not "
                               "supported; only null or 'text_proj'")
        if self.encoder_hid_dim_type == "text_proj" and self.encoder_hid_dim is None:
            raise JaxdiffError("UNet config: encoder_hid_dim_type='text_proj' needs encoder_hid_dim")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise unknown_choice("resnet_time_scale_shift", self.resnet_time_scale_shift,
                                 ("default", "scale_shift"))
        if self.time_embedding_type not in ("positional", "fourier"):
            raise unknown_choice("time_embedding_type", self.time_embedding_type, ("positional", "fourier"))
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise unknown_choice("class_embed_type", self.class_embed_type, CLASS_EMBED_TYPES)
        if self.class_embed_type in ("projection", "simple_projection") and \
                self.projection_class_embeddings_input_dim is None:
            raise JaxdiffError(f"class_embed_type={self.class_embed_type!r} needs "
                               "projection_class_embeddings_input_dim")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise unknown_choice("down block type", t, DOWN_BLOCK_TYPES)
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise unknown_choice("up block type", t, UP_BLOCK_TYPES)
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise unknown_choice("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
        for i, (c, heads) in enumerate(zip(self.block_out_channels, self.heads_per_block)):
            uses_transformer = (self.down_block_types[i] == CROSS_ATTN_DOWN
                                or self.up_block_types[-1 - i] == CROSS_ATTN_UP)
            if uses_transformer and (heads is None or c % heads):
                raise JaxdiffError(f"UNet config: block {i} has {c} channels, not divisible into "
                                   f"{heads} attention heads (attention_head_dim / num_attention_heads)")

    # ---- per-block values, as diffusers expands them ------------------------------------------

    def _per_block(self, key: str) -> tuple:
        value = getattr(self, key)
        return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple:
        """Attention heads of each level's transformers: `num_attention_heads`, or — diffusers'
        historical naming — `attention_head_dim`."""
        return self._per_block("num_attention_heads" if self.num_attention_heads is not None
                               else "attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        if self.time_embedding_type == "fourier":
            return self.time_embedding_dim or self.block_out_channels[0] * 2
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1


# --------------------------------------------------------------------------------------------
# Cross-attention blocks
# --------------------------------------------------------------------------------------------

def _layers(value, num_layers: int) -> tuple:
    """transformer_layers_per_block of one block: an int for every layer, or one per layer."""
    return value if isinstance(value, tuple) else (value,) * num_layers


class _CrossAttnMixin:
    def _transformer(self, channels: int, num_layers: int, name: str) -> Transformer2DModel:
        return Transformer2DModel(
            channels, self.num_attention_heads, channels // self.num_attention_heads,
            num_layers=num_layers, cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.resnet_groups, use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention, dropout=0.0, dtype=self.dtype, name=name)

    def _resnet(self, in_channels: int, out_channels: int, name: str) -> ResnetBlock2D:
        return remat_block(ResnetBlock2D)(in_channels, out_channels, temb_channels=self.temb_channels,
                             groups=self.resnet_groups, eps=self.resnet_eps,
                             non_linearity=self.resnet_act_fn,
                             time_embedding_norm=self.resnet_time_scale_shift,
                             output_scale_factor=self.output_scale_factor, dropout=self.dropout,
                             dtype=self.dtype, name=name)


class CrossAttnDownBlock2D(_CrossAttnMixin, nn.Module):
    """(resnet → Transformer2DModel) × num_layers, then a stride-2 conv (diffusers'
    `CrossAttnDownBlock2D`). Returns (hidden_states, skip connections)."""
    in_channels: int
    out_channels: int
    temb_channels: Optional[int]
    num_layers: int = 1
    transformer_layers_per_block: Any = 1
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    downsample_padding: int = 1
    add_downsample: bool = True
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, temb, encoder_hidden_states, deterministic: bool = True):
        layers = _layers(self.transformer_layers_per_block, self.num_layers)
        output_states = ()
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._resnet(in_channels, self.out_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
            hidden_states = self._transformer(self.out_channels, layers[i], f"attentions_{i}")(
                hidden_states, encoder_hidden_states, deterministic)
            output_states += (hidden_states,)
        if self.add_downsample:
            hidden_states = Downsample2D(self.out_channels, use_conv=True,
                                         out_channels=self.out_channels,
                                         padding=self.downsample_padding, dtype=self.dtype,
                                         name="downsamplers_0")(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class CrossAttnUpBlock2D(_CrossAttnMixin, nn.Module):
    """(concat skip → resnet → Transformer2DModel) × num_layers, then nearest ×2 (or to
    `upsample_size`) and a conv (diffusers' `CrossAttnUpBlock2D`)."""
    in_channels: int
    out_channels: int
    prev_output_channel: int
    temb_channels: Optional[int]
    num_layers: int = 1
    transformer_layers_per_block: Any = 1
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    add_upsample: bool = True
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, res_hidden_states_tuple: Sequence[jax.Array], temb,
                 encoder_hidden_states, upsample_size=None, deterministic: bool = True):
        layers = _layers(self.transformer_layers_per_block, self.num_layers)
        res = tuple(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip, res = res[-1], res[:-1]
            hidden_states = jnp.concatenate([hidden_states, skip.astype(hidden_states.dtype)], axis=-1)
            res_skip_channels = self.in_channels if i == self.num_layers - 1 else self.out_channels
            resnet_in = self.prev_output_channel if i == 0 else self.out_channels
            hidden_states = self._resnet(resnet_in + res_skip_channels, self.out_channels,
                                         f"resnets_{i}")(hidden_states, temb, deterministic)
            hidden_states = self._transformer(self.out_channels, layers[i], f"attentions_{i}")(
                hidden_states, encoder_hidden_states, deterministic)
        if self.add_upsample:
            hidden_states = Upsample2D(self.out_channels, use_conv=True,
                                       out_channels=self.out_channels, dtype=self.dtype,
                                       name="upsamplers_0")(hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(_CrossAttnMixin, nn.Module):
    """resnet → (Transformer2DModel → resnet) × num_layers (diffusers' `UNetMidBlock2DCrossAttn`)."""
    in_channels: int
    temb_channels: Optional[int]
    num_layers: int = 1
    transformer_layers_per_block: Any = 1
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, temb, encoder_hidden_states, deterministic: bool = True):
        layers = _layers(self.transformer_layers_per_block, self.num_layers)
        c = self.in_channels
        hidden_states = self._resnet(c, c, "resnets_0")(hidden_states, temb, deterministic)
        for i in range(self.num_layers):
            hidden_states = self._transformer(c, layers[i], f"attentions_{i}")(
                hidden_states, encoder_hidden_states, deterministic)
            hidden_states = self._resnet(c, c, f"resnets_{i + 1}")(hidden_states, temb, deterministic)
        return hidden_states


# --------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------

class UNet2DConditionModel(nn.Module):
    """`apply({'params': p}, sample, timestep, encoder_hidden_states, class_labels=None,
    train=False, added_cond_kwargs=None)` → (B, H, W, out_channels) float32. See the module
    docstring. SDXL (`addition_embed_type="text_time"`) needs `added_cond_kwargs={"text_embeds":
    (B, pooled_dim), "time_ids": (B, n_ids)}` (n_ids · addition_time_embed_dim + pooled_dim =
    projection_class_embeddings_input_dim)."""
    config: UNet2DConditionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timestep, encoder_hidden_states: jax.Array,
                 class_labels: Optional[jax.Array] = None, train: bool = False,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
        c = self.config
        det = not train
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise JaxdiffError(f"UNet sample must be NHWC (B, H, W, {c.in_channels}), got shape "
                               f"{tuple(sample.shape)}")
        if encoder_hidden_states.ndim != 3:
            raise JaxdiffError("encoder_hidden_states must be (B, tokens, dim), got shape "
                               f"{tuple(encoder_hidden_states.shape)}")
        batch = sample.shape[0]
        factor = 2 ** c.num_upsamplers
        forward_upsample_size = any(s % factor for s in sample.shape[1:3])

        if c.center_input_sample:
            sample = 2 * sample - 1.0

        # time
        t = jnp.asarray(timestep)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
        t_emb = self._time_proj()(t)
        emb = TimestepEmbedding(c.time_embed_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act,
                                dtype=self.dtype, name="time_embedding")(t_emb.astype(self.dtype))
        class_emb = self._class_embedding(class_labels, batch)
        if class_emb is not None:
            emb = jnp.concatenate([emb, class_emb], -1) if c.class_embeddings_concat else emb + class_emb
        aug_emb = self._addition_embedding(added_cond_kwargs, batch)
        if aug_emb is not None:
            emb = emb + aug_emb
        if c.time_embedding_act_fn is not None:
            emb = get_activation(c.time_embedding_act_fn)(emb)
        temb_channels = c.time_embed_dim * (2 if c.class_embeddings_concat else 1)

        context = encoder_hidden_states.astype(self.dtype)
        if c.encoder_hid_dim_type == "text_proj":
            context = nn.Dense(c.cross_attention_dim, dtype=self.dtype, name="encoder_hid_proj")(context)

        sample = conv(c.block_out_channels[0], c.conv_in_kernel, 1, (c.conv_in_kernel - 1) // 2,
                      dtype=self.dtype, name="conv_in")(sample)

        heads = c.heads_per_block
        head_dims = c._per_block("attention_head_dim")
        cross_dims = c._per_block("cross_attention_dim")
        layers = c._per_block("layers_per_block")
        tlayers = c._per_block("transformer_layers_per_block")
        only_cross = c._per_block("only_cross_attention")
        common = dict(temb_channels=temb_channels, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                      resnet_groups=c.norm_num_groups, dropout=c.dropout,
                      resnet_time_scale_shift=c.resnet_time_scale_shift, dtype=self.dtype)
        attn = dict(use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)

        # down
        skips = (sample,)
        out_ch = c.block_out_channels[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            last = i == len(c.block_out_channels) - 1
            name = f"down_blocks_{i}"
            if kind == CROSS_ATTN_DOWN:
                block = CrossAttnDownBlock2D(
                    in_ch, out_ch, num_layers=layers[i], transformer_layers_per_block=tlayers[i],
                    num_attention_heads=heads[i], cross_attention_dim=cross_dims[i],
                    downsample_padding=c.downsample_padding, add_downsample=not last,
                    only_cross_attention=only_cross[i], name=name, **common, **attn)
                sample, res = block(sample, emb, context, det)
            else:
                block = get_down_block(
                    kind, num_layers=layers[i], in_channels=in_ch, out_channels=out_ch,
                    add_downsample=not last, downsample_padding=c.downsample_padding,
                    attention_head_dim=head_dims[i] if head_dims[i] is not None else out_ch,
                    resnet_skip_time_act=c.resnet_skip_time_act,
                    resnet_out_scale_factor=c.resnet_out_scale_factor, name=name, **common)
                sample, res = block(sample, emb, det)
            skips += res

        # mid
        mid_ch = c.block_out_channels[-1]
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            sample = UNetMidBlock2DCrossAttn(
                mid_ch, transformer_layers_per_block=tlayers[-1], num_attention_heads=heads[-1],
                cross_attention_dim=cross_dims[-1], output_scale_factor=c.mid_block_scale_factor,
                name="mid_block", **common, **attn)(sample, emb, context, det)
        elif c.mid_block_type == "UNetMidBlock2D":
            sample = UNetMidBlock2D(
                mid_ch, temb_channels, dropout=c.dropout, num_layers=0, resnet_eps=c.norm_eps,
                resnet_time_scale_shift=c.resnet_time_scale_shift, resnet_act_fn=c.act_fn,
                resnet_groups=c.norm_num_groups, add_attention=False,
                output_scale_factor=c.mid_block_scale_factor, dtype=self.dtype,
                name="mid_block")(sample, emb, det)

        # up
        rev_ch = list(reversed(c.block_out_channels))
        rev_heads, rev_cross = list(reversed(heads)), list(reversed(cross_dims))
        rev_layers, rev_only_cross = list(reversed(layers)), list(reversed(only_cross))
        rev_tlayers = (list(reversed(tlayers)) if c.reverse_transformer_layers_per_block is None
                       else list(c.reverse_transformer_layers_per_block))
        out_ch = rev_ch[0]
        for i, kind in enumerate(c.up_block_types):
            last = i == len(c.block_out_channels) - 1
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, len(rev_ch) - 1)]
            n = rev_layers[i] + 1
            res, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if (forward_upsample_size and not last) else None
            name = f"up_blocks_{i}"
            if kind == CROSS_ATTN_UP:
                block = CrossAttnUpBlock2D(
                    in_ch, out_ch, prev_ch, num_layers=n, transformer_layers_per_block=rev_tlayers[i],
                    num_attention_heads=rev_heads[i], cross_attention_dim=rev_cross[i],
                    add_upsample=not last, only_cross_attention=rev_only_cross[i], name=name,
                    **common, **attn)
                sample = block(sample, res, emb, context, upsample_size, det)
            else:
                block = get_up_block(
                    kind, num_layers=n, in_channels=in_ch, out_channels=out_ch,
                    prev_output_channel=prev_ch, add_upsample=not last,
                    # diffusers indexes the (not reversed) attention_head_dim here
                    attention_head_dim=head_dims[i] if head_dims[i] is not None else out_ch,
                    resnet_skip_time_act=c.resnet_skip_time_act,
                    resnet_out_scale_factor=c.resnet_out_scale_factor, name=name, **common)
                sample = block(sample, res, emb, upsample_size, det)

        # out
        if c.norm_num_groups is not None:
            sample = GroupNorm(num_groups=c.norm_num_groups, epsilon=c.norm_eps, dtype=self.dtype,
                                  name="conv_norm_out")(sample)
            sample = get_activation(c.act_fn)(sample)
        sample = conv(c.out_channels, c.conv_out_kernel, 1, (c.conv_out_kernel - 1) // 2,
                      dtype=self.dtype, name="conv_out")(sample)
        return sample.astype(jnp.float32)

    def _time_proj(self):
        c = self.config
        if c.time_embedding_type == "fourier":
            return GaussianFourierProjection(c.time_embed_dim // 2, log=False,
                                             flip_sin_to_cos=c.flip_sin_to_cos, name="time_proj")
        return Timesteps(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)

    def _addition_embedding(self, added_cond_kwargs, batch: int):
        """SDXL's `text_time`: add_embedding(concat(text_embeds, sinusoid(time_ids).flatten))."""
        c = self.config
        if c.addition_embed_type is None:
            return None
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs \
                or "time_ids" not in added_cond_kwargs:
            raise JaxdiffError("this UNet has addition_embed_type='text_time' (SDXL): pass "
                               "added_cond_kwargs={'text_embeds': (B, D), 'time_ids': (B, n)}")
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch \
                or time_ids.shape[0] != batch:
            raise JaxdiffError(f"added_cond_kwargs: text_embeds must be ({batch}, D) and time_ids "
                               f"({batch}, n), got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise JaxdiffError(
                f"added_cond_kwargs: text_embeds ({text_embeds.shape[1]}) + {time_ids.shape[1]} time ids "
                f"× {c.addition_time_embed_dim} = {width}, but this UNet's add_embedding takes "
                f"projection_class_embeddings_input_dim={c.projection_class_embeddings_input_dim} "
                "(a refiner takes 5 time ids with the aesthetic score, a base 6)")
        time_embeds = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)(
            time_ids.reshape(-1)).reshape(batch, -1)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], -1)
        return TimestepEmbedding(c.time_embed_dim, dtype=self.dtype,
                                 name="add_embedding")(add_embeds.astype(self.dtype))

    def _class_embedding(self, class_labels, batch: int):
        c = self.config
        kind = c.class_embed_type
        if kind is None and c.num_class_embeds is None:
            return None
        if class_labels is None:
            raise JaxdiffError("this UNet has class embeddings (class_embed_type / num_class_embeds): "
                               "pass class_labels")
        if kind is None:
            labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32).reshape(-1), (batch,))
            return nn.Embed(c.num_class_embeds, c.time_embed_dim, dtype=self.dtype,
                            name="class_embedding")(labels)
        labels = jnp.asarray(class_labels)
        if kind == "timestep":
            labels = Timesteps(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)(
                jnp.broadcast_to(labels.reshape(-1), (batch,)))
            return TimestepEmbedding(c.time_embed_dim, act_fn=c.act_fn, dtype=self.dtype,
                                     name="class_embedding")(labels.astype(self.dtype))
        if kind == "identity":
            return labels.astype(self.dtype)
        if kind == "projection":
            return TimestepEmbedding(c.time_embed_dim, dtype=self.dtype,
                                     name="class_embedding")(labels.astype(self.dtype))
        return nn.Dense(c.time_embed_dim, dtype=self.dtype, name="class_embedding")(labels.astype(self.dtype))


# --------------------------------------------------------------------------------------------
# Parameters and loading
# --------------------------------------------------------------------------------------------

def dummy_inputs(config: UNet2DConditionConfig, batch: int = 1, size: Optional[int] = None,
                 tokens: int = 77) -> tuple:
    """Shape-only inputs (sample, timestep, encoder_hidden_states[, class_labels]) for init."""
    size = size or 2 ** config.num_upsamplers
    context_dim = config.encoder_hid_dim if config.encoder_hid_dim_type == "text_proj" else \
        (config.cross_attention_dim if isinstance(config.cross_attention_dim, int)
         else config.cross_attention_dim[0])
    inputs = (jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32),
              jax.ShapeDtypeStruct((batch,), jnp.int32),
              jax.ShapeDtypeStruct((batch, tokens, context_dim), jnp.float32))
    kind = config.class_embed_type
    if kind is None and config.num_class_embeds is not None:
        inputs += (jax.ShapeDtypeStruct((batch,), jnp.int32),)
    elif kind in ("timestep",):
        inputs += (jax.ShapeDtypeStruct((batch,), jnp.float32),)
    elif kind == "identity":
        inputs += (jax.ShapeDtypeStruct((batch, config.time_embed_dim), jnp.float32),)
    elif kind in ("projection", "simple_projection"):
        inputs += (jax.ShapeDtypeStruct((batch, config.projection_class_embeddings_input_dim), jnp.float32),)
    return inputs


def dummy_added_cond(config: UNet2DConditionConfig, batch: int = 1) -> dict | None:
    """Shape-only `added_cond_kwargs` for init (None unless `addition_embed_type="text_time"`):
    6 time ids (a base; the width of text_embeds makes up the rest)."""
    if config.addition_embed_type != "text_time":
        return None
    n_ids = 6
    pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
    if pooled <= 0:
        n_ids = 5
        pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
    return {"text_embeds": jax.ShapeDtypeStruct((batch, pooled), jnp.float32),
            "time_ids": jax.ShapeDtypeStruct((batch, n_ids), jnp.float32)}


def _init(module: UNet2DConditionModel, key, *inputs):
    added = dummy_added_cond(module.config)
    if added is not None:
        added = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), added)
    return module.init(key, *inputs, added_cond_kwargs=added)


def param_shapes(module: UNet2DConditionModel, param_dtype=jnp.float32) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    return jax.tree.map(lambda s: s, _param_shapes(module.config, jnp.dtype(param_dtype)))  # a fresh tree


@functools.lru_cache(maxsize=32)
def _param_shapes(config: UNet2DConditionConfig, param_dtype) -> dict:
    """Traced once per (config, dtype): tracing an SDXL-sized init takes seconds."""
    module = UNet2DConditionModel(config)
    shapes = jax.eval_shape(lambda *xs: _init(module, jax.random.PRNGKey(0), *xs),
                            *dummy_inputs(config))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), shapes["params"])


def init_params(module: UNet2DConditionModel, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Random parameters (Flax's initialisers), e.g. for benchmarks and training from scratch."""
    params = jax.jit(lambda k: _init(module, k, *[jnp.zeros(s.shape, s.dtype)
                                                  for s in dummy_inputs(module.config)])["params"])(key)
    return jax.tree.map(lambda p: p.astype(param_dtype), params)


UNET_CLASSES = ("UNet2DConditionModel",)


def load_unet_2d_condition(folder: str | os.PathLike, *, subfolder: str | None = "unet",
                           dtype=jnp.float32, param_dtype=None, variant: str | None = None,
                           allow_outside_paths: bool = False) -> tuple[UNet2DConditionModel, dict]:
    """`(module, params)` from a diffusers `UNet2DConditionModel` folder (or a pipeline's `unet/`):
    `diffusion_pytorch_model[.fp16].safetensors` (sharded or not) or the old Flax
    `diffusion_flax_model.msgpack`. `dtype` is the compute dtype; params are stored in
    `param_dtype` (default: `dtype`). `allow_outside_paths`: see `jaxdiff.weights.find_weights`."""
    path, raw = W.read_config(folder, subfolder, expect_class=UNET_CLASSES)
    module = UNet2DConditionModel(UNet2DConditionConfig.from_dict(raw), dtype=dtype)
    param_dtype = param_dtype or dtype
    params = W.load_params(path, param_shapes(module, param_dtype), variant=variant, dtype=param_dtype,
                           allow_outside_paths=allow_outside_paths)
    return module, params


def save_unet_2d_condition(folder: str | os.PathLike, module: UNet2DConditionModel, params: Mapping, *,
                           dtype=np.float32, variant: Optional[str] = None) -> Path:
    """Write `module` and `params` as a diffusers folder (`config.json` +
    `diffusion_pytorch_model[.<variant>].safetensors`) that diffusers'
    `UNet2DConditionModel.from_pretrained` and `load_unet_2d_condition` read. `dtype=np.float16,
    variant="fp16"` writes half-precision weights. Each file is written atomically."""
    return W.save_model_folder(folder, params, param_shapes(module), module.config.to_dict(),
                               dtype=dtype, variant=variant)
