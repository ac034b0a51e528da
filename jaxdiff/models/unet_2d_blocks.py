"""The down, mid and up blocks of diffusers' `UNet2DModel`, NHWC, with diffusers' parameter names.

Each block is the Flax twin of the diffusers class of the same name and holds the same
children (`resnets_i`, `attentions_i`, `downsamplers_0`, `upsamplers_0`), so PyTorch state
dicts map onto it by rule (see `jaxdiff.weights`).

* Down blocks: ``__call__(hidden_states, temb) -> (hidden_states, output_states)`` where
  `output_states` is the tuple of skip connections the block adds (one per resnet, plus one
  after the downsampler).
* Up blocks: ``__call__(hidden_states, res_hidden_states_tuple, temb) -> hidden_states``; they
  pop their skip connections from the end of the tuple, as diffusers does, so a UNet passes
  them the last ``len(resnets)`` entries of the down path.

`get_down_block` / `get_up_block` build a block from its diffusers type name, with the
arguments of diffusers' factories; unsupported names get one clear error.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.attention import Attention
from jaxdiff.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from jaxdiff.models.remat import remat_block

RESAMPLE_TYPES = ("conv", "resnet")


def spatial_attention(channels: int, attention_head_dim: Optional[int], *, groups: Optional[int],
                      eps: float, rescale_output_factor: float, dtype, name: str) -> Attention:
    """The self-attention of the UNet2DModel blocks (diffusers' deprecated `AttentionBlock`
    converted to `Attention`): group norm, biases, residual, `channels // attention_head_dim`
    heads (one head when `attention_head_dim` is None)."""
    head_dim = channels if attention_head_dim is None else int(attention_head_dim)
    if head_dim <= 0 or head_dim > channels:
        raise JaxdiffError(f"attention_head_dim={attention_head_dim} does not fit a block of "
                           f"{channels} channels; use a divisor of {channels} (or null for one head)")
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_num_groups=groups, eps=eps, residual_connection=True,
                     rescale_output_factor=rescale_output_factor, dtype=dtype, name=name)


class _DownBlock(nn.Module):
    """Resnets (each followed by self-attention when `add_attention`), then an optional
    downsampler: a stride-2 conv (`downsample_type="conv"`) or a resnet that average-pools
    (`"resnet"`)."""
    in_channels: int
    out_channels: int
    temb_channels: Optional[int]
    num_layers: int = 1
    dropout: float = 0.0
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    add_downsample: bool = True
    downsample_padding: int = 1
    downsample_type: str = "conv"
    add_attention: bool = False
    attention_head_dim: Optional[int] = 1
    dtype: jnp.dtype = jnp.float32

    def _resnet(self, in_channels: int, name: str, down: bool = False) -> ResnetBlock2D:
        return remat_block(ResnetBlock2D)(in_channels, self.out_channels, temb_channels=self.temb_channels,
                             groups=self.resnet_groups, eps=self.resnet_eps,
                             non_linearity=self.resnet_act_fn,
                             time_embedding_norm=self.resnet_time_scale_shift,
                             output_scale_factor=self.output_scale_factor,
                             skip_time_act=self.skip_time_act, down=down, dropout=self.dropout,
                             dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, hidden_states: jax.Array, temb: Optional[jax.Array] = None,
                 deterministic: bool = True) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if self.add_downsample and self.downsample_type not in RESAMPLE_TYPES:
            raise unknown_choice("downsample_type", self.downsample_type, RESAMPLE_TYPES)
        output_states = ()
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._resnet(in_channels, f"resnets_{i}")(hidden_states, temb, deterministic)
            if self.add_attention:
                hidden_states = spatial_attention(
                    self.out_channels, self.attention_head_dim, groups=self.resnet_groups,
                    eps=self.resnet_eps, rescale_output_factor=self.output_scale_factor,
                    dtype=self.dtype, name=f"attentions_{i}")(hidden_states)
            output_states += (hidden_states,)
        if self.add_downsample:
            if self.downsample_type == "resnet":
                hidden_states = self._resnet(self.out_channels, "downsamplers_0", down=True)(
                    hidden_states, temb, deterministic)
            else:
                hidden_states = Downsample2D(self.out_channels, use_conv=True,
                                             out_channels=self.out_channels,
                                             padding=self.downsample_padding, dtype=self.dtype,
                                             name="downsamplers_0")(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class DownBlock2D(_DownBlock):
    """Resnets, then a stride-2 conv (diffusers' `DownBlock2D`)."""


class AttnDownBlock2D(_DownBlock):
    """Resnet → self-attention pairs, then a conv or resnet downsampler (`AttnDownBlock2D`)."""
    add_attention: bool = True


class ResnetDownsampleBlock2D(_DownBlock):
    """Resnets, then a pooling resnet as downsampler (`ResnetDownsampleBlock2D`)."""
    downsample_type: str = "resnet"


class _UpBlock(nn.Module):
    """`num_layers` resnets, each on the concatenation of the running features and one skip
    connection popped from the end of `res_hidden_states_tuple` (each followed by
    self-attention when `add_attention`), then an optional upsampler: nearest ×2 and a conv
    (`upsample_type="conv"`) or a resnet that upsamples (`"resnet"`)."""
    in_channels: int
    prev_output_channel: int
    out_channels: int
    temb_channels: Optional[int]
    num_layers: int = 1
    dropout: float = 0.0
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    add_upsample: bool = True
    upsample_type: str = "conv"
    add_attention: bool = False
    attention_head_dim: Optional[int] = 1
    dtype: jnp.dtype = jnp.float32

    def _resnet(self, in_channels: int, name: str, up: bool = False) -> ResnetBlock2D:
        return remat_block(ResnetBlock2D)(in_channels, self.out_channels, temb_channels=self.temb_channels,
                             groups=self.resnet_groups, eps=self.resnet_eps,
                             non_linearity=self.resnet_act_fn,
                             time_embedding_norm=self.resnet_time_scale_shift,
                             output_scale_factor=self.output_scale_factor,
                             skip_time_act=self.skip_time_act, up=up, dropout=self.dropout,
                             dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, hidden_states: jax.Array, res_hidden_states_tuple: Sequence[jax.Array],
                 temb: Optional[jax.Array] = None, upsample_size: Optional[tuple[int, int]] = None,
                 deterministic: bool = True) -> jax.Array:
        if self.add_upsample and self.upsample_type not in RESAMPLE_TYPES:
            raise unknown_choice("upsample_type", self.upsample_type, RESAMPLE_TYPES)
        res_hidden_states_tuple = tuple(res_hidden_states_tuple)
        if len(res_hidden_states_tuple) < self.num_layers:
            raise JaxdiffError(f"{type(self).__name__} needs {self.num_layers} skip connections, "
                               f"got {len(res_hidden_states_tuple)}")
        for i in range(self.num_layers):
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            if res_hidden_states.shape[1:3] != hidden_states.shape[1:3]:
                raise JaxdiffError(
                    f"{type(self).__name__}: skip connection of spatial size "
                    f"{res_hidden_states.shape[1:3]} does not match the features' "
                    f"{hidden_states.shape[1:3]}; the input height and width must be divisible "
                    f"by 2 ** (number of downsamplers)")
            hidden_states = jnp.concatenate([hidden_states, res_hidden_states.astype(hidden_states.dtype)],
                                            axis=-1)
            res_skip_channels = self.in_channels if i == self.num_layers - 1 else self.out_channels
            resnet_in_channels = self.prev_output_channel if i == 0 else self.out_channels
            hidden_states = self._resnet(resnet_in_channels + res_skip_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
            if self.add_attention:
                hidden_states = spatial_attention(
                    self.out_channels, self.attention_head_dim, groups=self.resnet_groups,
                    eps=self.resnet_eps, rescale_output_factor=self.output_scale_factor,
                    dtype=self.dtype, name=f"attentions_{i}")(hidden_states)
        if self.add_upsample:
            if self.upsample_type == "resnet":
                hidden_states = self._resnet(self.out_channels, "upsamplers_0", up=True)(
                    hidden_states, temb, deterministic)
            else:
                hidden_states = Upsample2D(self.out_channels, use_conv=True,
                                           out_channels=self.out_channels, dtype=self.dtype,
                                           name="upsamplers_0")(hidden_states, upsample_size)
        return hidden_states


class UpBlock2D(_UpBlock):
    """Resnets on (features ‖ skip), then nearest ×2 and a conv (diffusers' `UpBlock2D`)."""


class AttnUpBlock2D(_UpBlock):
    """Resnet → self-attention pairs, then a conv or resnet upsampler (`AttnUpBlock2D`)."""
    add_attention: bool = True


class ResnetUpsampleBlock2D(_UpBlock):
    """Resnets, then an upsampling resnet (`ResnetUpsampleBlock2D`)."""
    upsample_type: str = "resnet"


class UNetMidBlock2D(nn.Module):
    """resnet → (self-attention → resnet) × num_layers at the lowest resolution (diffusers'
    `UNetMidBlock2D`). The attention's group norm uses `attn_groups`; when that is None it
    uses `resnet_groups` for `resnet_time_scale_shift="default"` and no norm otherwise."""
    in_channels: int
    temb_channels: Optional[int]
    dropout: float = 0.0
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: Optional[int] = 32
    attn_groups: Optional[int] = None
    add_attention: bool = True
    attention_head_dim: Optional[int] = 1
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array, temb: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        groups = self.resnet_groups if self.resnet_groups is not None else min(self.in_channels // 4, 32)
        attn_groups = self.attn_groups
        if attn_groups is None:
            attn_groups = groups if self.resnet_time_scale_shift == "default" else None

        def resnet(i):
            return remat_block(ResnetBlock2D)(self.in_channels, self.in_channels, temb_channels=self.temb_channels,
                                 groups=groups, eps=self.resnet_eps, non_linearity=self.resnet_act_fn,
                                 time_embedding_norm=self.resnet_time_scale_shift,
                                 output_scale_factor=self.output_scale_factor, dropout=self.dropout,
                                 dtype=self.dtype, name=f"resnets_{i}")

        hidden_states = resnet(0)(hidden_states, temb, deterministic)
        for i in range(self.num_layers):
            if self.add_attention:
                hidden_states = spatial_attention(
                    self.in_channels, self.attention_head_dim, groups=attn_groups,
                    eps=self.resnet_eps, rescale_output_factor=self.output_scale_factor,
                    dtype=self.dtype, name=f"attentions_{i}")(hidden_states)
            hidden_states = resnet(i + 1)(hidden_states, temb, deterministic)
        return hidden_states


# --------------------------------------------------------------------------------------------
# Factories (diffusers' get_down_block / get_up_block)
# --------------------------------------------------------------------------------------------

DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D,
               "ResnetDownsampleBlock2D": ResnetDownsampleBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D,
             "ResnetUpsampleBlock2D": ResnetUpsampleBlock2D}
MID_BLOCKS = ("UNetMidBlock2D", None)

# diffusers block types that a UNet2DModel config may name but jaxdiff does not build, and why.
UNSUPPORTED = {
    "SkipDownBlock2D": "score-SDE (NCSN++) block with FIR resampling",
    "AttnSkipDownBlock2D": "score-SDE (NCSN++) block with FIR resampling",
    "SkipUpBlock2D": "score-SDE (NCSN++) block with FIR resampling",
    "AttnSkipUpBlock2D": "score-SDE (NCSN++) block with FIR resampling",
    "KDownBlock2D": "k-upscaler block",
    "KUpBlock2D": "k-upscaler block",
}


def _block_class(kind: str, block_type: str, table: dict) -> type:
    name = block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type
    if name in table:
        return table[name]
    if name in UNSUPPORTED:
        raise JaxdiffError(f"{kind} block type {block_type!r} ({UNSUPPORTED[name]}) is not "
                           f"supported by jaxdiff; supported: {', '.join(table)}")
    raise unknown_choice(f"{kind} block type", block_type, table)


def check_down_block_type(block_type: str) -> None:
    _block_class("down", block_type, DOWN_BLOCKS)


def check_up_block_type(block_type: str) -> None:
    _block_class("up", block_type, UP_BLOCKS)


def get_down_block(down_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: Optional[int], add_downsample: bool, resnet_eps: float,
                   resnet_act_fn: str, resnet_groups: int = 32, attention_head_dim: Optional[int] = None,
                   downsample_padding: int = 1, resnet_time_scale_shift: str = "default",
                   downsample_type: Optional[str] = None, resnet_skip_time_act: bool = False,
                   resnet_out_scale_factor: float = 1.0, dropout: float = 0.0,
                   dtype=jnp.float32, name: Optional[str] = None) -> _DownBlock:
    """A down block from its diffusers type name (diffusers' `get_down_block` semantics:
    `DownBlock2D` always downsamples with a conv, whatever `downsample_type` says)."""
    cls = _block_class("down", down_block_type, DOWN_BLOCKS)
    kwargs = {}
    if cls is AttnDownBlock2D:
        kwargs = dict(downsample_type=downsample_type or "conv", attention_head_dim=attention_head_dim)
    elif cls is ResnetDownsampleBlock2D:
        kwargs = dict(skip_time_act=resnet_skip_time_act, output_scale_factor=resnet_out_scale_factor)
    return cls(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
               num_layers=num_layers, dropout=dropout, resnet_eps=resnet_eps,
               resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
               resnet_groups=resnet_groups, add_downsample=add_downsample,
               downsample_padding=downsample_padding, dtype=dtype, name=name, **kwargs)


def get_up_block(up_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: Optional[int], add_upsample: bool,
                 resnet_eps: float, resnet_act_fn: str, resnet_groups: int = 32,
                 attention_head_dim: Optional[int] = None, resnet_time_scale_shift: str = "default",
                 upsample_type: Optional[str] = None, resnet_skip_time_act: bool = False,
                 resnet_out_scale_factor: float = 1.0, dropout: float = 0.0,
                 dtype=jnp.float32, name: Optional[str] = None) -> _UpBlock:
    """An up block from its diffusers type name (diffusers' `get_up_block` semantics)."""
    cls = _block_class("up", up_block_type, UP_BLOCKS)
    kwargs = {}
    if cls is AttnUpBlock2D:
        kwargs = dict(upsample_type=upsample_type or "conv", attention_head_dim=attention_head_dim)
    elif cls is ResnetUpsampleBlock2D:
        kwargs = dict(skip_time_act=resnet_skip_time_act, output_scale_factor=resnet_out_scale_factor)
    return cls(in_channels=in_channels, prev_output_channel=prev_output_channel,
               out_channels=out_channels, temb_channels=temb_channels, num_layers=num_layers,
               dropout=dropout, resnet_eps=resnet_eps,
               resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
               resnet_groups=resnet_groups, add_upsample=add_upsample, dtype=dtype, name=name,
               **kwargs)
