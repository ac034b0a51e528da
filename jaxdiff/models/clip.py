"""CLIP in Flax: text and vision transformers with projection heads (Radford et al., 2021).

Parameter names mirror transformers' `CLIPModel` (and its old Flax port), so a transformers
folder loads by rule through `jaxdiff.weights`:

    text_model/embeddings/token_embedding/embedding      (vocab_size, D)
    text_model/encoder/layers/0/self_attn/q_proj/kernel  (D, D)
    text_model/encoder/layers/0/mlp/fc1/kernel           (D, intermediate_size)
    text_model/final_layer_norm/scale
    vision_model/embeddings/patch_embedding/kernel       (p, p, C, D)
    vision_model/embeddings/class_embedding              (D,)
    vision_model/pre_layrnorm (sic), vision_model/post_layernorm
    text_projection/kernel, visual_projection/kernel, logit_scale

Inputs: token ids `(B, L)` int32 (`jaxdiff.tokenizer`); images NHWC `(B, S, S, C)` already
normalised with the CLIP mean/std (`jaxdiff.guidance.clip_normalize`).

`load_clip(folder)` reads a transformers CLIP folder (CLIPModel, CLIPTextModel[WithProjection],
CLIPVisionModel[WithProjection]; safetensors or Flax msgpack) or an OpenAI / open_clip ViT state
dict (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...), converted on load.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError, unknown_choice
from jaxdiff.models.config import fields_dict, known_keys

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Configs (keys and defaults of transformers' CLIP*Config, openai/clip-vit-base-patch32)
# --------------------------------------------------------------------------------------------


def _from_dict(cls, d: Mapping[str, Any]):
    return _check_config(cls(**known_keys(cls, d)))


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    # transformers pools the first `eos_token_id`; configs with the legacy value 2 (and the
    # OpenAI/open_clip layout) pool at the argmax of the ids, the end-of-text token being the
    # highest id of the OpenAI vocabulary.
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        d = dict(d)
        if isinstance(d.get("eos_token_id"), (list, tuple)):
            d["eos_token_id"] = d["eos_token_id"][0]
        return _from_dict(cls, d)

    def to_dict(self) -> dict:
        """The transformers `config.json` keys of a `CLIPTextModel`."""
        return {"model_type": "clip_text_model", **fields_dict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        return _from_dict(cls, d)

    def to_dict(self) -> dict:
        """The transformers `config.json` keys of a `CLIPVisionModel`."""
        return {"model_type": "clip_vision_model", **fields_dict(self)}

    @property
    def grid(self) -> tuple[int, int]:
        (h, w), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        return h // ph, w // pw


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        # Old configs carry `*_config_dict`, which transformers lets override `*_config`.
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return cls(text_config=CLIPTextConfig.from_dict(text),
                   vision_config=CLIPVisionConfig.from_dict(vision),
                   projection_dim=int(d.get("projection_dim", 512)),
                   logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))

    def to_dict(self) -> dict:
        """The transformers `config.json` keys of a `CLIPModel`."""
        return {"model_type": "clip", "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict(), "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value}


def _check_config(config):
    if config.hidden_size % config.num_attention_heads:
        raise JaxdiffError(f"CLIP config: hidden_size {config.hidden_size} is not a multiple of "
                           f"num_attention_heads {config.num_attention_heads}")
    activation(config.hidden_act)
    return config


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise unknown_choice("CLIP hidden_act", name, ACTIVATIONS)
    return ACTIVATIONS[name]


class CLIPAttention(nn.Module):
    """Multi-head self-attention, `(B, T, D) -> (B, T, D)`, through `jax.nn.dot_product_attention`."""
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = dense("q_proj"), dense("k_proj"), dense("v_proj")
        self.out_proj = dense("out_proj")

    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, -1)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        return self.out_proj(out.reshape(b, t, self.hidden_size))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = activation(self.hidden_act)(x)
        return nn.Dense(d, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        c = self.config
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, name="self_attn")(
            ln("layer_norm1")(x), mask, causal)
        return x + CLIPMLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPLayerCollection(nn.Module):
    """`layers/0`, `layers/1`, ... Returns the input and every layer's output (L + 1 arrays)."""
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False,
                 num_layers: int | None = None) -> tuple[Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers if num_layers is None else num_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(x, mask, causal)
            states.append(x)
        return tuple(states)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, causal=False, num_layers=None) -> tuple[Array, ...]:
        return CLIPLayerCollection(self.config, self.dtype, name="layers")(x, mask, causal, num_layers)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: Array          # (B, L, D), after final_layer_norm
    pooler_output: Array              # (B, D) at the end-of-text token
    hidden_states: tuple | None = None  # embeddings + each layer, (B, L, D) each, before the norm
    text_embeds: Array | None = None  # (B, projection_dim): CLIPTextModelWithProjection only


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: Array          # (B, 1 + N, D), before post_layernorm
    pooler_output: Array              # (B, D): post_layernorm of the class token
    hidden_states: tuple | None = None


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """Causal text transformer. `clip_skip=k` (diffusers' meaning) makes `last_hidden_state` the
    output of layer `L-k` passed through `final_layer_norm`; `pooler_output` stays the full
    model's."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 output_hidden_states: bool = False, clip_skip: int | None = None) -> CLIPTextOutput:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise JaxdiffError(f"{input_ids.shape[-1]} tokens is more than the text encoder's "
                               f"{c.max_position_embeddings}; tokenise with jaxdiff.tokenizer (it truncates)")
        if clip_skip is not None and not 0 <= clip_skip < c.num_hidden_layers:
            raise JaxdiffError(f"clip_skip={clip_skip} must be in [0, {c.num_hidden_layers - 1}]")
        mask = None
        if attention_mask is not None:  # (B, L) 1 = token, 0 = padding; combined with the causal mask
            mask = attention_mask.astype(bool)[:, None, None, :]
        states = self.encoder(self.embeddings(input_ids), mask, True)
        last = self.final_layer_norm(states[-1])
        if c.eos_token_id == 2:
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
        if clip_skip:
            last = self.final_layer_norm(states[-(clip_skip + 1)])
        return CLIPTextOutput(last, pooled, states if output_hidden_states else None)


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        patch = _pair(c.patch_size)
        gh, gw = c.grid
        if pixel_values.shape[1:] != (gh * patch[0], gw * patch[1], c.num_channels):
            raise JaxdiffError(
                f"CLIP expects images of shape (B, {gh * patch[0]}, {gw * patch[1]}, {c.num_channels}) "
                f"(NHWC), got {tuple(pixel_values.shape)}; resize or crop to the CLIP size first")
        class_embedding = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5),
                                     (c.hidden_size,))
        x = nn.Conv(c.hidden_size, patch, strides=patch, padding="VALID", use_bias=False,
                    dtype=self.dtype, name="patch_embedding")(pixel_values)
        b = x.shape[0]
        x = x.reshape(b, gh * gw, c.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        positions = nn.Embed(gh * gw + 1, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(gh * gw + 1))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        c = self.config
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = ln("pre_layrnorm")(x)
        states = CLIPEncoder(c, self.dtype, name="encoder")(x)
        pooled = ln("post_layernorm")(states[-1][:, 0])
        return CLIPVisionOutput(states[-1], pooled, states if output_hidden_states else None)


# --------------------------------------------------------------------------------------------
# Models (one per transformers architecture)
# --------------------------------------------------------------------------------------------

def _projection(dim: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(dim, use_bias=False, dtype=dtype, name=name)


class CLIPTextModel(nn.Module):
    """`apply(params, input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None)`
    → `CLIPTextOutput`. The Stable Diffusion text encoder."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None):
        return self.text_model(input_ids, attention_mask, output_hidden_states, clip_skip)


