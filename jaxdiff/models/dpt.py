"""DPT depth estimation in Flax (Ranftl et al., 2021): transformers' `DPTForDepthEstimation`.

Both layouts transformers ships: DPT-hybrid (`is_hybrid: true`, the one Stable Diffusion 2's
depth-to-image folders hold under `depth_estimator/`: a BiT ResNet stem and three stages whose
last map becomes the ViT's tokens, the first two feeding the neck directly) and the plain ViT DPT
(patch embeddings, four ViT layers reassembled). Parameter names are transformers' own, so
`model.safetensors` loads by rule through `jaxdiff.weights`:

    dpt/embeddings/backbone/bit/embedder/convolution/kernel      (7, 7, 3, E)  weight-standardised
    dpt/embeddings/backbone/bit/encoder/stages_0/layers_0/conv1/kernel
    dpt/embeddings/projection/kernel, dpt/embeddings/cls_token, dpt/embeddings/position_embeddings
    dpt/encoder/layer_0/attention/attention/query/kernel, .../layernorm_before/scale
    neck/reassemble_stage/readout_projects_2_0/kernel, neck/reassemble_stage/layers_2/resize/kernel
    neck/convs_0/kernel, neck/fusion_stage/layers_0/residual_layer1/convolution1/kernel
    head/head_0/kernel, head/head_2/kernel, head/head_4/kernel

Input: `pixel_values` NHWC (B, H, W, 3) as the image processor makes them (see
`jaxdiff.models.dpt_preprocess`). Output: `predicted_depth` (B, H, W) float32 (relative inverse
depth, ≥ 0).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdiff import resize
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.config import freeze_fields, known_keys

DPT_CLASSES = ("DPTForDepthEstimation", "dpt")


# --------------------------------------------------------------------------------------------
# Configs (keys and defaults of transformers' BitConfig / DPTConfig)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BitConfig:
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple = (256, 512, 1024, 2048)
    depths: tuple = (3, 4, 6, 3)
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    global_padding: str | None = None
    num_groups: int = 32
    embedding_dynamic_padding: bool = False
    output_stride: int = 32
    width_factor: int = 1
    out_features: tuple | None = None
    out_indices: tuple | None = None

    def __post_init__(self):
        freeze_fields(self)
        if self.layer_type != "bottleneck":
            raise JaxdiffError(f"BiT layer_type {self.layer_type!r} is not supported; jaxdiff runs the "
                               "DPT-hybrid backbone (layer_type 'bottleneck')")
        if self.global_padding is not None and self.global_padding.upper() not in ("SAME", "VALID"):
            raise JaxdiffError(f"BiT global_padding {self.global_padding!r}; choose one of: SAME, VALID, null")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitConfig:
        d = dict(d)
        for key in ("out_features", "out_indices"):
            if f"_{key}" in d and d.get(key) is None:
                d[key] = d[f"_{key}"]
        return cls(**known_keys(cls, d))

    @property
    def stage_names(self) -> tuple:
        return ("stem",) + tuple(f"stage{i}" for i in range(1, len(self.depths) + 1))

    @property
    def feature_indices(self) -> tuple:
        """Indices into (stem, stage1, ...) of the maps the backbone returns."""
        if self.out_features:
            return tuple(self.stage_names.index(n) for n in self.out_features)
        if self.out_indices:
            return tuple(i % len(self.stage_names) for i in self.out_indices)
        return (len(self.stage_names) - 1,)


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: Any = 384
    patch_size: int = 16
    num_channels: int = 3
    is_hybrid: bool = False
    qkv_bias: bool = True
    backbone_out_indices: tuple = (2, 5, 8, 11)
    readout_type: str = "project"
    reassemble_factors: tuple = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_batch_norm_in_fusion_residual: bool = False
    use_bias_in_fusion_residual: bool | None = None
    add_projection: bool = False
    backbone_featmap_shape: tuple | None = (1, 1024, 24, 24)
    neck_ignore_stages: tuple = (0, 1)
    backbone_config: BitConfig | None = None

    def __post_init__(self):
        freeze_fields(self)
        if self.readout_type not in ("ignore", "add", "project"):
            raise JaxdiffError(f"DPT readout_type {self.readout_type!r}; choose one of: add, ignore, project")
        if self.is_hybrid and self.readout_type != "project":
            raise JaxdiffError("DPT-hybrid needs readout_type 'project'")
        if self.hidden_act not in ("gelu", "relu", "gelu_new", "quick_gelu"):
            raise JaxdiffError(f"DPT hidden_act {self.hidden_act!r} is not supported; "
                               "choose one of: gelu, gelu_new, quick_gelu, relu")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPTConfig:
        d = dict(d)
        if d.get("backbone") or (d.get("backbone_config") and not d.get("is_hybrid")):
            raise JaxdiffError("DPT with a separate backbone model (DINOv2, BEiT, Swin ...) is not "
                               "supported; jaxdiff runs the ViT DPT and DPT-hybrid")
        if d.get("is_hybrid"):
            bit = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                   "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True}
            bit.update(d.get("backbone_config") or {})
            d["backbone_config"] = BitConfig.from_dict(bit)
        else:
            d["backbone_config"] = None
            d["neck_ignore_stages"] = ()
            d["backbone_featmap_shape"] = None
        for key in ("num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
                    "image_size", "patch_size", "num_channels", "qkv_bias", "backbone_out_indices",
                    "use_batch_norm_in_fusion_residual"):
            if key in d and d[key] is None:
                del d[key]  # some published configs hold null for defaults
        return cls(**known_keys(cls, d))

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))


def _activation(name: str):
    return {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu,
            "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
            "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}[name]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF 'SAME' padding of one axis (transformers' DynamicPad2d)."""
    pad = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return pad // 2, pad - pad // 2


