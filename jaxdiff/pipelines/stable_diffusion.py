"""Stable Diffusion 1.x/2.x as functions: tokenise → encode prompts → CFG sampling loop → VAE decode.

    pipe, params = load_pipeline("path/to/stable-diffusion-v1-5", dtype=jnp.bfloat16)
    ids, neg = tokenize_prompts(pipe, ["a red apple"] * 4, "blurry")
    config = GenerateConfig(num_inference_steps=50, height=512, width=512)
    images = generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=config)  # (4, 512, 512, 3) in [0, 1]

`generate` is one jitted program per (pipeline, `GenerateConfig`, batch size): the text
encoder, the whole sampling loop (a `lax.scan` over the scheduler's timesteps, classifier-free
guidance as one batched UNet call per step) and the VAE decoder. Prompts, negative prompts,
keys, initial latents, init images and `guidance_scale` are traced: changing them does not
recompile. `generate_parallel` runs the same program on every local device with `pmap`
(params replicated once by `replicate_params`, prompts and keys split over the devices).

Precision: the UNet (and its parameters) in `dtype` (bf16 by default); the latents and every
scheduler operation in float32; the text encoder in float32 (one call per image); the VAE in
float32 when its config says `force_upcast` (SD 1.x/2.x: its decoder overflows in half
precision), else in `dtype`. Pass `vae_dtype` / `text_encoder_dtype` to choose otherwise.

A folder is loaded as published (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`), with PyTorch `*.safetensors` (or a `variant` such as "fp16") or the
old Flax `*.msgpack` weights; torch is not needed. Tensors are read one at a time (plain reads)
and moved to the device as they come, so host memory stays near the parameters' size.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Sequence

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
from jaxdiff.sampling import as_denoiser, cfg, sample, strength_start
from jaxdiff.schedulers import Scheduler, create_scheduler
from jaxdiff.tokenizer import load_tokenizer, tokenize

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_COMPONENT_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
}


# --------------------------------------------------------------------------------------------
# The loaded pipeline
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """The static half of a Stable Diffusion pipeline: the three networks (Flax modules), the
    tokenizer and the scheduler. Hashed by identity, so it can be a static jit argument. The
    parameters live apart, in a dict `{"unet": ..., "vae": ..., "text_encoder": ...}`."""
    unet: unet_lib.UNet2DConditionModel
    vae: vae_lib.AutoencoderKL
    text_encoder: Any  # jaxdiff.models.clip.CLIPTextModel[WithProjection]
    tokenizer: Any
    scheduler: Scheduler
    folder: Optional[Path] = None

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the diffusion latents (the VAE's; the UNet may take more: inpaint, upscale)."""
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        """The image side the UNet was trained for: sample_size × vae_scale_factor (512 for SD1.5)."""
        size = self.unet.config.sample_size or 64
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    def with_scheduler(self, scheduler: Scheduler | str) -> "StableDiffusion":
        """The same pipeline with another sampler (a name such as "dpm++" keeps the folder's
        beta schedule and prediction type, as diffusers' `from_config` does)."""
        if isinstance(scheduler, str):
            if self.folder is None:
                raise JaxdiffError("this pipeline has no folder to read a scheduler config from; "
                                   "pass a Scheduler (jaxdiff.schedulers.create_scheduler)")
            scheduler = create_scheduler(self.folder / "scheduler", name=scheduler)
        return dataclasses.replace(self, scheduler=scheduler)


