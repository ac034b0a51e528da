"""Multi-head attention with diffusers' parameter names, through `jax.nn.dot_product_attention`.

`Attention` covers every use in the UNets and the VAE: the spatial self-attention blocks of
UNet2DModel/AutoencoderKL (`group_norm`, `residual_connection`, NHWC input) and the self/cross
attention of Transformer2D blocks (sequence input, optional `encoder_hidden_states`).
Names: `to_q`, `to_k`, `to_v`, `to_out_0`, `group_norm` — as diffusers' Flax port.
"""
from __future__ import annotations

import functools
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

    On a GPU with bf16/fp16 inputs the fused cuDNN (flash) kernel is used; on the CPU (no mask)
    `cache_blocked_attention`; elsewhere XLA's implementation.
    ``JAXDIFF_ATTENTION=xla|cudnn|blocked`` forces one (``xla`` on the CPU for forward-mode
    autodiff, `jax.jvp` through the model: the blocked path defines reverse mode only)."""
    forced = os.environ.get("JAXDIFF_ATTENTION")
    if forced not in (None, "", "xla", "cudnn", "blocked", "auto"):
        raise ValueError(f"JAXDIFF_ATTENTION={forced!r}; choose one of: auto, blocked, cudnn, xla")
    auto = forced in (None, "", "auto")
    use_cudnn = forced == "cudnn" or (auto and _cudnn_usable(q))
    if use_cudnn:
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if forced == "cudnn":
                raise
    if mask is None and not is_causal and (forced == "blocked" or (auto and jax.default_backend() == "cpu")):
        return cache_blocked_attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                        implementation="xla")


# ------------------------------------------------------------------------------------------------
# Attention in cache-sized blocks (the CPU path)
# ------------------------------------------------------------------------------------------------

BLOCK_BYTES = 8 << 20
"""Target size of one block's float32 attention matrix: about what a CPU's L2/L3 keeps close."""


def cache_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                            scale: Optional[float] = None) -> jax.Array:
    """Softmax attention (same layouts and values as `jax.nn.dot_product_attention`, no mask),
    computed over blocks of (batch × head) rows whose score matrices fit in the CPU's cache.

    XLA's plain implementation writes the whole (B, heads, T, S) score tensor to memory and reads
    it back several times (softmax, its gradient, layout copies): at the course UNet's 14×14
    attention, batch 128, that is 157 MB per pass, and attention took ~40% of a training step.
    Here a `lax.map` walks blocks of ~`BLOCK_BYTES` of scores, each block's QKᵀ → softmax → PV
    staying in cache; the backward recomputes each block's probabilities (as flash attention
    does) instead of storing them. Measured on the 2-core CPU (`benchmarks/attention.py`) at
    (128, 196, 8, 8): forward 114–121 → 21 ms, forward+backward 256–274 → 85–109 ms (PyTorch's
    fused CPU kernel: 29–31 / 98–103 ms); SD's 64×64 latents, (2, 4096, 8, 40): 1.36 s → 0.59 s
    forward (PyTorch 0.27 s; a row larger than the block is not split further).
    Differentiable in reverse mode (a `custom_vjp`), as training and guidance need."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q (B, T, heads, dim) and k, v (B, S, heads, dim); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    rows = q.shape[0] * q.shape[2]
    per_row = q.shape[1] * k.shape[1] * 4
    block = max(1, min(rows, BLOCK_BYTES // per_row))
    return _blocked_attention(q, k, v, scale, -(-rows // block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_attention(q, k, v, scale, blocks):
    return _blocked_forward(q, k, v, scale, blocks)[0]


def _to_rows(x, blocks):
    """(B, L, heads, dim) → (blocks, rows per block, L, dim), zero-padded to whole blocks."""
    b, length, heads, dim = x.shape
    x = jnp.swapaxes(x, 1, 2).reshape(b * heads, length, dim)
    per = -(-x.shape[0] // blocks)
    if per * blocks != x.shape[0]:
        x = jnp.pad(x, ((0, per * blocks - x.shape[0]), (0, 0), (0, 0)))
    return x.reshape(blocks, per, length, dim)


def _from_rows(x, like):
    """Inverse of `_to_rows` for a tensor shaped like `like` (B, L, heads, dim)."""
    b, length, heads, dim = like.shape
    x = x.reshape(-1, length, dim)[: b * heads].reshape(b, heads, length, dim)
    return jnp.swapaxes(x, 1, 2).astype(like.dtype)


def _block_probs(q, k, scale):
    logits = jnp.einsum("rtd,rsd->rts", q, k, preferred_element_type=jnp.float32) * scale
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _over_blocks(fn, *xs):
    if xs[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in xs)))
    return jax.lax.map(lambda block: fn(*block), xs)


def _blocked_forward(q, k, v, scale, blocks):
    qr, kr, vr = (_to_rows(x, blocks) for x in (q, k, v))

    def block(qb, kb, vb):
        p = _block_probs(qb, kb, scale)
        return jnp.einsum("rts,rsd->rtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)

    out = _over_blocks(block, qr, kr, vr)
    return _from_rows(out, q), (q, k, v, out)


def _blocked_backward(scale, blocks, residuals, g):
    q, k, v, out = residuals
    qr, kr, vr, gr = (_to_rows(x, blocks) for x in (q, k, v, g))

    def block(qb, kb, vb, ob, gb):
        gb = gb.astype(jnp.float32)
        p = _block_probs(qb, kb, scale)
        dv = jnp.einsum("rts,rtd->rsd", p, gb)
        dp = jnp.einsum("rtd,rsd->rts", gb, vb.astype(jnp.float32))
        ds = p * (dp - jnp.sum(gb * ob, axis=-1, keepdims=True)) * scale
        dq = jnp.einsum("rts,rsd->rtd", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("rts,rtd->rsd", ds, qb.astype(jnp.float32))
        return dq, dk, dv

    dq, dk, dv = _over_blocks(block, qr, kr, vr, out, gr)
    return _from_rows(dq, q), _from_rows(dk, k), _from_rows(dv, v)


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


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