def _conv_padding(mode: str | None, k: int, s: int, d: int, h: int, w: int):
    """Padding of a BiT convolution (transformers' get_padding_value + DynamicPad2d)."""
    mode = mode.upper() if mode else None
    static = ((s - 1) + d * (k - 1)) // 2
    if mode == "VALID":
        return ((0, 0), (0, 0))
    if mode == "SAME" and not (s == 1 and (d * (k - 1)) % 2 == 0):
        return (_same_pad(h, k, s, d), _same_pad(w, k, s, d))
    return ((static, static), (static, static))


class WeightStandardizedConv2d(nn.Module):
    """transformers' `WeightStandardizedConv2d`: each output filter standardised (mean 0,
    biased variance 1, `eps`) before the convolution; no bias."""
    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: str | None = "SAME"
    eps: float = 1e-8

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
        var = jnp.square(kernel - mean).mean(axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) * jax.lax.rsqrt(var + self.eps)
        pad = _conv_padding(self.padding, k, self.stride, self.dilation, x.shape[1], x.shape[2])
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), pad, rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)


class GroupNormAct(nn.Module):
    """transformers' `BitGroupNormActivation` (GroupNorm eps 1e-5, then the activation)."""
    num_groups: int
    activation: str | None = "relu"

    @nn.compact
    def __call__(self, x):
        x = _group_norm(self, x, self.num_groups)
        return _activation(self.activation)(x) if self.activation else x