def read_model_index(folder: Path, kinds: Sequence[str] = ("text-to-image",)) -> dict:
    """`model_index.json` of a pipeline folder (empty when absent), checked to be a pipeline of
    one of `kinds` (`registry.KINDS`) made of Stable Diffusion's components."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        present = [c for c in COMPONENTS if (folder / c).is_dir()]
        if not present:
            raise JaxdiffError(f"{folder} is not a diffusers pipeline folder (no model_index.json "
                               f"and none of the folders {', '.join(COMPONENTS)})")
        return {}
    index = W.read_json(index_path)
    name = registry.pipeline_class(folder)
    spec = registry.spec_for_class(name, folder)
    if spec.kind not in kinds:
        raise JaxdiffError(f"{folder} holds a {name}: {spec.description}, not "
                           f"{' / '.join(registry.spec_for_kind(k).description for k in kinds)}; load it "
                           f"with {spec.module}.load_pipeline (sample.stable_diffusion picks it by itself)")
    for component, classes in _COMPONENT_CLASSES.items():
        entry = index.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            cls = str(entry[1])
            cls = cls[len("Flax"):] if cls.startswith("Flax") else cls
            if cls not in classes:
                raise JaxdiffError(f"{folder}/model_index.json: {component} is a {entry[1]}, not a "
                                   f"{' / '.join(sorted(classes))}; this is not a Stable Diffusion pipeline")
    return index


def _check_components(folder: Path, index: dict) -> None:
    for component in COMPONENTS:
        if not (folder / component).is_dir():
            listed = " (model_index.json lists it)" if component in index else ""
            raise JaxdiffError(f"{folder} has no {component}/ folder{listed}: a Stable Diffusion "
                               f"pipeline needs {', '.join(c + '/' for c in COMPONENTS)}")


def _to_device(tree: dict) -> dict:
    """Move a nested dict of host arrays to the default device leaf by leaf, in place, dropping
    each host copy as soon as its device copy exists (peak host memory: one tensor)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _to_device(v)
        else:
            tree[k] = jax.device_put(v).block_until_ready()  # else the host copy lives on
    return tree


def load_pipeline(folder: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                  vae_dtype=None, text_encoder_dtype=jnp.float32, variant: str | None = None,
                  scheduler: str | Scheduler | None = None,
                  allow_outside_paths: bool = False) -> tuple[StableDiffusion, dict]:
    """`(pipe, params)` from a diffusers Stable Diffusion 1.x/2.x text-to-image folder.

    dtype: compute dtype of the UNet. param_dtype: storage dtype of the UNet and text encoder
        parameters (default: their compute dtype). vae_dtype: the VAE's compute and storage dtype
        (default: float32 when its config has `force_upcast`, else `dtype`).
    variant: weight-file variant to prefer, e.g. "fp16" (`*.fp16.safetensors`).
    scheduler: a sampler name ("pndm", "ddim", "euler", "dpm++", ...) built on the folder's
        `scheduler/` config, or a Scheduler; default: the folder's own scheduler.
    allow_outside_paths: let shard indexes name files outside their component folder.
    """
    pipe, params = load_components(folder, dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype,
                                   text_encoder_dtype=text_encoder_dtype, variant=variant,
                                   scheduler=scheduler, allow_outside_paths=allow_outside_paths)
    _check_compatible(pipe.folder, pipe.unet.config, pipe.vae.config, pipe.text_encoder.config)
    return pipe, params


def load_single_file(file: str | os.PathLike, **kwargs) -> tuple[Any, dict]:
    """`(pipe, params)` from one original-layout `.safetensors` checkpoint: for SD 1.x/2.x the
    `StableDiffusion` objects `load_pipeline` returns, for SDXL base/refiner files the
    `sdxl.StableDiffusionXL` ones `sdxl.load_sdxl_pipeline` returns; `config_dir=`,
    `prediction_type=` and the dtype/scheduler arguments of `load_pipeline` (see
    `jaxdiff.single_file.load_single_file`)."""
    from jaxdiff.single_file import load_single_file as load

    return load(file, **kwargs)