class CLIPTextModelWithProjection(nn.Module):
    """Adds `text_projection`; `get_text_features(ids) -> (B, projection_dim)`. Called, it
    returns the tower's `CLIPTextOutput` with `text_embeds` (the projected pooled output, as
    transformers' `CLIPTextModelWithProjection`): SDXL's second text encoder (OpenCLIP bigG) gives
    the UNet its penultimate `hidden_states[-2]` and the pooled `text_embeds`."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype)
        self.text_projection = _projection(self.config.projection_dim, self.dtype, "text_projection")

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None):
        out = self.text_model(input_ids, attention_mask, output_hidden_states, clip_skip)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)


class CLIPVisionModel(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.config, self.dtype)

    def __call__(self, pixel_values, output_hidden_states=False):
        return self.vision_model(pixel_values, output_hidden_states)


class CLIPVisionModelWithProjection(nn.Module):
    """Adds `visual_projection`; `get_image_features(images) -> (B, projection_dim)`."""
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.config, self.dtype)
        self.visual_projection = _projection(self.config.projection_dim, self.dtype, "visual_projection")

    def __call__(self, pixel_values, output_hidden_states=False):
        return self.vision_model(pixel_values, output_hidden_states)

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)


class CLIPModel(nn.Module):
    """Both towers. `get_text_features(ids)`, `get_image_features(images)` give unnormalised
    `(B, projection_dim)` embeddings; `__call__(ids, images)` gives
    `(logits_per_image (Bi, Bt), text_embeds, image_embeds)` with normalised embeddings."""
    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text_config, self.dtype)
        self.vision_model = CLIPVisionTransformer(c.vision_config, self.dtype)
        self.text_projection = _projection(c.projection_dim, self.dtype, "text_projection")
        self.visual_projection = _projection(c.projection_dim, self.dtype, "visual_projection")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        text = self.get_text_features(input_ids, attention_mask)
        image = self.get_image_features(pixel_values)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        logits_per_image = jnp.exp(self.logit_scale) * image @ text.T
        return logits_per_image, text, image


ARCHITECTURES = {
    "CLIPModel": CLIPModel,
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    "CLIPVisionModel": CLIPVisionModel,
    "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection,
}
MODEL_TYPES = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel",
               "clip_vision_model": "CLIPVisionModel"}


def build_model(architecture: str, config, dtype=jnp.float32) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise unknown_choice("CLIP architecture", architecture, ARCHITECTURES)
    return ARCHITECTURES[architecture](config, dtype)


def param_shapes(module: nn.Module) -> dict:
    """The module's parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    if isinstance(module, CLIPModel):
        inputs = (_dummy_ids(module.config.text_config), _dummy_images(module.config.vision_config))
    elif isinstance(module, (CLIPTextModel, CLIPTextModelWithProjection)):
        inputs = (_dummy_ids(module.config),)
    else:
        inputs = (_dummy_images(module.config),)
    init = module.init
    if isinstance(module, CLIPTextModelWithProjection):
        init = lambda key, ids: module.init(key, ids, method=module.get_text_features)  # noqa: E731
    elif isinstance(module, CLIPVisionModelWithProjection):
        init = lambda key, x: module.init(key, x, method=module.get_image_features)  # noqa: E731
    return jax.eval_shape(init, jax.random.PRNGKey(0), *inputs)["params"]


