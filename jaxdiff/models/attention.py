"""Multi-head attention with diffusers' parameter names, through `jax.nn.dot_product_attention`.

`Attention` covers every use in the UNets and the VAE: the spatial self-attention blocks of
UNet2DModel/AutoencoderKL (`group_norm`, `residual_connection`, NHWC input) and the self/cross
attention of Transformer2D blocks (sequence input, optional `encoder_hidden_states`).
Names: `to_q`, `to_k`, `to_v`, `to_out_0`, `group_norm` — as diffusers' Flax port.
"""
from __future__ import annotations

import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import GroupNorm

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_usable(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in _FUSED_DTYPES
            and head_dim % 8 == 0 and head_dim <= 128)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: Optional[jax.Array] = None, is_causal: bool = False,
                          scale: Optional[float] = None) -> jax.Array:
    """q: (B, T, heads, head_dim), k/v: (B, S, heads, head_dim) → (B, T, heads, head_dim).

    On a GPU with bf16/fp16 inputs the fused cuDNN (flash) kernel is used; elsewhere XLA's
    implementation. ``JAXDIFF_ATTENTION=xla|cudnn`` forces one."""
    forced = os.environ.get("JAXDIFF_ATTENTION")
    if forced not in (None, "", "xla", "cudnn", "auto"):
        raise ValueError(f"JAXDIFF_ATTENTION={forced!r}; choose one of: auto, cudnn, xla")
    use_cudnn = forced == "cudnn" or (forced in (None, "", "auto") and _cudnn_usable(q))
    if use_cudnn:
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if forced == "cudnn":
                raise
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                        implementation="xla")


class Attention(nn.Module):
    """diffusers' `Attention` (AttnProcessor2_0).

    Input: (B, L, C) sequences, or (B, H, W, C) images (flattened to sequences, and back).
    `cross_attention_dim` is only needed for its shape check; keys/values come from
    `encoder_hidden_states` (B, S, C_ctx) when given, else from the input itself.
    """
    query_dim: int
    heads: int = 8
    dim_head: int = 64
    bias: bool = False  # bias of to_q/to_k/to_v
    out_bias: bool = True
    norm_num_groups: Optional[int] = None  # GroupNorm before attention (spatial blocks)
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    upcast_attention: bool = False  # compute q·k in float32 (matters for fp16 only)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array,
                 encoder_hidden_states: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None) -> jax.Array:
        residual = hidden_states
        spatial_shape = None
        if hidden_states.ndim == 4:
            b, h, w, c = hidden_states.shape
            spatial_shape = (b, h, w, c)
            hidden_states = hidden_states.reshape(b, h * w, c)
        if self.norm_num_groups is not None:
            hidden_states = GroupNorm(num_groups=self.norm_num_groups, epsilon=self.eps,
                                      dtype=self.dtype, name="group_norm")(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        inner = self.heads * self.dim_head
        dense = lambda n, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=n)  # noqa: E731
        q = dense("to_q", self.bias)(hidden_states)
        k = dense("to_k", self.bias)(context)
        v = dense("to_v", self.bias)(context)
        split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if self.upcast_attention and q.dtype == jnp.float16:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = dot_product_attention(q, k, v, mask=mask).astype(self.dtype)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = nn.Dense(self.query_dim, use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(out)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
