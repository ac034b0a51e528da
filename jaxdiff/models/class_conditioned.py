"""The diffusion course's class-conditioned UNet (unit 2): a learned label embedding, broadcast
over the image and concatenated as extra input channels of a `UNet2DModel`.

Parameter names follow the course's PyTorch `ClassConditionedUnet` (`class_emb`, `model`), so
its state dict maps onto ours through `jaxdiff.weights.torch_state_to_flax` with no renaming.
A UNet whose config sets `num_class_embeds` (diffusers' class embedding, added to the time
embedding of every ResNet block) also gets the labels there: a stronger path that learns the
classes in fewer steps, used by jaxdiff's CPU-sized model (`create(unet_class_embedding=True)`).
With `null_class` the table has one more row, label `num_classes`, that stands for "no label":
training drops labels to it (`--cfg-dropout`) and classifier-free guidance samples against it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import JaxdiffError
from jaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel

CLASS_NAME = "ClassConditionedUnet"

# The course's UNet around the embedding (`in_channels` is 1 + class_emb_size).
COURSE_UNET = dict(
    sample_size=28, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


@dataclasses.dataclass(frozen=True)
class ClassConditionedUnetConfig:
    """The wrapped UNet's config and the label embedding's: `num_classes` labels (one more, the
    "no label" `num_classes`, with `null_class`), each a `class_emb_size` vector."""
    unet: UNet2DConfig = UNet2DConfig(**COURSE_UNET, in_channels=1 + 4)
    num_classes: int = 10
    class_emb_size: int = 4
    null_class: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassConditionedUnetConfig":
        """From the dict `to_dict` writes (a run folder's model config)."""
        try:
            return cls(unet=UNet2DConfig.from_dict(d["unet"]), num_classes=int(d["num_classes"]),
                       class_emb_size=int(d["class_emb_size"]), null_class=bool(d.get("null_class", False)))
        except (KeyError, TypeError) as e:
            raise JaxdiffError(f"not a ClassConditionedUnet config (missing or bad {e})") from None

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, "num_classes": self.num_classes,
                "class_emb_size": self.class_emb_size, "null_class": self.null_class,
                "unet": self.unet.to_dict()}

    @property
    def num_embeddings(self) -> int:
        return self.num_classes + int(self.null_class)

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional", or None without `null_class`."""
        return self.num_classes if self.null_class else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images (the UNet's input less the embedding channels)."""
        h, w = self.unet.image_size
        return h, w, self.unet.in_channels - self.class_emb_size


class ClassConditionedUnet(nn.Module):
    """``__call__(x, t, class_labels)``: x (B, H, W, 1) in [-1, 1], t scalar or (B,) timesteps,
    class_labels (B,) ints in [0, num_classes) (or `num_classes` = no label, with `null_class`)
    → (B, H, W, out_channels) model output (the noise, for the course's scheduler)."""

    config: ClassConditionedUnetConfig
    dtype: jnp.dtype = jnp.float32

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_emb_size(self) -> int:
        return self.config.class_emb_size

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    @property
    def null_label(self) -> int | None:
        return self.config.null_label

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape

    @nn.compact
    def __call__(self, x: jax.Array, t, class_labels: jax.Array) -> jax.Array:
        c = self.config
        if class_labels is None:
            raise JaxdiffError("ClassConditionedUnet needs class_labels (B,) ints")
        labels = jnp.asarray(class_labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise JaxdiffError(f"class_labels must be integer class ids, got dtype {labels.dtype}")
        b, h, w, _ = x.shape
        labels = jnp.broadcast_to(labels, (b,))
        if c.class_emb_size:
            emb = nn.Embed(c.num_embeddings, c.class_emb_size,
                           embedding_init=nn.initializers.normal(1.0), name="class_emb")(labels)
            emb = jnp.broadcast_to(emb[:, None, None, :], (b, h, w, c.class_emb_size)).astype(x.dtype)
            x = jnp.concatenate([x, emb], axis=-1)
        unet = UNet2DModel(c.unet, dtype=self.dtype, name="model")
        return unet(x, t, labels if c.unet.num_class_embeds else None)

    # ---------------------------------------------------------------- config
    @classmethod
    def create(cls, num_classes: int = 10, class_emb_size: int = 4, null_class: bool = False,
               unet_class_embedding: bool = False, dtype=jnp.float32, **unet_config) -> "ClassConditionedUnet":
        """The course's model by default; `unet_config` overrides UNet2DModel config keys.
        `unet_class_embedding` also feeds the labels to the UNet's own class embedding."""
        config = {**COURSE_UNET, **unet_config, "in_channels": unet_config.get("in_channels", 1) + class_emb_size}
        if unet_class_embedding:
            config["num_class_embeds"] = num_classes + int(null_class)
        return cls(ClassConditionedUnetConfig(UNet2DConfig.from_dict(config), num_classes=num_classes,
                                              class_emb_size=class_emb_size, null_class=null_class),
                   dtype=dtype)

    def to_config(self) -> dict:
        """`config.to_dict()`: what a run folder stores."""
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype=jnp.float32) -> "ClassConditionedUnet":
        return cls(ClassConditionedUnetConfig.from_dict(config), dtype=dtype)

    def _init_params(self, rng: jax.Array) -> dict:
        h, w, c = self.image_shape
        return self.init(rng, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1,), jnp.int32))["params"]

    def init_weights(self, rng: jax.Array) -> dict:
        """Freshly initialised parameters (the 'params' collection). One compiled program, built
        without LLVM optimisation: it runs once, and XLA:CPU otherwise spends many seconds
        optimising the random-number code of every parameter."""
        init = jax.jit(self._init_params)
        return init.lower(rng).compile({"xla_backend_optimization_level": 0})(rng)

    def param_template(self) -> dict:
        """The parameter tree as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
        return jax.eval_shape(self._init_params, jax.random.PRNGKey(0))