def _group_norm(module: nn.Module, x, groups: int, eps: float = 1e-5):
    """Two-pass group normalisation (torch's), with params `scale`/`bias` on `module`."""
    c = x.shape[-1]
    scale = module.param("scale", nn.initializers.ones, (c,))
    bias = module.param("bias", nn.initializers.zeros, (c,))
    xg = x.reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = xg.mean(axis=axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return xg.reshape(x.shape) * scale + bias


def _make_div(value, divisor=8):
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class BitDownsampleConv(nn.Module):
    config: BitConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        x = WeightStandardizedConv2d(self.features, 1, self.stride, padding=self.config.global_padding,
                                     name="conv")(x)
        return GroupNormAct(self.config.num_groups, None, name="norm")(x)


class BitBottleneckLayer(nn.Module):
    """transformers' `BitBottleneckLayer` (ResNet v1.5 bottleneck, stride on the 3×3)."""
    config: BitConfig
    features: int
    stride: int = 1
    dilation: int = 1
    first_dilation: int = 1
    is_first_layer: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        mid = _make_div(self.features * 0.25)
        shortcut = x
        if self.is_first_layer:
            shortcut = BitDownsampleConv(cfg, self.features, self.stride, name="downsample")(x)
        pad = cfg.global_padding
        x = WeightStandardizedConv2d(mid, 1, padding=pad, name="conv1")(x)
        x = GroupNormAct(cfg.num_groups, cfg.hidden_act, name="norm1")(x)
        x = WeightStandardizedConv2d(mid, 3, self.stride, self.first_dilation, padding=pad, name="conv2")(x)
        x = GroupNormAct(cfg.num_groups, cfg.hidden_act, name="norm2")(x)
        x = WeightStandardizedConv2d(self.features, 1, padding=pad, name="conv3")(x)
        x = GroupNormAct(cfg.num_groups, None, name="norm3")(x)
        return _activation(cfg.hidden_act)(x + shortcut)


class BitEmbeddings(nn.Module):
    config: BitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = WeightStandardizedConv2d(cfg.embedding_size, 7, 2, padding=cfg.global_padding,
                                     name="convolution")(x)
        if not (cfg.global_padding and cfg.global_padding.upper() == "SAME"):
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = GroupNormAct(cfg.num_groups, cfg.hidden_act, name="norm")(x)
        if cfg.embedding_dynamic_padding:  # zero padding, as transformers' DynamicPad2d
            x = jnp.pad(x, ((0, 0), _same_pad(x.shape[1], 3, 2, 1), _same_pad(x.shape[2], 3, 2, 1), (0, 0)))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class BitStage(nn.Module):
    config: BitConfig
    features: int
    depth: int
    stride: int
    dilation: int

    @nn.compact
    def __call__(self, x):
        first_dilation = 1 if self.dilation in (1, 2) else 2
        for i in range(self.depth):
            x = BitBottleneckLayer(self.config, self.features, self.stride if i == 0 else 1, self.dilation,
                                   first_dilation, i == 0, name=f"layers_{i}")(x)
            first_dilation = self.dilation
        return x


class BitEncoder(nn.Module):
    config: BitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        states = [x]
        current_stride, dilation = 4, 1
        for s, (depth, size) in enumerate(zip(cfg.depths, cfg.hidden_sizes)):
            stride = 1 if s == 0 else 2
            if current_stride >= cfg.output_stride:
                dilation *= stride
                stride = 1
            x = BitStage(cfg, _make_div(size * cfg.width_factor), depth, stride, dilation,
                         name=f"stages_{s}")(x)
            current_stride *= stride
            states.append(x)
        return states


class BitModel(nn.Module):
    """The BiT backbone: [stem output, stage1 output, ...] (transformers' hidden states)."""
    config: BitConfig

    @nn.compact
    def __call__(self, x):
        return BitEncoder(self.config, name="encoder")(BitEmbeddings(self.config, name="embedder")(x))


class BitBackbone(nn.Module):
    """transformers' `BitBackbone`: the maps of `config.out_features`."""
    config: BitConfig

    @nn.compact
    def __call__(self, x):
        states = BitModel(self.config, name="bit")(x)
        return [states[i] for i in self.config.feature_indices]


# --------------------------------------------------------------------------------------------
# The ViT
# --------------------------------------------------------------------------------------------

def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = True,
          name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)),
                   use_bias=use_bias, name=name, precision=jax.lax.Precision.HIGHEST)


def _dense(features: int, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, name=name, precision=jax.lax.Precision.HIGHEST)


def _resize_pos_embed(posemb, grid_h: int, grid_w: int):
    """transformers' `_resize_pos_embed`: the grid part resized bilinearly (align_corners False)."""
    tok, grid = posemb[:, :1], posemb[0, 1:]
    old = int(math.sqrt(grid.shape[0]))
    grid = grid.reshape(1, old, old, -1)
    if (old, old) != (grid_h, grid_w):
        grid = resize.interpolate_matmul(grid, (grid_h, grid_w), "bilinear", align_corners=False)
    return jnp.concatenate([tok, grid.reshape(1, grid_h * grid_w, -1)], axis=1)


class DPTEmbeddings(nn.Module):
    """Patch (or BiT-feature) tokens, a class token and resized position embeddings.
    Returns (tokens (B, 1 + h·w, D), the hybrid's two early BiT maps or [])."""
    config: DPTConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        b, h, w, _ = pixel_values.shape
        (ih, iw), p = cfg.image_hw, cfg.patch_size
        num_patches = (ih // p) * (iw // p)
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.hidden_size))
        pos = self.param("position_embeddings", nn.initializers.zeros, (1, num_patches + 1, cfg.hidden_size))
        pos = _resize_pos_embed(pos, h // p, w // p)
        intermediates = []
        if cfg.is_hybrid:
            maps = BitBackbone(cfg.backbone_config, name="backbone")(pixel_values)
            if len(maps) != 3:
                raise JaxdiffError(f"DPT-hybrid needs a backbone with 3 output features, got {len(maps)}")
            intermediates = [maps[0], maps[1]]
            x = _conv(cfg.hidden_size, 1, name="projection")(maps[-1])
        else:
            x = _PatchEmbeddings(cfg, name="patch_embeddings")(pixel_values)
        x = x.reshape(b, -1, cfg.hidden_size)
        if x.shape[1] != pos.shape[1] - 1:
            raise JaxdiffError(f"DPT: {x.shape[1]} image tokens but {pos.shape[1] - 1} position embeddings; "
                               f"the input {h}×{w} does not fit patch size {p}")
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, cfg.hidden_size)), x], axis=1)
        return x + pos, intermediates