def init_params(module: nn.Module, key: Array) -> dict:
    """Random parameters (tests, training from scratch)."""
    shapes = param_shapes(module)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def _dummy_ids(c: CLIPTextConfig):
    return jax.ShapeDtypeStruct((1, c.max_position_embeddings), jnp.int32)


def _dummy_images(c: CLIPVisionConfig):
    (ph, pw), (gh, gw) = _pair(c.patch_size), c.grid
    return jax.ShapeDtypeStruct((1, gh * ph, gw * pw, c.num_channels), jnp.float32)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def load_clip(path: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
              param_dtype=jnp.float32, hidden_act: str | None = None,
              variant: str | None = None, allow_outside_paths: bool = False) -> tuple[nn.Module, dict]:
    """`(module, params)` from a transformers CLIP folder or an OpenAI/open_clip ViT state dict.

    `path`: a transformers folder (config.json + model.safetensors or flax_model.msgpack; a
    pipeline folder with `subfolder="text_encoder"`), a folder holding `open_clip_model.safetensors`,
    or an open_clip-layout `*.safetensors` file. `dtype` is the compute dtype, `param_dtype` the
    dtype of the loaded parameters. `hidden_act` overrides the activation of an open_clip state
    dict, which does not record it (default: OpenAI's `quick_gelu`, or what an
    `open_clip_config.json` beside it says). `variant` prefers e.g. `model.fp16.safetensors`.
    `allow_outside_paths`: see `jaxdiff.weights.find_weights`."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise JaxdiffError(f"{p} is not a safetensors file; pass a CLIP folder or an open_clip "
                               f"*.safetensors state dict")
        return load_open_clip(p, dtype=dtype, param_dtype=param_dtype, hidden_act=hidden_act)
    if p.is_dir():
        has_config = (p / "config.json").is_file() or bool(subfolder and (p / subfolder / "config.json").is_file())
        if not has_config:
            for name in OPEN_CLIP_FILES:
                if (p / name).is_file():
                    return load_open_clip(p / name, dtype=dtype, param_dtype=param_dtype, hidden_act=hidden_act)
    folder, raw = W.read_config(p, subfolder)
    architecture = _architecture(folder, raw, variant, allow_outside_paths)
    if architecture == "CLIPModel":
        config = CLIPConfig.from_dict(raw)
    elif architecture.startswith("CLIPText"):
        config = CLIPTextConfig.from_dict(raw.get("text_config", raw))
    else:
        config = CLIPVisionConfig.from_dict(raw.get("vision_config", raw))
    module = build_model(architecture, config, dtype)
    params = W.load_params(folder, param_shapes(module), ignore=_is_buffer, dtype=param_dtype,
                           torch_rename=_tower_prefix(architecture), variant=variant,
                           allow_outside_paths=allow_outside_paths)
    return module, params


def load_clip_text_encoder(path: str | os.PathLike, *, subfolder: str | None = "text_encoder",
                           dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
                           allow_outside_paths: bool = False) -> tuple[nn.Module, dict]:
    """A pipeline's (or a folder's own) CLIP text encoder; anything but a CLIP text model is an error."""
    module, params = load_clip(path, subfolder=subfolder, dtype=dtype, param_dtype=param_dtype,
                               variant=variant, allow_outside_paths=allow_outside_paths)
    if not isinstance(module, (CLIPTextModel, CLIPTextModelWithProjection)):
        raise JaxdiffError(f"{path} holds a {type(module).__name__}, not a CLIP text encoder")
    return module, params


def _is_buffer(name: str) -> bool:
    return name.endswith("position_ids")


_TOWER_PARTS = ("embeddings.", "encoder.", "final_layer_norm.", "pre_layrnorm.", "post_layernorm.")


def _tower_prefix(architecture: str):
    """transformers v5 saves `CLIPTextModel`/`CLIPVisionModel` without the `text_model.` /
    `vision_model.` prefix that v4 (and the Flax port) used; accept both."""
    if architecture not in ("CLIPTextModel", "CLIPVisionModel"):
        return None
    tower = "text_model." if architecture == "CLIPTextModel" else "vision_model."
    return lambda name: tower + name if name.startswith(_TOWER_PARTS) else name


def _architecture(folder: Path, config: Mapping, variant: str | None = None,
                  allow_outside_paths: bool = False) -> str:
    for name in config.get("architectures") or []:
        name = name[len("Flax"):] if name.startswith("Flax") else name
        if name in ARCHITECTURES:
            return _with_projection(folder, name, variant, allow_outside_paths)
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES and not config.get("architectures"):
        return _with_projection(folder, MODEL_TYPES[model_type], variant, allow_outside_paths)
    found = config.get("_class_name") or ", ".join(config.get("architectures") or []) or model_type \
        or "model without a model_type"
    raise JaxdiffError(
        f"{folder} holds a {found}, not a CLIP model; pass a transformers CLIP folder (CLIPModel, "
        f"CLIPTextModel, CLIPVisionModel, ...) or an open_clip ViT *.safetensors state dict")


def _with_projection(folder: Path, architecture: str, variant: str | None = None,
                     allow_outside_paths: bool = False) -> str:
    """A config without `architectures` may still hold projection weights: look at the names."""
    if architecture not in ("CLIPTextModel", "CLIPVisionModel"):
        return architecture
    projection = "text_projection" if architecture == "CLIPTextModel" else "visual_projection"
    names = _weight_names(folder, variant, allow_outside_paths)
    if any(n.split(".")[0].split("/")[0] == projection for n in names):
        return architecture.replace("Model", "ModelWithProjection")
    return architecture


def _weight_names(folder: Path, variant: str | None = None, allow_outside_paths: bool = False) -> list[str]:
    files = W.find_weights(folder, variant, allow_outside_paths=allow_outside_paths)
    if files[0].suffix == ".msgpack":
        return list(W.read_msgpack(files[0]).keys())
    return [name for f in files for name in W.safetensors_names(f)]


# --------------------------------------------------------------------------------------------
# OpenAI / open_clip layout
# --------------------------------------------------------------------------------------------

_OPEN_CLIP_SKIP = {"attn_mask", "input_resolution", "context_length", "vocab_size"}
_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                  "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


def open_clip_config(state: Mapping[str, np.ndarray], hidden_act: str = "quick_gelu") -> CLIPConfig:
    """Sizes inferred from an OpenAI-layout ViT state dict, as open_clip's
    `build_model_from_openai_state_dict` does (64-dimensional heads)."""
    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in state):
            raise JaxdiffError("this open_clip state dict is a ResNet CLIP; only ViT CLIPs are supported")
        raise JaxdiffError("not an OpenAI/open_clip ViT CLIP state dict (no visual.proj / "
                           "visual.conv1.weight); pass a transformers CLIP folder or a ViT state dict")
    conv = state["visual.conv1.weight"]
    vision_width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    vision_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    embed_dim = state["text_projection"].shape[1]
    vocab_size = state["token_embedding.weight"].shape[0]
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=embed_dim, num_hidden_layers=text_layers,
        num_attention_heads=max(text_width // 64, 1),
        max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=hidden_act,
        pad_token_id=0, bos_token_id=vocab_size - 2, eos_token_id=2)  # 2: pool at argmax(ids)
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=embed_dim, num_hidden_layers=vision_layers,
        num_attention_heads=max(vision_width // 64, 1), num_channels=channels,
        image_size=grid * patch, patch_size=patch, hidden_act=hidden_act)
    return CLIPConfig(_check_config(text), _check_config(vision), projection_dim=embed_dim)


def open_clip_to_transformers(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """OpenAI/open_clip names and layouts → transformers `CLIPModel` PyTorch names and layouts
    (fused `in_proj` split into q/k/v; `text_projection`/`visual.proj`, stored as `x @ P`,
    transposed to Linear weights)."""
    for name, value in tensors:
        if name in _OPEN_CLIP_SKIP:
            continue
        tower, rest = ("vision_model", name[len("visual."):]) if name.startswith("visual.") \
            else ("text_model", name)
        if rest.startswith("transformer.resblocks."):
            _, _, i, sub = rest.split(".", 3)
            prefix = f"{tower}.encoder.layers.{i}."
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = "weight" if sub.endswith("weight") else "bias"
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                    yield f"{prefix}self_attn.{proj}.{leaf}", part
                continue
            module, _, leaf = sub.rpartition(".")
            if module not in _BLOCK_RENAMES:
                raise JaxdiffError(f"open_clip state dict: unexpected parameter {name!r}")
            yield prefix + _BLOCK_RENAMES[module] + "." + leaf, value
            continue
        mapped = {
            ("vision_model", "class_embedding"): "vision_model.embeddings.class_embedding",
            ("vision_model", "positional_embedding"): "vision_model.embeddings.position_embedding.weight",
            ("vision_model", "conv1.weight"): "vision_model.embeddings.patch_embedding.weight",
            ("vision_model", "ln_pre.weight"): "vision_model.pre_layrnorm.weight",
            ("vision_model", "ln_pre.bias"): "vision_model.pre_layrnorm.bias",
            ("vision_model", "ln_post.weight"): "vision_model.post_layernorm.weight",
            ("vision_model", "ln_post.bias"): "vision_model.post_layernorm.bias",
            ("text_model", "token_embedding.weight"): "text_model.embeddings.token_embedding.weight",
            ("text_model", "positional_embedding"): "text_model.embeddings.position_embedding.weight",
            ("text_model", "ln_final.weight"): "text_model.final_layer_norm.weight",
            ("text_model", "ln_final.bias"): "text_model.final_layer_norm.bias",
            ("text_model", "logit_scale"): "logit_scale",
        }.get((tower, rest))
        if mapped is not None:
            yield mapped, value
        elif (tower, rest) == ("vision_model", "proj"):
            yield "visual_projection.weight", np.asarray(value).T
        elif (tower, rest) == ("text_model", "text_projection"):
            yield "text_projection.weight", np.asarray(value).T
        else:
            raise JaxdiffError(f"open_clip state dict: unexpected parameter {name!r}; only the "
                               f"OpenAI ViT layout is supported")


def load_open_clip(file: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   hidden_act: str | None = None) -> tuple[CLIPModel, dict]:
    """`(CLIPModel, params)` from an OpenAI/open_clip ViT state dict in a safetensors file."""
    file = Path(file)
    state = dict(W.iter_safetensors(file))
    if hidden_act is None:
        hidden_act = _open_clip_activation(file.parent)
    try:
        config = open_clip_config(state, hidden_act)
    except (KeyError, IndexError) as e:
        raise JaxdiffError(f"{file}: not a complete OpenAI/open_clip ViT state dict (missing {e})") from None
    except JaxdiffError as e:
        raise JaxdiffError(f"{file}: {e}") from None
    module = CLIPModel(config, dtype)
    params = W.torch_state_to_flax(open_clip_to_transformers(state.items()), param_shapes(module),
                                   source=str(file), dtype=param_dtype)
    return module, params


def _open_clip_activation(folder: Path) -> str:
    """open_clip's own `open_clip_config.json` says whether the towers use QuickGELU; OpenAI's
    weights (what the course loads) do."""
    cfg_file = folder / "open_clip_config.json"
    if cfg_file.is_file():
        model_cfg = W.read_json(cfg_file).get("model_cfg", {})
        return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    return "quick_gelu"
