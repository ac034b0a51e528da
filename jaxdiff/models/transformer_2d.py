"""The spatial transformer of the Stable Diffusion UNet, with diffusers' parameter names.

`Transformer2DModel` (continuous input): GroupNorm → `proj_in` (1×1 conv, or a linear layer with
`use_linear_projection`, SD2) → `transformer_blocks_i` (`BasicTransformerBlock`: self-attention
`attn1`, cross-attention `attn2` on the text embeddings, GEGLU feed-forward `ff`, each after a
LayerNorm and with a residual) → `proj_out` → + input. NHWC in and out.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.attention import Attention
from jaxdiff.models.layers import GroupNorm
from jaxdiff.models.remat import remat_block

_GELU_APPROXIMATION = {"gelu": "none", "gelu-approximate": "tanh", "geglu-approximate": "sigmoid"}
FF_ACTIVATIONS = ("geglu",) + tuple(_GELU_APPROXIMATION)


class GEGLU(nn.Module):
    """`proj` to 2×dim_out, then value · GELU(gate) (Shazeer 2020), exact GELU as diffusers."""
    dim_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(x, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class GELU(nn.Module):
    """`proj` then GELU: exact ("none"), "tanh", or "sigmoid" (x·σ(1.702x), diffusers'
    `ApproximateGELU`, its "geglu-approximate")."""
    dim_out: int
    approximate: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim_out, dtype=self.dtype, name="proj")(x)
        if self.approximate == "sigmoid":
            return x * nn.sigmoid(1.702 * x)
        return nn.gelu(x, approximate=self.approximate == "tanh")


class FeedForward(nn.Module):
    """diffusers' `FeedForward`: `net_0` (activation with its own projection to dim·mult) →
    dropout → `net_2` (linear back to `dim_out`)."""
    dim: int
    dim_out: Optional[int] = None
    mult: int = 4
    activation_fn: str = "geglu"
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        inner = self.dim * self.mult
        if self.activation_fn == "geglu":
            act = GEGLU(inner, self.dtype, name="net_0")
        elif self.activation_fn in _GELU_APPROXIMATION:
            act = GELU(inner, _GELU_APPROXIMATION[self.activation_fn], self.dtype, name="net_0")
        else:
            raise unknown_choice("feed-forward activation_fn", self.activation_fn, FF_ACTIVATIONS)
        x = act(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.dim_out or self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """norm1 → attn1 (self; cross with `only_cross_attention`) → norm2 → attn2 (cross on the
    context; self with `double_self_attention`) → norm3 → ff, each added to its input.

    x: (B, L, dim); context: (B, S, cross_attention_dim)."""
    dim: int
    num_attention_heads: int
    attention_head_dim: int
    cross_attention_dim: Optional[int] = None
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    attention_bias: bool = False
    norm_eps: float = 1e-5
    activation_fn: str = "geglu"
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        attention = lambda name: Attention(  # noqa: E731
            self.dim, heads=self.num_attention_heads, dim_head=self.attention_head_dim,
            bias=self.attention_bias, upcast_attention=self.upcast_attention, dtype=self.dtype,
            name=name)
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731

        h = norm("norm1")(x)
        x = x + attention("attn1")(h, context if self.only_cross_attention else None)
        if self.cross_attention_dim is not None or self.double_self_attention:
            h = norm("norm2")(x)
            x = x + attention("attn2")(h, None if self.double_self_attention else context)
        h = norm("norm3")(x)
        x = x + FeedForward(self.dim, activation_fn=self.activation_fn, dropout=self.dropout,
                            dtype=self.dtype, name="ff")(h, deterministic)
        return x


class Transformer2DModel(nn.Module):
    """diffusers' `Transformer2DModel` for continuous (image) input.

    x: (B, H, W, in_channels) → same shape; context: (B, S, cross_attention_dim)."""
    in_channels: int
    num_attention_heads: int = 16
    attention_head_dim: int = 88
    num_layers: int = 1
    cross_attention_dim: Optional[int] = None
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    attention_bias: bool = False
    activation_fn: str = "geglu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        b, h, w, c = x.shape
        if c != self.in_channels:
            raise JaxdiffError(f"Transformer2DModel expects {self.in_channels} channels, got {c}")
        inner = self.num_attention_heads * self.attention_head_dim
        residual = x
        x = GroupNorm(num_groups=self.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = nn.Conv(inner, (1, 1), padding="VALID", dtype=self.dtype, name="proj_in")(x)
            x = x.reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = remat_block(BasicTransformerBlock)(
                inner, self.num_attention_heads, self.attention_head_dim,
                cross_attention_dim=self.cross_attention_dim,
                only_cross_attention=self.only_cross_attention,
                double_self_attention=self.double_self_attention,
                upcast_attention=self.upcast_attention, attention_bias=self.attention_bias,
                norm_eps=self.norm_eps, activation_fn=self.activation_fn, dropout=self.dropout,
                dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context, deterministic)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = nn.Conv(c, (1, 1), padding="VALID", dtype=self.dtype,
                        name="proj_out")(x.reshape(b, h, w, inner))
        return x + residual