class _PatchEmbeddings(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        p = self.config.patch_size
        return nn.Conv(self.config.hidden_size, (p, p), (p, p), "VALID", name="projection",
                       precision=jax.lax.Precision.HIGHEST)(x)


class DPTSelfAttention(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        heads = cfg.num_attention_heads
        q, k, v = (_dense(cfg.hidden_size, cfg.qkv_bias, name=n)(x) for n in ("query", "key", "value"))
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)
        out = dot_product_attention(split(q), split(k), split(v))
        return out.reshape(x.shape[0], x.shape[1], cfg.hidden_size)


class DPTViTLayer(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        ln = lambda n: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=n)
        x = x + _Attention(cfg, name="attention")(ln("layernorm_before")(x))
        h = _Intermediate(cfg, name="intermediate")(ln("layernorm_after")(x))
        return x + _Dense(cfg.hidden_size, name="output")(h)


class _Attention(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        return _Dense(self.config.hidden_size, name="output")(DPTSelfAttention(self.config, name="attention")(x))


class _Intermediate(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        return _activation(self.config.hidden_act)(_dense(self.config.intermediate_size, name="dense")(x))


class _Dense(nn.Module):
    """A `Linear` that transformers nests as `<name>.dense`."""
    features: int

    @nn.compact
    def __call__(self, x):
        return _dense(self.features, name="dense")(x)


class DPTViTEncoder(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        states = []
        for i in range(self.config.num_hidden_layers):
            x = DPTViTLayer(self.config, name=f"layer_{i}")(x)
            states.append(x)
        return states


class DPTModel(nn.Module):
    """Embeddings, ViT layers, final layer norm (`dpt/...`). Returns the neck's four inputs."""
    config: DPTConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        x, intermediates = DPTEmbeddings(cfg, name="embeddings")(pixel_values)
        states = DPTViTEncoder(cfg, name="encoder")(x)
        nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm")(states[-1])  # unused by depth
        if cfg.is_hybrid:
            return intermediates + [states[i] for i in cfg.backbone_out_indices[2:]]
        return [states[i] for i in cfg.backbone_out_indices]


# --------------------------------------------------------------------------------------------
# Neck and head
# --------------------------------------------------------------------------------------------

class DPTReassembleLayer(nn.Module):
    config: DPTConfig
    channels: int
    factor: float

    @nn.compact
    def __call__(self, x):
        x = _conv(self.channels, 1, name="projection")(x)
        if self.factor > 1:
            return _ConvTranspose(self.channels, int(self.factor), name="resize")(x)
        if self.factor < 1:
            return _conv(self.channels, 3, int(1 / self.factor), 1, name="resize")(x)
        return x


class _ConvTranspose(nn.Module):
    """torch's `ConvTranspose2d(c, c, kernel_size=f, stride=f)`; kernel (f, f, out, in) as the
    loader lays torch's (in, out, f, f) weight."""
    features: int
    factor: int

    @nn.compact
    def __call__(self, x):
        f = self.factor
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (f, f, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,pqoc->bipjqo", x, kernel, precision=jax.lax.Precision.HIGHEST)
        return y.reshape(b, h * f, w * f, self.features) + bias


class DPTReassembleStage(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, states, grid: tuple[int, int]):
        cfg = self.config
        out = []
        for i, x in enumerate(states):
            if i not in cfg.neck_ignore_stages:
                cls_token, tokens = x[:, 0], x[:, 1:]
                b, _, d = tokens.shape
                if cfg.readout_type == "project":
                    readout = jnp.broadcast_to(cls_token[:, None], tokens.shape)
                    tokens = _dense(d, name=f"readout_projects_{i}_0")(jnp.concatenate([tokens, readout], -1))
                    tokens = _activation(cfg.hidden_act)(tokens)
                elif cfg.readout_type == "add":
                    tokens = tokens + cls_token[:, None]
                x = tokens.reshape(b, grid[0], grid[1], d)
                x = DPTReassembleLayer(cfg, cfg.neck_hidden_sizes[i], cfg.reassemble_factors[i],
                                       name=f"layers_{i}")(x)
            out.append(x)
        return out


class _BatchNorm(nn.Module):
    """torch's `BatchNorm2d` in eval mode; running statistics kept as parameters."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class DPTPreActResidualLayer(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bn = bool(cfg.use_batch_norm_in_fusion_residual)
        bias = cfg.use_bias_in_fusion_residual if cfg.use_bias_in_fusion_residual is not None else not bn
        h = _conv(cfg.fusion_hidden_size, 3, 1, 1, bias, name="convolution1")(jax.nn.relu(x))
        if bn:
            h = _BatchNorm(name="batch_norm1")(h)
        h = _conv(cfg.fusion_hidden_size, 3, 1, 1, bias, name="convolution2")(jax.nn.relu(h))
        if bn:
            h = _BatchNorm(name="batch_norm2")(h)
        return h + x


class DPTFeatureFusionLayer(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x, residual=None):
        cfg = self.config
        layer1 = DPTPreActResidualLayer(cfg, name="residual_layer1")
        if residual is not None:
            if residual.shape != x.shape:
                residual = resize.interpolate_matmul(residual, x.shape[1:3], "bilinear", align_corners=False)
            x = x + layer1(residual)
        elif self.is_initializing():
            layer1(x)  # the first fusion layer holds unused weights too
        x = DPTPreActResidualLayer(cfg, name="residual_layer2")(x)
        x = resize.interpolate_matmul(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear", align_corners=True)
        return _conv(cfg.fusion_hidden_size, 1, name="projection")(x)


class DPTNeck(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, states, grid):
        cfg = self.config
        if len(states) != len(cfg.neck_hidden_sizes):
            raise JaxdiffError(f"DPT: {len(states)} hidden states for {len(cfg.neck_hidden_sizes)} "
                               "neck_hidden_sizes; the config does not fit together")
        states = DPTReassembleStage(cfg, name="reassemble_stage")(states, grid)
        features = [_conv(cfg.fusion_hidden_size, 3, 1, 1, False, name=f"convs_{i}")(x)
                    for i, x in enumerate(states)]
        return DPTFeatureFusionStage(cfg, name="fusion_stage")(features)


class DPTFeatureFusionStage(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, features):
        fused, out = None, []
        for i, x in enumerate(features[::-1]):
            layer = DPTFeatureFusionLayer(self.config, name=f"layers_{i}")
            fused = layer(x) if fused is None else layer(fused, x)
            out.append(fused)
        return out


class DPTDepthEstimationHead(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, states):
        cfg = self.config
        x = states[cfg.head_in_index]
        if cfg.add_projection:
            x = jax.nn.relu(_conv(256, 3, 1, 1, name="projection")(x))
        f = cfg.fusion_hidden_size
        x = _conv(f // 2, 3, 1, 1, name="head_0")(x)
        x = resize.interpolate_matmul(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear", align_corners=True)
        x = jax.nn.relu(_conv(32, 3, 1, 1, name="head_2")(x))
        x = jax.nn.relu(_conv(1, 1, name="head_4")(x))
        return x[..., 0]


class DPTForDepthEstimation(nn.Module):
    """pixel_values (B, H, W, 3) NHWC → predicted_depth (B, H, W) float32."""
    config: DPTConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        pixel_values = jnp.asarray(pixel_values, jnp.float32)
        p = cfg.patch_size
        grid = (pixel_values.shape[1] // p, pixel_values.shape[2] // p)
        states = DPTModel(cfg, name="dpt")(pixel_values)
        return DPTDepthEstimationHead(cfg, name="head")(DPTNeck(cfg, name="neck")(states, grid))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def param_shapes(model: DPTForDepthEstimation) -> dict:
    """The parameter tree's shapes (no computation)."""
    h, w = model.config.image_hw
    x = jax.ShapeDtypeStruct((1, h, w, model.config.num_channels), jnp.float32)
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), x)["params"]


def load_dpt(folder: str | os.PathLike, subfolder: str | None = "depth_estimator", *,
             variant: str | None = None, allow_outside_paths: bool = False
             ) -> tuple[DPTForDepthEstimation, dict]:
    """`(model, params)` from a transformers `DPTForDepthEstimation` folder (a pipeline's
    `depth_estimator/`, or the model folder itself): config.json + model.safetensors."""
    path, raw = W.read_config(folder, subfolder, expect_class=DPT_CLASSES)
    model = DPTForDepthEstimation(DPTConfig.from_dict(raw))
    params = W.load_params(path, param_shapes(model), variant=variant,
                           ignore=lambda k: k.endswith("num_batches_tracked"),
                           allow_outside_paths=allow_outside_paths)
    return model, params


__all__ = ["BitConfig", "DPTConfig", "DPTForDepthEstimation", "load_dpt", "param_shapes"]
