"""SDXL as functions: two text encoders, micro-conditioning, the one CFG sampling loop, VAE decode.

    pipe, params = load_sdxl_pipeline("path/to/stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)
    prompt = tokenize_prompts(pipe, ["an astronaut riding a horse"] * 2)
    cond = micro_conditioning(pipe, 1024, 1024)                  # time ids (6,) / refiner (5,)
    images = generate(pipe, params, prompt, cond, jax.random.key(0), 5.0,
                      config=XLGenerateConfig(num_inference_steps=30))   # (2, 1024, 1024, 3) in [0, 1]

Ensemble of experts (diffusers' base → refiner handoff): the base runs the first part of the
schedule and returns latents, the refiner (an SDXL img2img folder) continues from them:

    lat = generate(base, bp, prompt, micro_conditioning(base, 1024, 1024), key, 5.0,
                   config=XLGenerateConfig(40, denoising_end=0.8, output="latents"))
    images = generate(refiner, rp, tokenize_prompts(refiner, prompts),
                      micro_conditioning(refiner, 1024, 1024), key, 5.0,
                      config=XLGenerateConfig(40, denoising_start=0.8), init_latents=lat)

`generate` is one jitted program per (pipeline, config, batch): both text encoders, the whole
`lax.scan` sampling loop with classifier-free guidance and the VAE. Prompts (`PromptIds`, which
also carries whether the negative branch is zeroed — `force_zeros_for_empty_prompt`), the
micro-conditioning time ids (original size, crop, target size or aesthetic score), keys,
latents and guidance are traced: changing them does not recompile.

What the UNet sees, as diffusers builds it: the penultimate hidden states of `text_encoder`
(CLIP ViT-L) and `text_encoder_2` (OpenCLIP bigG) concatenated (B, 77, 768 + 1280), and
`added_cond_kwargs` = {"text_embeds": text_encoder_2's projected pooled output (B, 1280),
"time_ids": (B, 6) or, for a refiner (`requires_aesthetics_score`), (B, 5)}. A refiner folder
has no `text_encoder`/`tokenizer`. Text encoders run in float32, the UNet in `dtype`, the VAE in
float32 when its config says `force_upcast` (SDXL's own VAE), else in `dtype` (the fp16-fixed
VAE). No invisible watermark is applied (diffusers adds one when `invisible-watermark` is
installed; tests build their pipelines with `add_watermarker=False`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff import weights as W
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import autoencoder_kl as vae_lib
from jaxdiff.models import clip as clip_lib
from jaxdiff.models import unet_2d_condition as unet_lib
from jaxdiff.pipelines import registry
from jaxdiff.pipelines.stable_diffusion import (
    GenerateConfig,
    _to_device,
    check_latents,
    decode_latents,
    encode_images,
    init_steps,
    load_latents,
)
from jaxdiff.sampling import cfg, sample, strength_start
from jaxdiff.schedulers import Scheduler, create_scheduler
from jaxdiff.tokenizer import load_tokenizer, tokenize

CLASS_NAMES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
REQUIRED = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
OPTIONAL = ("text_encoder", "tokenizer")  # a refiner has neither


# --------------------------------------------------------------------------------------------
# The loaded pipeline
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusionXL:
    """The static half of an SDXL pipeline (base or refiner): networks, tokenizers, scheduler and
    the folder's two switches. Hashed by identity (a static jit argument). Parameters live apart:
    `{"unet", "vae", "text_encoder_2"[, "text_encoder"]}`."""
    unet: unet_lib.UNet2DConditionModel
    vae: vae_lib.AutoencoderKL
    text_encoder: Any          # CLIPTextModel, or None (refiner)
    text_encoder_2: Any        # CLIPTextModelWithProjection
    tokenizer: Any             # or None (refiner)
    tokenizer_2: Any
    scheduler: Scheduler
    folder: Path | None = None
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def default_size(self) -> int:
        """sample_size × vae_scale_factor (1024 for SDXL)."""
        size = self.unet.config.sample_size or 128
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        return int(self.text_encoder_2.config.max_position_embeddings)

    @property
    def num_time_ids(self) -> int:
        return 5 if self.requires_aesthetics_score else 6

    def with_scheduler(self, scheduler: Scheduler | str) -> StableDiffusionXL:
        """The same pipeline with another sampler ("euler", "euler-a", "dpm++", ... on the
        folder's schedule, as diffusers' `from_config`), or a Scheduler."""
        if isinstance(scheduler, str):
            if self.folder is None:
                raise JaxdiffError("this pipeline has no folder to read a scheduler config from; "
                                   "pass a Scheduler (jaxdiff.schedulers.create_scheduler)")
            scheduler = create_scheduler(self.folder / "scheduler", name=scheduler)
        return dataclasses.replace(self, scheduler=scheduler)


def _listed(index: dict, component: str) -> bool:
    """model_index.json lists the component with a class (a refiner lists text_encoder as [null, null])."""
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def read_sdxl_index(root: Path) -> dict:
    """model_index.json of an SDXL (base or img2img/refiner) folder, checked."""
    if not (root / "model_index.json").is_file():
        raise JaxdiffError(f"{root} has no model_index.json; pass an SDXL pipeline folder "
                           f"({', '.join(c + '/' for c in REQUIRED)}, model_index.json)")
    index = W.read_json(root / "model_index.json")
    name = registry.pipeline_class(root)
    if name not in CLASS_NAMES:
        raise JaxdiffError(f"{root} holds a {name or 'pipeline without _class_name'}, not an SDXL "
                           f"pipeline ({' / '.join(CLASS_NAMES)})")
    for component in REQUIRED + tuple(c for c in OPTIONAL if _listed(index, c)):
        if not (root / component).is_dir():
            raise JaxdiffError(f"{root} has no {component}/ folder: an SDXL pipeline needs "
                               f"{', '.join(c + '/' for c in REQUIRED)} (and text_encoder/, tokenizer/ "
                               "unless it is a refiner)")
    return index


def load_sdxl_pipeline(folder: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                       vae_dtype=None, text_encoder_dtype=jnp.float32, variant: str | None = None,
                       scheduler: str | Scheduler | None = None,
                       allow_outside_paths: bool = False) -> tuple[StableDiffusionXL, dict]:
    """`(pipe, params)` from a diffusers SDXL folder (StableDiffusionXLPipeline, or an
    StableDiffusionXLImg2ImgPipeline such as the refiner), PyTorch safetensors (plain, `variant`
    such as "fp16", sharded) or old Flax msgpack. Arguments as
    `jaxdiff.pipelines.stable_diffusion.load_pipeline`; params:
    `{"unet", "vae", "text_encoder_2"[, "text_encoder"]}` (each a Flax parameter tree)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise JaxdiffError(f"model folder {root} does not exist" if not root.exists()
                           else f"{root} is not a folder; pass an SDXL pipeline folder")
    index = read_sdxl_index(root)
    sched = scheduler if isinstance(scheduler, Scheduler) else create_scheduler(root / "scheduler", name=scheduler)
    common = {"variant": variant, "allow_outside_paths": allow_outside_paths}

    unet, unet_params = unet_lib.load_unet_2d_condition(root, dtype=dtype, param_dtype=param_dtype, **common)
    params = {"unet": _to_device(unet_params)}
    if unet.config.addition_embed_type != "text_time":
        raise JaxdiffError(f"{root}/unet is not an SDXL UNet (addition_embed_type is "
                           f"{unet.config.addition_embed_type!r}, not 'text_time')")

    _, vae_raw = W.read_config(root, "vae", expect_class=vae_lib.VAE_CLASSES)
    vdt = vae_dtype or vae_lib.decode_dtype(vae_lib.AutoencoderKLConfig.from_dict(vae_raw), dtype)
    vae, vae_params = vae_lib.load_autoencoder_kl(root, dtype=vdt, **common)
    params["vae"] = _to_device(vae_params)

    te_dtype = text_encoder_dtype or dtype
    te_kw = {"dtype": te_dtype, "param_dtype": param_dtype or te_dtype, **common}
    text_encoder = tokenizer = None
    if _listed(index, "text_encoder"):
        text_encoder, p1 = clip_lib.load_clip_text_encoder(root, subfolder="text_encoder", **te_kw)
        params["text_encoder"] = _to_device(p1)
        tokenizer = load_tokenizer(root, subfolder="tokenizer")
    text_encoder_2, p2 = clip_lib.load_clip_text_encoder(root, subfolder="text_encoder_2", **te_kw)
    if not isinstance(text_encoder_2, clip_lib.CLIPTextModelWithProjection):
        raise JaxdiffError(f"{root}/text_encoder_2 holds a {type(text_encoder_2).__name__}; SDXL needs a "
                           "CLIPTextModelWithProjection (its pooled projection conditions the UNet)")
    params["text_encoder_2"] = _to_device(p2)
    tokenizer_2 = load_tokenizer(root, subfolder="tokenizer_2")

    pipe = StableDiffusionXL(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, sched, root,
                             force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                             requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
    _check_compatible(pipe)
    return pipe, params


load_pipeline = load_sdxl_pipeline  # the name jaxdiff.pipelines.registry calls


def _check_compatible(pipe: StableDiffusionXL) -> None:
    u = pipe.unet.config
    widths = [te.config.hidden_size for te in (pipe.text_encoder, pipe.text_encoder_2) if te is not None]
    cross = u.cross_attention_dim if isinstance(u.cross_attention_dim, int) else u.cross_attention_dim[0]
    if sum(widths) != cross:
        raise JaxdiffError(f"{pipe.folder}: the UNet's cross_attention_dim ({cross}) is not the text "
                           f"encoders' hidden sizes together ({' + '.join(map(str, widths))}); the "
                           "components do not belong together")
    want = pipe.text_encoder_2.config.projection_dim + pipe.num_time_ids * u.addition_time_embed_dim
    if want != u.projection_class_embeddings_input_dim:
        other = "disable" if pipe.requires_aesthetics_score else "enable"
        raise JaxdiffError(
            f"{pipe.folder}: the UNet's add_embedding takes {u.projection_class_embeddings_input_dim} "
            f"inputs but {pipe.num_time_ids} time ids and a {pipe.text_encoder_2.config.projection_dim}-wide "
            f"pooled embedding make {want}; {other} requires_aesthetics_score in model_index.json")
    if u.in_channels != pipe.vae.config.latent_channels:
        raise JaxdiffError(f"{pipe.folder}: the UNet takes {u.in_channels} channels but the VAE makes "
                           f"{pipe.vae.config.latent_channels}-channel latents")


# --------------------------------------------------------------------------------------------
# Prompts and micro-conditioning
# --------------------------------------------------------------------------------------------

class PromptIds(NamedTuple):
    """Token ids of both tokenizers (B, 77) int32 (`ids` is None for a refiner) and
    `negative_scale` () float32: 0 zeroes the unconditional branch (`force_zeros_for_empty_prompt`
    with no negative prompt), 1 uses the negative prompts. A pytree: all of it is traced."""
    ids: np.ndarray | None
    ids_2: np.ndarray
    negative_ids: np.ndarray | None
    negative_ids_2: np.ndarray
    negative_scale: np.ndarray


def _as_list(x, n: int, what: str) -> list[str]:
    x = [x] * n if isinstance(x, str) else list(x)
    if len(x) != n:
        raise JaxdiffError(f"{len(x)} {what} for {n} prompts; give one, or one per prompt")
    return x


def tokenize_prompts(pipe: StableDiffusionXL, prompts: str | Sequence[str],
                     negative_prompts: str | Sequence[str] | None = None, *,
                     prompts_2: str | Sequence[str] | None = None,
                     negative_prompts_2: str | Sequence[str] | None = None) -> PromptIds:
    """Both tokenizers' ids, as diffusers' `encode_prompt`: `prompt_2` defaults to `prompt`,
    `negative_prompt_2` to `negative_prompt`; with no negative prompt at all and the folder's
    `force_zeros_for_empty_prompt`, the unconditional embeddings are zeros. Prompts longer than
    77 tokens are truncated with a warning (`jaxdiff.tokenizer`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    prompts_2 = _as_list(prompts_2, n, "prompts_2") if prompts_2 else prompts
    zero = negative_prompts is None and pipe.force_zeros_for_empty_prompt
    negative_prompts = _as_list(negative_prompts or "", n, "negative prompts")
    negative_prompts_2 = _as_list(negative_prompts_2, n, "negative_prompts_2") if negative_prompts_2 \
        else negative_prompts
    length = pipe.max_length
    first = pipe.tokenizer is not None
    return PromptIds(
        tokenize(pipe.tokenizer, prompts, length) if first else None,
        tokenize(pipe.tokenizer_2, prompts_2, length),
        tokenize(pipe.tokenizer, negative_prompts, length) if first else None,
        tokenize(pipe.tokenizer_2, negative_prompts_2, length),
        np.float32(0.0 if zero else 1.0))


def encode_prompt(pipe: StableDiffusionXL, params: dict, ids, ids_2, clip_skip: int | None = None):
    """(context (B, 77, D1 + D2), pooled (B, P)): the penultimate hidden states of both text
    encoders (layer L − 1 − clip_skip's), concatenated, and text_encoder_2's `text_embeds`."""
    layer = -(2 + (clip_skip or 0))
    states = []
    if pipe.text_encoder is not None:
        out = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids, output_hidden_states=True)
        states.append(out.hidden_states[layer])
    out2 = pipe.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2, output_hidden_states=True)
    states.append(out2.hidden_states[layer])
    return jnp.concatenate(states, axis=-1), out2.text_embeds


class MicroConditioning(NamedTuple):
    """The time ids of the conditional and unconditional branches, (n,) or (B, n) float32."""
    time_ids: np.ndarray
    negative_time_ids: np.ndarray


def micro_conditioning(pipe: StableDiffusionXL, height: int, width: int, *,
                       original_size: tuple | None = None, crops_coords_top_left: tuple = (0, 0),
                       target_size: tuple | None = None, negative_original_size: tuple | None = None,
                       negative_crops_coords_top_left: tuple = (0, 0),
                       negative_target_size: tuple | None = None, aesthetic_score: float = 6.0,
                       negative_aesthetic_score: float = 2.5, img2img: bool = False) -> MicroConditioning:
    """SDXL's size and crop conditioning (Podell et al. 2023, §2.2) as diffusers' pipelines build
    it: (original_size, crops_coords_top_left, target_size) for a base, (original_size, crop,
    aesthetic_score) for a refiner; sizes default to (height, width). The unconditional branch
    gets the conditional ids unless negative sizes are given (txt2img: both negative sizes;
    img2img: each defaults to its positive one, and a base's negative crop is the positive one,
    as diffusers' img2img does)."""
    original_size = tuple(original_size or (height, width))
    target_size = tuple(target_size or (height, width))
    crop, neg_crop = tuple(crops_coords_top_left), tuple(negative_crops_coords_top_left)
    if pipe.requires_aesthetics_score:
        ids = original_size + crop + (aesthetic_score,)
        neg = tuple(negative_original_size or original_size) + neg_crop + (negative_aesthetic_score,)
    elif img2img:
        ids = original_size + crop + target_size
        neg = tuple(negative_original_size or original_size) + crop + tuple(negative_target_size or target_size)
    else:
        ids = original_size + crop + target_size
        neg = ids
        if negative_original_size is not None and negative_target_size is not None:
            neg = tuple(negative_original_size) + neg_crop + tuple(negative_target_size)
    if len(ids) != pipe.num_time_ids:
        raise JaxdiffError("original_size, crops_coords_top_left and target_size must be pairs")
    return MicroConditioning(np.asarray(ids, np.float32), np.asarray(neg, np.float32))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class XLGenerateConfig(GenerateConfig):
    """`GenerateConfig` (steps, size, strength, clip_skip, output, ...) plus the ensemble-of-
    experts split: `denoising_end` in (0, 1) stops the base after the timesteps ≥ (1 − end)·T
    (return `output="latents"`); `denoising_start` in (0, 1) starts a refiner at the timesteps
    below (1 − start)·T from those latents, unnoised (strength is then ignored, as diffusers
    does). All static."""
    denoising_start: float | None = None
    denoising_end: float | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("denoising_start", "denoising_end"):
            v = getattr(self, name)
            if v is not None and not 0.0 < float(v) < 1.0:
                raise JaxdiffError(f"{name} must be in (0, 1), got {v}")


def _cutoff(sched: Scheduler, fraction: float) -> int:
    t = sched.num_train_timesteps
    return round(t - fraction * t)


def schedule(pipe: StableDiffusionXL, config: XLGenerateConfig):
    """(scheduler state, number of loop steps) for `config`, as diffusers' SDXL pipelines choose
    them (host arithmetic: constants in the compiled program)."""
    sched = pipe.scheduler
    with jax.ensure_compile_time_eval():
        if config.denoising_start is not None:
            state = sched.set_timesteps(sched.create_state(), config.num_inference_steps)
            ts = np.asarray(state.timesteps)
            count = int((ts < _cutoff(sched, config.denoising_start)).sum())
            if sched.order == 2 and count % 2 == 0:
                count += 1
            if count == 0:
                raise JaxdiffError(f"denoising_start={config.denoising_start} with "
                                   f"{config.num_inference_steps} steps leaves no step for the refiner")
            begin = len(ts) - count
            state = state.replace(begin_index=begin,
                                  step_index=jnp.asarray(sched._first_step_index(begin), jnp.int32))
        else:  # img2img's strength is applied traced (`sampling.strength_start`)
            state = sched.set_timesteps(sched.create_state(), config.num_inference_steps)
        n = int(state.loop_timesteps.shape[0])
        if config.denoising_end is not None:
            n = int((np.asarray(state.loop_timesteps) >= _cutoff(sched, config.denoising_end)).sum())
            if n == 0:
                raise JaxdiffError(f"denoising_end={config.denoising_end} with "
                                   f"{config.num_inference_steps} steps leaves no step for the base")
    return state, n


def unet_apply_fn(unet: unet_lib.UNet2DConditionModel, train: bool = False):
    """An SDXL UNet (`pipe.unet`) as `apply(unet_params, x, t, cond) -> model output`, cond the dict
    `{"context": (B, 77, D1 + D2), "text_embeds": (B, P), "time_ids": (B, n)}` that
    `conditioning` makes: the form sampling (`cfg`) and training (`losses.denoising_loss`) take."""
    def apply(unet_params, x, t, cond):
        return unet.apply({"params": unet_params}, x, t, cond["context"], train=train,
                               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
    return apply


def conditioning(pipe: StableDiffusionXL, params: dict, ids, ids_2, time_ids,
                 clip_skip: int | None = None) -> dict:
    """The UNet's conditioning dict for token ids of both tokenizers (`ids` None for a refiner)
    and time ids (B, n): what a fine-tuning step (or a cache of it) feeds `unet_apply_fn`."""
    context, pooled = encode_prompt(pipe, params, ids, ids_2, clip_skip)
    return {"context": context, "text_embeds": pooled, "time_ids": jnp.asarray(time_ids, jnp.float32)}


def _unet_denoiser(pipe: StableDiffusionXL, unet_params):
    apply = unet_apply_fn(pipe.unet)
    return lambda x, t, cond: apply(unet_params, x, t, cond)


def _generate(pipe: StableDiffusionXL, config: XLGenerateConfig, params: dict, prompt: PromptIds,
              time_ids, negative_time_ids, key, guidance_scale, guidance_rescale=0.0, latents=None,
              init_image=None, init_latents=None, img2img_steps=None):
    """The traced body of `generate`; img2img_steps: traced `init_steps` of the strength."""
    batch = prompt.ids_2.shape[0]
    shape = config.latent_shape(pipe, batch)
    img2img = init_image is not None or init_latents is not None
    if img2img != (config.strength is not None or config.denoising_start is not None):
        raise JaxdiffError("img2img needs an init image (or init latents) and XLGenerateConfig(strength=...) "
                           "or denoising_start=...; text-to-image needs neither")
    k_noise, k_encode, k_sample = jax.random.split(key, 3)

    two = (lambda a, b: None if a is None else jnp.concatenate([a, b], axis=0))
    context, pooled = encode_prompt(pipe, params, two(prompt.ids, prompt.negative_ids),
                                    two(prompt.ids_2, prompt.negative_ids_2), config.clip_skip)
    keep = jnp.asarray(prompt.negative_scale, jnp.float32)
    cond = {"context": context[:batch], "text_embeds": pooled[:batch], "time_ids": time_ids}
    uncond = {"context": context[batch:] * keep, "text_embeds": pooled[batch:] * keep,
              "time_ids": negative_time_ids}

    noise = jax.random.normal(k_noise, shape, jnp.float32) if latents is None else jnp.asarray(latents, jnp.float32)
    if tuple(noise.shape) != shape:
        raise JaxdiffError(f"latents of shape {tuple(noise.shape)} do not fit this generation: expected NHWC {shape}")
    rescale = guidance_rescale if config.use_guidance_rescale else 0.0
    guided = cfg(_unet_denoiser(pipe, params["unet"]), jnp.asarray(guidance_scale, jnp.float32), rescale)
    state, num_steps = schedule(pipe, config)
    if img2img:
        if init_latents is None:
            init_latents = encode_images(pipe, params, init_image, k_encode)
        if tuple(init_latents.shape) != shape:
            raise JaxdiffError(f"init latents of shape {tuple(init_latents.shape)} do not fit this "
                               f"generation: expected NHWC {shape}")
        x_start, begin = init_latents.astype(jnp.float32), None
        if config.denoising_start is None:
            if img2img_steps is None:
                img2img_steps = init_steps(config.num_inference_steps, config.strength)
            x_start, begin, state = strength_start(pipe.scheduler, state, img2img_steps, x_start, noise)
        out = sample(guided, pipe.scheduler, state, x_start, k_sample, (cond, uncond), scale_x_T=False,
                     num_steps=num_steps, start_index=begin)
    else:
        out = sample(guided, pipe.scheduler, state, noise, k_sample, (cond, uncond), num_steps=num_steps)
    if config.output == "latents":
        return out
    return decode_latents(pipe, params, out)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))


def _time_ids(ids, batch: int, n: int, what: str) -> jax.Array:
    ids = jnp.asarray(ids, jnp.float32)
    if ids.ndim == 1:
        ids = jnp.broadcast_to(ids, (batch, ids.shape[0]))
    if ids.shape != (batch, n):
        raise JaxdiffError(f"{what} must be ({n},) or ({batch}, {n}) for this pipeline, got {tuple(ids.shape)}")
    return ids


def generate(pipe: StableDiffusionXL, params: dict, prompt: PromptIds, conditioning: MicroConditioning,
             key, guidance_scale=5.0, *, config: XLGenerateConfig = XLGenerateConfig(),
             guidance_rescale=0.0, latents=None, init_image=None, init_latents=None,
             strength=None) -> jax.Array:
    """Generate with classifier-free guidance in one compiled program.

    prompt: `tokenize_prompts(...)`. conditioning: `micro_conditioning(...)` (time ids (n,) for
        all images or (B, n)). key: initial noise, VAE posterior sample, stochastic schedulers.
    guidance_scale, guidance_rescale: traced. latents: initial noise (B, h, w, C) NHWC (txt2img:
        unit Gaussian scaled by the scheduler's init_noise_sigma; img2img: the noise added to the
        init latents). init_image (B, H, W, 3) in [0, 1] or init_latents (B, h, w, C) (scaled):
        img2img (`config.strength` or `strength`) or the refiner's handoff (`config.denoising_start`).
    strength: img2img's strength, traced (default `config.strength`): another strength reuses
        the program (ignored with `denoising_start`, as diffusers does).
    Returns (B, H, W, 3) float32 in [0, 1] (or latents, `config.output="latents"`).
    """
    if not isinstance(prompt, PromptIds):
        raise JaxdiffError("prompt must be the PromptIds of jaxdiff.pipelines.sdxl.tokenize_prompts")
    if (prompt.ids is None) != (pipe.text_encoder is None):
        raise JaxdiffError("these prompt ids were tokenized for another pipeline (base / refiner); "
                           "tokenize them with this one")
    if config.use_guidance_rescale is False and not (isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0):
        config = dataclasses.replace(config, use_guidance_rescale=True)
    strength = config.strength if strength is None else strength
    steps = None
    if strength is not None and config.denoising_start is None:
        config = dataclasses.replace(config, strength=1.0)  # only says "img2img" to the program
        steps = init_steps(config.num_inference_steps, strength)
    batch = np.shape(prompt.ids_2)[0]
    prompt = _prompt_arrays(prompt)
    n = pipe.num_time_ids
    return _generate_jit(pipe, config, params, prompt,
                         _time_ids(conditioning.time_ids, batch, n, "time_ids"),
                         _time_ids(conditioning.negative_time_ids, batch, n, "negative time_ids"), key,
                         jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(guidance_rescale, jnp.float32),
                         latents, init_image, init_latents, steps)


def generate_sharded(pipe: StableDiffusionXL, params: dict, prompt: PromptIds, conditioning: MicroConditioning,
                     key, guidance_scale=5.0, *, mesh=None, latents=None, init_image=None, init_latents=None,
                     **kwargs) -> jax.Array:
    """`generate` with the batch split over the devices of `mesh` (default: every device on
    `data`, `jaxdiff.parallel.mesh`): the same `jit` program as on one device, its per-image
    inputs (token ids, (B, n) time ids, latents, init images) split along the batch and the
    params replicated. The same images as `generate` with the same `key` (float tolerance),
    laid out over the devices. B must split over the mesh's devices."""
    from jax.sharding import NamedSharding

    from jaxdiff.parallel import mesh as mesh_lib

    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    arrays = _prompt_arrays(prompt)
    prompt = arrays._replace(**mesh_lib.split_rows(
        {f: getattr(arrays, f) for f in ("ids", "ids_2", "negative_ids", "negative_ids_2")}, mesh, "prompts"))
    per_image = {f: t for f, t in conditioning._asdict().items() if np.ndim(t) == 2}
    conditioning = conditioning._replace(**mesh_lib.split_rows(per_image, mesh, "time ids"))
    rows = mesh_lib.split_rows({"latents": latents, "init_image": init_image, "init_latents": init_latents},
                               mesh, "images")
    params = jax.device_put(params, NamedSharding(mesh, mesh_lib.REPLICATED))
    return generate(pipe, params, prompt, conditioning, key, guidance_scale, **rows, **kwargs)


def _prompt_arrays(prompt: PromptIds) -> PromptIds:
    as_ids = (lambda a: None if a is None else jnp.asarray(a, jnp.int32))
    return PromptIds(as_ids(prompt.ids), as_ids(prompt.ids_2), as_ids(prompt.negative_ids),
                     as_ids(prompt.negative_ids_2), jnp.asarray(prompt.negative_scale, jnp.float32))


def compile_generate(pipe: StableDiffusionXL, params: dict, batch: int, *,
                     config: XLGenerateConfig = XLGenerateConfig()):
    """Ahead-of-time compile text-to-image `generate` for `batch` prompts; returns
    `fn(params, prompt, conditioning, key, guidance_scale, guidance_rescale=0.0) -> images`
    (benchmarks time compilation with it)."""
    n = pipe.num_time_ids
    ids = jax.ShapeDtypeStruct((batch, pipe.max_length), jnp.int32)
    first = ids if pipe.text_encoder is not None else None
    prompt = PromptIds(first, ids, first, ids, jax.ShapeDtypeStruct((), jnp.float32))
    time_ids = jax.ShapeDtypeStruct((batch, n), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    compiled = _generate_jit.lower(pipe, config, params, prompt, time_ids, time_ids, jax.random.key(0),
                                   scalar, scalar, None, None, None).compile()

    def run(params, prompt: PromptIds, conditioning: MicroConditioning, key, guidance_scale, guidance_rescale=0.0):
        return compiled(params, _prompt_arrays(prompt), _time_ids(conditioning.time_ids, batch, n, "time_ids"),
                        _time_ids(conditioning.negative_time_ids, batch, n, "negative time_ids"), key,
                        jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(guidance_rescale, jnp.float32),
                        None, None, None)

    return run


def compiled_programs() -> int:
    """How many programs `generate` has compiled in this process (tests check prompts,
    guidance and micro-conditioning do not add any)."""
    return _generate_jit._cache_size()


# --------------------------------------------------------------------------------------------
# What sample.stable_diffusion asks for (jaxdiff.pipelines.registry)
# --------------------------------------------------------------------------------------------

def run_request(pipe: StableDiffusionXL, params: dict, request: registry.Request, report: dict) -> np.ndarray:
    """The program's SDXL run: text-to-image, img2img (--init-image), or base → refiner
    (--refiner-dir, --high-noise-frac): (N, H, W, 3) in [0, 1], on one device."""
    from jaxdiff.pipelines.inputs import load_init_image

    r = request
    times = report.setdefault("times", {})
    report["where"] = registry.describe_devices(False, parallel.device_count())
    refiner_dir = getattr(r, "refiner_dir", None)
    high_noise_frac = getattr(r, "high_noise_frac", None)
    if r.init_image and r.latents:
        raise JaxdiffError("--init-image and --latents exclude each other: img2img draws its own noise from --seed")
    if refiner_dir and r.init_image:
        raise JaxdiffError("--refiner-dir refines a text-to-image run; it takes no --init-image")
    if high_noise_frac is not None and not refiner_dir:
        raise JaxdiffError("--high-noise-frac splits the schedule between the base and a refiner: pass --refiner-dir")
    if pipe.text_encoder is None and not r.init_image:
        raise JaxdiffError(f"{pipe.folder} is an SDXL refiner (no text_encoder/): give it --init-image, "
                           "or pass the base folder with --refiner-dir this one")
    factor = pipe.vae_scale_factor
    latents = init_image = None
    num_images = r.num_images
    if r.latents:
        latents = load_latents(r.latents)
        num_images = num_images or latents.shape[0]
        config = XLGenerateConfig(r.steps, r.height or latents.shape[1] * factor, r.width or latents.shape[2] * factor)
        check_latents(latents, config.latent_shape(pipe, num_images), r.latents)
    elif r.init_image:
        image = load_init_image(r.init_image, r.height, r.width, factor)
        num_images = num_images or 1
        init_image = np.repeat(image, num_images, axis=0)
        config = XLGenerateConfig(r.steps, image.shape[1], image.shape[2], strength=r.strength)
    else:
        num_images = num_images or 1
        config = XLGenerateConfig(r.steps, r.height, r.width)
    h, w = config.size(pipe)
    negative = r.negative_prompt or None  # no negative prompt: force_zeros_for_empty_prompt applies
    prompt = tokenize_prompts(pipe, [r.prompt] * num_images, negative)
    key = jax.random.key(r.seed)
    t0 = time.perf_counter()
    if refiner_dir:
        frac = 0.8 if high_noise_frac is None else float(high_noise_frac)
        refiner, rparams = load_sdxl_pipeline(refiner_dir, dtype=pipe.unet.dtype, vae_dtype=None)
        times["load refiner"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        base_cfg = dataclasses.replace(config, denoising_end=frac, output="latents")
        lat = generate(pipe, params, prompt, micro_conditioning(pipe, h, w), key, r.guidance_scale,
                       config=base_cfg, guidance_rescale=r.guidance_rescale, latents=latents)
        ref_cfg = XLGenerateConfig(r.steps, h, w, denoising_start=frac)
        images = generate(refiner, rparams, tokenize_prompts(refiner, [r.prompt] * num_images, negative),
                          micro_conditioning(refiner, h, w, img2img=True), key, r.guidance_scale,
                          config=ref_cfg, guidance_rescale=r.guidance_rescale, init_latents=lat)
    else:
        images = generate(pipe, params, prompt, micro_conditioning(pipe, h, w, img2img=init_image is not None),
                          key, r.guidance_scale, config=config, guidance_rescale=r.guidance_rescale,
                          latents=latents, init_image=init_image)
    images = np.asarray(images)
    times["compile+generate"] = time.perf_counter() - t0
    return images


__all__ = [
    "MicroConditioning",
    "PromptIds",
    "StableDiffusionXL",
    "XLGenerateConfig",
    "compile_generate",
    "compiled_programs",
    "conditioning",
    "encode_prompt",
    "generate",
    "load_pipeline",
    "load_sdxl_pipeline",
    "micro_conditioning",
    "read_sdxl_index",
    "run_request",
    "schedule",
    "tokenize_prompts",
    "unet_apply_fn",
]