def load_components(folder: str | os.PathLike, *, kinds: Sequence[str] = ("text-to-image",),
                    dtype=jnp.bfloat16, param_dtype=None, vae_dtype=None,
                    text_encoder_dtype=jnp.float32, variant: str | None = None,
                    scheduler: str | Scheduler | None = None,
                    allow_outside_paths: bool = False) -> tuple[StableDiffusion, dict]:
    """The five Stable Diffusion components of a folder whose pipeline is one of `kinds`, as a
    `StableDiffusion` (the UNet's input channels unchecked: inpaint, depth and upscale
    pipelines check their own). Arguments as `load_pipeline`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise JaxdiffError(f"model folder {root} does not exist" if not root.exists()
                           else f"{root} is not a folder; pass a Stable Diffusion pipeline folder")
    index = read_model_index(root, kinds)
    _check_components(root, index)

    if isinstance(scheduler, Scheduler):
        sched = scheduler
    else:
        sched = create_scheduler(root / "scheduler", name=scheduler)
    tokenizer = load_tokenizer(root, subfolder="tokenizer")

    unet, unet_params = unet_lib.load_unet_2d_condition(root, dtype=dtype, param_dtype=param_dtype,
                                                        variant=variant,
                                                        allow_outside_paths=allow_outside_paths)
    unet_params = _to_device(unet_params)

    _, vae_raw = W.read_config(root, "vae", expect_class=vae_lib.VAE_CLASSES)
    vae_config = vae_lib.AutoencoderKLConfig.from_dict(vae_raw)
    vdt = vae_dtype or vae_lib.decode_dtype(vae_config, dtype)
    vae, vae_params = vae_lib.load_autoencoder_kl(root, dtype=vdt, variant=variant,
                                                  allow_outside_paths=allow_outside_paths)
    vae_params = _to_device(vae_params)

    te_dtype = text_encoder_dtype or dtype
    text_encoder, te_params = clip_lib.load_clip_text_encoder(
        root, dtype=te_dtype, variant=variant, param_dtype=param_dtype or te_dtype,
        allow_outside_paths=allow_outside_paths)
    te_params = _to_device(te_params)

    _check_text_encoder(root, unet.config, text_encoder.config)
    pipe = StableDiffusion(unet, vae, text_encoder, tokenizer, sched, root)
    return pipe, {"unet": unet_params, "vae": vae_params, "text_encoder": te_params}


def _check_text_encoder(folder: Path, unet_cfg, te_cfg) -> None:
    cross = unet_cfg.cross_attention_dim
    cross = cross if isinstance(cross, int) else cross[0]
    if unet_cfg.encoder_hid_dim_type is None and cross != te_cfg.hidden_size:
        raise JaxdiffError(f"{folder}: the UNet's cross_attention_dim ({cross}) differs from the text "
                           f"encoder's hidden_size ({te_cfg.hidden_size}); the components do not belong together")


def _check_compatible(folder: Path, unet_cfg, vae_cfg, te_cfg) -> None:
    _check_text_encoder(folder, unet_cfg, te_cfg)
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise JaxdiffError(f"{folder}: the UNet takes {unet_cfg.in_channels} channels but the VAE makes "
                           f"{vae_cfg.latent_channels}-channel latents; this is not a text-to-image pipeline")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

def tokenize_prompts(pipe: StableDiffusion, prompts: str | Sequence[str],
                     negative_prompts: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids `(B, 77)` int32 of the prompts and of the negative prompts (one per prompt, or
    one for all; default the empty prompt, as diffusers uses for the unconditional branch)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None:
        negative_prompts = ""
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise JaxdiffError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; "
                           "give one negative prompt, or one per prompt")
    return (tokenize(pipe.tokenizer, prompts, pipe.max_length),
            tokenize(pipe.tokenizer, negative_prompts, pipe.max_length))


def encode_prompt(pipe: StableDiffusion, params: dict, input_ids: jax.Array,
                  clip_skip: Optional[int] = None) -> jax.Array:
    """Text embeddings (B, 77, hidden) the UNet attends to: the text encoder's last hidden state
    after its final layer norm (or layer L − clip_skip's, diffusers' `clip_skip`). SD 2.x folders
    hold a text encoder whose config already stops at the penultimate layer."""
    out = pipe.text_encoder.apply({"params": params["text_encoder"]}, input_ids, clip_skip=clip_skip)
    return out.last_hidden_state


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """The static settings of one compiled program (changing any of them recompiles).

    height, width: image size in pixels (multiples of the VAE's factor, 8); None = the UNet's
        default (512 for SD 1.5, 768 for SD 2.x-768).
    strength: img2img only, in (0, 1]: the fraction of the schedule that is run. `generate`
        passes its value traced (one program for every strength; `strength=` overrides it).
    use_guidance_rescale: apply `guidance_rescale` (Lin et al. 2023); the value itself is traced.
    output: "images" ((B, H, W, 3) float32 in [0, 1]) or "latents" ((B, h, w, C) float32).
    """
    num_inference_steps: int = 50
    height: Optional[int] = None
    width: Optional[int] = None
    strength: Optional[float] = None
    use_guidance_rescale: bool = False
    clip_skip: Optional[int] = None
    output: str = "images"

    def __post_init__(self):
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise JaxdiffError(f"num_inference_steps must be a positive int, got {self.num_inference_steps!r}")
        if self.output not in ("images", "latents"):
            raise JaxdiffError(f"output {self.output!r}; choose one of: images, latents")
        if self.strength is not None and not 0.0 < float(self.strength) <= 1.0:
            raise JaxdiffError(f"strength must be in (0, 1], got {self.strength}")

    def size(self, pipe: StableDiffusion) -> tuple[int, int]:
        h = self.height or pipe.default_size
        w = self.width or pipe.default_size
        f = pipe.vae_scale_factor
        if h % f or w % f or h <= 0 or w <= 0:
            raise JaxdiffError(f"height and width must be positive multiples of {f}, got {h}×{w}")
        return h, w

    def latent_shape(self, pipe: StableDiffusion, batch: int) -> tuple[int, int, int, int]:
        h, w = self.size(pipe)
        f = pipe.vae_scale_factor
        return (batch, h // f, w // f, pipe.latent_channels)


def init_steps(num_inference_steps: int, strength) -> jax.Array:
    """diffusers' img2img `init_timestep = min(int(n · strength), n)` (the steps run) as an int32
    array: exact on the host for a Python strength (a JaxdiffError when it leaves no step), in
    float32 (+1e-4) for a traced one."""
    n = num_inference_steps
    if isinstance(strength, (int, float, np.floating, np.integer)):
        if not 0.0 < float(strength) <= 1.0:
            raise JaxdiffError(f"strength must be in (0, 1], got {strength}")
        init = min(int(n * float(strength)), n)
        if init < 1:
            raise JaxdiffError(f"strength={strength} with {n} steps leaves no denoising step; raise "
                               "strength or the number of steps")
        return jnp.asarray(init, jnp.int32)
    return jnp.minimum(jnp.floor(n * jnp.asarray(strength, jnp.float32) + 1e-4), n).astype(jnp.int32)


def _traced_strength(config: GenerateConfig, strength):
    """(config with strength 1.0 as the img2img flag, traced init steps) — or (config, None)
    for text-to-image."""
    strength = config.strength if strength is None else strength
    if strength is None:
        return config, None
    return dataclasses.replace(config, strength=1.0), init_steps(config.num_inference_steps, strength)


def _generate(pipe: StableDiffusion, config: GenerateConfig, params: dict, prompt_ids, negative_ids,
              key, guidance_scale, guidance_rescale=0.0, latents=None, init_image=None,
              init_latents=None, img2img_steps=None):
    """The traced body shared by `generate` and `generate_parallel` (see `generate`);
    img2img_steps: traced `init_steps` (default: from `config.strength`)."""
    batch = prompt_ids.shape[0]
    if negative_ids.shape != prompt_ids.shape:
        raise JaxdiffError(f"negative prompt ids {negative_ids.shape} and prompt ids "
                           f"{prompt_ids.shape} must have the same shape")
    shape = config.latent_shape(pipe, batch)
    img2img = init_image is not None or init_latents is not None
    if img2img != (config.strength is not None):
        raise JaxdiffError("img2img needs both an init image (or init latents) and "
                           "GenerateConfig(strength=...); text-to-image needs neither")
    k_noise, k_encode, k_sample = jax.random.split(key, 3)

    ids = jnp.concatenate([prompt_ids, negative_ids], axis=0)
    context = encode_prompt(pipe, params, ids, config.clip_skip)
    cond, uncond = context[:batch], context[batch:]

    if latents is None:
        noise = jax.random.normal(k_noise, shape, jnp.float32)
    else:
        if tuple(latents.shape) != shape:
            raise JaxdiffError(f"latents of shape {tuple(latents.shape)} do not fit this generation: "
                               f"expected NHWC {shape}")
        noise = jnp.asarray(latents, jnp.float32)

    denoise = as_denoiser(pipe.unet, params["unet"])
    rescale = guidance_rescale if config.use_guidance_rescale else 0.0
    guided = cfg(denoise, jnp.asarray(guidance_scale, jnp.float32), rescale)
    sched = pipe.scheduler
    with jax.ensure_compile_time_eval():  # the schedule is host arithmetic: constants, not tracers
        state = sched.set_timesteps(sched.create_state(), config.num_inference_steps)
    if img2img:
        if init_latents is None:
            init_latents = encode_images(pipe, params, init_image, k_encode)
        if tuple(init_latents.shape) != shape:
            raise JaxdiffError(f"init latents of shape {tuple(init_latents.shape)} do not fit this "
                               f"generation: expected NHWC {shape}")
        if img2img_steps is None:
            img2img_steps = init_steps(config.num_inference_steps, config.strength)
        x_start, begin, state = strength_start(sched, state, img2img_steps, init_latents.astype(jnp.float32),
                                               noise)
        out = sample(guided, sched, state, x_start, k_sample, (cond, uncond), scale_x_T=False,
                     start_index=begin)
    else:
        out = sample(guided, sched, state, noise, k_sample, (cond, uncond))
    if config.output == "latents":
        return out
    return decode_latents(pipe, params, out)


def decode_latents(pipe: StableDiffusion, params: dict, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, h, w, C) → images (B, h·8, w·8, 3) float32 in [0, 1]."""
    z = vae_lib.unscale_latents(pipe.vae.config, latents)
    images = pipe.vae.apply({"params": params["vae"]}, z, method=pipe.vae.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def encode_images(pipe: StableDiffusion, params: dict, images: jax.Array, key: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] → diffusion latents (a posterior sample × scaling_factor)."""
    posterior = pipe.vae.apply({"params": params["vae"]}, jnp.asarray(images, jnp.float32) * 2 - 1,
                               method=pipe.vae.encode)
    return vae_lib.scale_latents(pipe.vae.config, posterior.sample(key))


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))


def generate(pipe: StableDiffusion, params: dict, prompt_ids, negative_ids, key, guidance_scale=7.5, *,
             config: GenerateConfig = GenerateConfig(), guidance_rescale=0.0, latents=None,
             init_image=None, init_latents=None, strength=None) -> jax.Array:
    """Generate images with classifier-free guidance, in one compiled program.

    prompt_ids, negative_ids: (B, 77) int32 from `tokenize_prompts`.
    key: PRNG key (initial noise, VAE posterior sample, stochastic schedulers).
    guidance_scale: w in ε = ε_u + w (ε_c − ε_u); traced. guidance_rescale: traced, applied when
        `config.use_guidance_rescale`.
    latents: optional initial noise (B, h, w, C) NHWC float32 (unit Gaussian, scaled by the
        scheduler's init_noise_sigma as diffusers does); default: drawn from `key`.
    init_image: img2img start images (B, H, W, 3) in [0, 1] (encoded with the VAE), or
        init_latents: already-encoded (scaled) latents (B, h, w, C); both need `config.strength`
        (or `strength`).
    strength: img2img's strength, traced (default `config.strength`): changing it reuses the
        program (the steps before the start are skipped under `lax.cond`).
    Returns (B, H, W, 3) float32 images in [0, 1] (or latents, see `GenerateConfig.output`).
    """
    if config.use_guidance_rescale is False and not _is_zero(guidance_rescale):
        config = dataclasses.replace(config, use_guidance_rescale=True)
    config, steps = _traced_strength(config, strength)
    return _generate_jit(pipe, config, params, jnp.asarray(prompt_ids, jnp.int32),
                         jnp.asarray(negative_ids, jnp.int32), key,
                         jnp.asarray(guidance_scale, jnp.float32),
                         jnp.asarray(guidance_rescale, jnp.float32), latents, init_image, init_latents, steps)


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def compile_generate(pipe: StableDiffusion, params: dict, batch: int, *,
                     config: GenerateConfig = GenerateConfig(), with_latents: bool = False):
    """Ahead-of-time compile `generate` for `batch` prompts (text-to-image); returns the
    compiled callable `fn(params, prompt_ids, negative_ids, key, guidance_scale,
    guidance_rescale, latents)` — used by the script and benchmarks to time compilation."""
    ids = jax.ShapeDtypeStruct((batch, pipe.max_length), jnp.int32)
    key = jax.random.key(0)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    lat = jax.ShapeDtypeStruct(config.latent_shape(pipe, batch), jnp.float32) if with_latents else None
    lowered = _generate_jit.lower(pipe, config, params, ids, ids, key, scalar, scalar, lat, None, None)
    compiled = lowered.compile()

    def run(params, prompt_ids, negative_ids, key, guidance_scale, guidance_rescale=0.0, latents=None):
        return compiled(params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(negative_ids, jnp.int32),
                        key, jnp.asarray(guidance_scale, jnp.float32),
                        jnp.asarray(guidance_rescale, jnp.float32), latents, None, None)

    return run


# --------------------------------------------------------------------------------------------
# Every local device
# --------------------------------------------------------------------------------------------

def replicate_params(params: dict) -> dict:
    """One copy of the params on each local device (a leading device axis), for
    `generate_parallel` (`jaxdiff.parallel.replicate`: each leaf copied device to device, no
    stacked host copy)."""
    return parallel.replicate(params)


def generate_sharded(pipe: StableDiffusion, params: dict, prompt_ids, negative_ids, key, guidance_scale=7.5, *,
                     mesh=None, latents=None, init_image=None, init_latents=None, **kwargs) -> jax.Array:
    """`generate` with the batch split over the devices of `mesh` (default: every device on
    `data`, `jaxdiff.parallel.mesh`): the same `jit` program as on one device, its inputs
    (prompt ids, latents, init images) sharded along the batch and the params replicated, so
    XLA runs each device's rows there. Returns the same images as `generate` with the same
    `key` (float tolerance), sharded over the devices. B must split over the mesh's devices."""
    from jax.sharding import NamedSharding

    from jaxdiff.parallel import mesh as mesh_lib

    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    ids, neg = mesh_lib.split_rows((jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(negative_ids, jnp.int32)),
                                   mesh, "prompts")
    rows = mesh_lib.split_rows({"latents": latents, "init_image": init_image, "init_latents": init_latents},
                               mesh, "images")
    params = jax.device_put(params, NamedSharding(mesh, mesh_lib.REPLICATED))
    return generate(pipe, params, ids, neg, key, guidance_scale, **rows, **kwargs)


def parallel_split(prompt_ids, keys) -> int:
    """The local device count n, after checking that the prompts split evenly over the n devices
    and that there is one key per device (every pipeline's `generate_parallel`)."""
    n = parallel.device_count()
    if np.shape(prompt_ids)[0] % n:
        raise JaxdiffError(f"{np.shape(prompt_ids)[0]} prompts do not split evenly over {n} devices; "
                           f"use a multiple of {n}")
    if len(keys) != n:
        raise JaxdiffError(f"generate_parallel needs one key per device ({n}), got {len(keys)}")
    return n


_generate_pmap = jax.pmap(_generate, axis_name="devices", static_broadcasted_argnums=(0, 1),
                          in_axes=(None, None, 0, 0, 0, 0, None, None, 0, 0, 0, None))


def generate_parallel(pipe: StableDiffusion, replicated_params: dict, prompt_ids, negative_ids,
                      keys, guidance_scale=7.5, *, config: GenerateConfig = GenerateConfig(),
                      guidance_rescale=0.0, latents=None, init_image=None,
                      init_latents=None, strength=None) -> jax.Array:
    """`generate` on all local devices at once (`jax.pmap`).

    replicated_params: from `replicate_params`. prompt_ids, negative_ids: (D·b, 77) — device d
    gets rows d·b … d·b+b−1 (as do `latents`, `init_image`, `init_latents` when given).
    keys: (D,) keys, one per device. Device d returns exactly what
    `generate(pipe, params, prompt_ids[d·b:(d+1)·b], ..., keys[d])` returns.
    Returns (D·b, H, W, 3) images (or latents), on the devices.
    """
    prompt_ids, negative_ids = np.asarray(prompt_ids, np.int32), np.asarray(negative_ids, np.int32)
    n = parallel_split(prompt_ids, keys)
    if config.use_guidance_rescale is False and not _is_zero(guidance_rescale):
        config = dataclasses.replace(config, use_guidance_rescale=True)

    def split(x):
        return None if x is None else jnp.asarray(x).reshape((n, -1) + tuple(np.shape(x)[1:]))

    config, steps = _traced_strength(config, strength)
    out = _generate_pmap(
        pipe, config, replicated_params, split(prompt_ids), split(negative_ids), keys,
        jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(guidance_rescale, jnp.float32),
        split(latents), split(init_image), split(init_latents), steps)
    return out.reshape((-1,) + out.shape[2:])


# --------------------------------------------------------------------------------------------
# What sample.stable_diffusion asks for (jaxdiff.pipelines.registry)
# --------------------------------------------------------------------------------------------

def run_request(pipe: StableDiffusion, params: dict, request: registry.Request, report: dict) -> np.ndarray:
    """The program's text-to-image / img2img run (`registry` protocol): (N, H, W, 3) in [0, 1]."""
    import time

    from jaxdiff.pipelines.inputs import load_init_image

    r = request
    if r.init_image and r.latents:
        raise JaxdiffError("--init-image and --latents exclude each other: img2img draws its own noise "
                           "from --seed")
    times = report.setdefault("times", {})
    factor = pipe.vae_scale_factor
    latents = init_image = None
    num_images = r.num_images
    if r.latents:
        latents = load_latents(r.latents)
        num_images = num_images or latents.shape[0]
        config = GenerateConfig(r.steps, r.height or latents.shape[1] * factor,
                                r.width or latents.shape[2] * factor)
        check_latents(latents, config.latent_shape(pipe, num_images), r.latents)
    elif r.init_image:
        image = load_init_image(r.init_image, r.height, r.width, factor)
        num_images = num_images or 1
        init_image = np.repeat(image, num_images, axis=0)
        config = GenerateConfig(r.steps, image.shape[1], image.shape[2], strength=r.strength)
    else:
        num_images = num_images or 1
        config = GenerateConfig(r.steps, r.height, r.width)
    config = dataclasses.replace(config, use_guidance_rescale=r.guidance_rescale > 0)
    config.size(pipe)  # validates height/width against the VAE factor

    ids, neg = tokenize_prompts(pipe, [r.prompt] * num_images, r.negative_prompt)
    n_dev = parallel.device_count()
    use_pmap = registry.use_pmap(r, num_images, n_dev)
    report["where"] = registry.describe_devices(use_pmap, n_dev)
    key = jax.random.key(r.seed)
    t0 = time.perf_counter()
    if use_pmap:
        # pmap compiles on its first call: compile and run are timed together.
        images = generate_parallel(pipe, replicate_params(params), ids, neg, jax.random.split(key, n_dev),
                                   r.guidance_scale, config=config, guidance_rescale=r.guidance_rescale,
                                   latents=latents, init_image=init_image)
        name = "compile+generate"
    elif init_image is None:
        fn = compile_generate(pipe, params, num_images, config=config, with_latents=latents is not None)
        times["compile"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = fn(params, ids, neg, key, r.guidance_scale, r.guidance_rescale, latents)
        name = "generate"
    else:
        images = generate(pipe, params, ids, neg, key, r.guidance_scale, config=config,
                          guidance_rescale=r.guidance_rescale, init_image=init_image)
        name = "compile+generate"
    images = np.asarray(images)
    times[name] = time.perf_counter() - t0
    return images


def load_latents(path: str | os.PathLike) -> np.ndarray:
    """Initial latents saved as diffusers takes them — NCHW float32 `.npy` — as NHWC."""
    p = Path(path)
    if not p.is_file():
        raise JaxdiffError(f"latents file {p} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise JaxdiffError(f"{p} is not a .npy array ({e})") from None
    if arr.ndim != 4:
        raise JaxdiffError(f"{p} holds shape {arr.shape}; latents must be NCHW (B, C, h, w)")
    return np.ascontiguousarray(arr.astype(np.float32).transpose(0, 2, 3, 1))


def check_latents(latents: np.ndarray, expected: tuple[int, ...], source: str = "latents") -> None:
    """One clear error when NHWC `latents` do not have the `expected` shape (said in NCHW, as
    the file holds them)."""
    if tuple(latents.shape) != tuple(expected):
        b, h, w, c = latents.shape
        eb, eh, ew, ec = expected
        raise JaxdiffError(f"{source} holds latents of NCHW shape ({b}, {c}, {h}, {w}); this run needs "
                           f"({eb}, {ec}, {eh}, {ew}): batch = number of images, height and width / "
                           f"the VAE factor")


__all__ = ["StableDiffusion", "GenerateConfig", "load_pipeline", "tokenize_prompts", "encode_prompt",
           "generate", "compile_generate", "generate_parallel", "replicate_params", "decode_latents",
           "encode_images", "load_latents", "check_latents", "read_model_index", "load_components",
           "run_request", "load_single_file"]
