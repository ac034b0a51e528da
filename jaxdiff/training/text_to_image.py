"""Fine-tuning a Stable Diffusion UNet on image–caption pairs: the loss, the optimizer, and the
pieces that turn a batch (pixels and token ids, or cached latents and text embeddings) into
the UNet's inputs (an adapter of the one denoising loss, `jaxdiff.training.losses`). The train
step itself is `jaxdiff.training.make_train_step`.

    loss_fn = text_to_image_loss(pipe, train_scheduler, LossConfig(cfg_dropout=0.1, snr_gamma=5.0))
    tx, lr = make_optimizer(1e-5, total_steps=10_000, warmup_steps=500)
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=0.9999))

The recipe is diffusers' `train_text_to_image.py`: latents = a sample of the VAE posterior ×
`scaling_factor`; per example a timestep t ~ U{0..T-1}, Gaussian noise (plus `noise_offset` ×
a per-channel constant), the noisy latent from the training scheduler; the target is the noise
or, for v-prediction models, v; the loss is the MSE, optionally weighted per example by
min-SNR-γ (Hang et al. 2023). With `cfg_dropout` p each caption is replaced, with probability
p, by the empty prompt, so the trained model works with classifier-free guidance.

Batches (leading axis = this device's examples):
    on the fly: {"pixels": uint8 (b, R, R, 3), "input_ids": int32 (b, L),
                 "encoders": {"vae": params, "text_encoder": params}}
    cached:     {"moments": float (b, R/8, R/8, 2·C) VAE posterior mean ‖ log-variance,
                 "context": float (b, L, D) text embeddings}
SDXL (a `jaxdiff.pipelines.sdxl.StableDiffusionXL` pipe): input_ids (b, 2, L) of both tokenizers,
context (b, L + 1, D1 + D2) = both encoders' penultimate states ‖ one row holding text_encoder_2's
pooled projection (zero-padded), the time ids (R, R, 0, 0, R, R) from the latent size.
Every random draw of an example comes from a key made of its index in the global batch, so
both kinds of batch, and any number of devices or hosts, give the same numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.images import uint8_to_model
from jaxdiff.models.autoencoder_kl import DiagonalGaussianDistribution, scale_latents
from jaxdiff.parallel.pmap import AXIS
from jaxdiff.sampling import as_apply_fn
from jaxdiff.training.losses import Noising, denoising_loss


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """cfg_dropout: probability of training on the empty prompt, in [0, 1).
    noise_offset: std of a per-example, per-channel constant added to the noise (0 = off;
        0.05–0.1 lets the model learn very dark and bright images).
    snr_gamma: min-SNR-γ loss weighting (5.0 is the paper's choice); None = plain MSE."""

    cfg_dropout: float = 0.0
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise JaxdiffError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.noise_offset < 0:
            raise JaxdiffError(f"noise_offset must be >= 0, got {self.noise_offset}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise JaxdiffError(f"snr_gamma must be > 0, got {self.snr_gamma}")


def per_example_draws(key: jax.Array, latent_shape: tuple, num_train_timesteps: int,
                      cfg_dropout: float, noise_offset: float) -> dict:
    """The random draws of one example from its own key: `latent` (unit noise for the VAE
    posterior sample), `noise`, `t`, `drop` (caption dropped?)."""
    k_latent, k_noise, k_offset, k_t, k_drop = jax.random.split(key, 5)
    noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
    if noise_offset > 0:
        noise = noise + noise_offset * jax.random.normal(k_offset, (1, 1, latent_shape[-1]), jnp.float32)
    return {"latent": jax.random.normal(k_latent, latent_shape, jnp.float32), "noise": noise,
            "t": jax.random.randint(k_t, (), 0, num_train_timesteps),
            "drop": jax.random.bernoulli(k_drop, cfg_dropout) if cfg_dropout > 0 else jnp.bool_(False)}


def encode_pixels(pipe, vae_params, pixels: jax.Array) -> jax.Array:
    """uint8 (b, R, R, 3) → the VAE posterior's moments (b, R/8, R/8, 2·C): mean ‖ log-variance
    (what the latent cache stores)."""
    posterior = pipe.vae.apply({"params": vae_params}, uint8_to_model(pixels, jnp.float32),
                               method=pipe.vae.encode)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


def encode_text(pipe, text_encoder_params, input_ids: jax.Array) -> jax.Array:
    """Token ids (b, L) → text embeddings (b, L, D) as the pipeline conditions the UNet.
    SDXL: ids (b, 2, L) of both tokenizers, params {"text_encoder", "text_encoder_2"} → both
    penultimate states concatenated (b, L, D1 + D2), with text_encoder_2's pooled projection
    (P ≤ D1 + D2) zero-padded as one more row: (b, L + 1, D1 + D2), what the cache stores."""
    if is_sdxl(pipe):
        from jaxdiff.pipelines.sdxl import encode_prompt as sdxl_encode

        context, pooled = sdxl_encode(pipe, text_encoder_params, input_ids[:, 0], input_ids[:, 1])
        width = context.shape[-1]
        if pooled.shape[-1] > width:
            raise JaxdiffError(f"text_encoder_2's projection_dim {pooled.shape[-1]} exceeds the context width "
                               f"{width}; this SDXL layout is not supported for fine-tuning")
        pooled = jnp.pad(pooled.astype(context.dtype), ((0, 0), (0, width - pooled.shape[-1])))
        return jnp.concatenate([context, pooled[:, None]], axis=1)
    from jaxdiff.pipelines.stable_diffusion import encode_prompt

    return encode_prompt(pipe, {"text_encoder": text_encoder_params}, input_ids)


# --------------------------------------------------------------------------------------------
# SDXL: both text encoders, packed so the SD batch (and the latent cache) carry them unchanged
# --------------------------------------------------------------------------------------------

def is_sdxl(pipe) -> bool:
    """Is `pipe` a loaded SDXL pipeline (`jaxdiff.pipelines.sdxl.StableDiffusionXL`)?"""
    return hasattr(pipe, "text_encoder_2")


def is_sdxl_folder(model_dir) -> bool:
    """An SDXL folder: model_index.json names an SDXL pipeline, or unet/config.json has
    `addition_embed_type="text_time"`."""
    from pathlib import Path

    from jaxdiff.pipelines.registry import pipeline_class
    from jaxdiff.weights import read_json

    root = Path(model_dir).expanduser()
    if str(pipeline_class(root) or "").startswith("StableDiffusionXL"):
        return True
    unet_config = root / "unet" / "config.json"
    return unet_config.is_file() and read_json(unet_config).get("addition_embed_type") == "text_time"


def load_training_pipeline(model_dir, *, dtype, param_dtype, scheduler=None):
    """(pipe, params) of an SD 1.x/2.x or SDXL base folder for fine-tuning. For SDXL the text
    params are nested, `params["text_encoder"] = {"text_encoder": ..., "text_encoder_2": ...}`,
    so the frozen-encoder plumbing (batches, cache, evaluator) is the SD one. An SDXL refiner
    (aesthetic-score time ids, no first text encoder) is refused."""
    from pathlib import Path

    if not is_sdxl_folder(model_dir):
        from jaxdiff.pipelines.stable_diffusion import load_pipeline

        return load_pipeline(model_dir, dtype=dtype, param_dtype=param_dtype, scheduler=scheduler)
    from jaxdiff.pipelines import sdxl

    index = sdxl.read_sdxl_index(Path(model_dir).expanduser())
    if index.get("requires_aesthetics_score") or not sdxl._listed(index, "text_encoder"):
        raise JaxdiffError(f"{model_dir} is an SDXL refiner (aesthetic-score time ids, no text_encoder/): "
                           "train.text_to_image fine-tunes SD 1.x/2.x and SDXL base UNets; pass the base folder")
    pipe, params = sdxl.load_sdxl_pipeline(model_dir, dtype=dtype, param_dtype=param_dtype, scheduler=scheduler)
    params["text_encoder"] = {"text_encoder": params.pop("text_encoder"),
                              "text_encoder_2": params.pop("text_encoder_2")}
    return pipe, params


def caption_tokenizer(pipe) -> Callable:
    """`tok(strings) -> int ids`: (b, L) for SD; (b, 2, L) for SDXL (tokenizer, tokenizer_2)."""
    from jaxdiff.tokenizer import tokenize

    if not is_sdxl(pipe):
        return lambda strings: tokenize(pipe.tokenizer, list(strings), pipe.max_length)
    return lambda strings: np.stack([tokenize(pipe.tokenizer, list(strings), pipe.max_length),
                                     tokenize(pipe.tokenizer_2, list(strings), pipe.max_length)], axis=1)


def sdxl_time_ids(resolution: int) -> np.ndarray:
    """SDXL's training time ids (6,): original_size = target_size = (R, R), crop top-left (0, 0)
    (images are centre-cropped to R; the crop offset is not tracked)."""
    return np.asarray([resolution, resolution, 0, 0, resolution, resolution], np.float32)


def _sdxl_cond(pipe, packed: jax.Array) -> dict:
    """The packed text embedding (b, L + 1, D) of `encode_text` → context (b, L, D) and
    text_embeds (b, P) of the SDXL UNet's cond dict (the loss adds the time ids)."""
    p = pipe.text_encoder_2.config.projection_dim
    return {"context": packed[:, :-1], "text_embeds": packed[:, -1, :p]}


def sd_encoders(pipe) -> dict:
    """The pipeline's frozen encoders as the latent cache takes them:
    `encode_images(vae_params, pixels)` and `encode_text(text_encoder_params, ids)`."""
    return {"encode_images": lambda p, pixels: encode_pixels(pipe, p, pixels),
            "encode_text": lambda p, ids: encode_text(pipe, p, ids)}


def text_to_image_loss(pipe, scheduler, config: LossConfig = LossConfig(), *,
                       null_ids: Optional[np.ndarray] = None, null_context: Optional[np.ndarray] = None,
                       axis_name: Optional[str] = AXIS) -> Callable:
    """`loss_fn(unet_params, batch, key) -> (loss, metrics)` for `make_train_step` (see the
    module docstring for the batch). `pipe`: a loaded `StableDiffusion` (its UNet module sets
    the compute dtype, its VAE and text encoder encode on-the-fly batches). `scheduler`: the
    training scheduler (DDPM on the model's beta schedule and prediction type). Caption
    dropout needs `null_ids` (L,) (on the fly) or `null_context` (L, D) (cached): the empty
    prompt. `axis_name`: the pmap axis (None under plain jit). The loss itself is
    `jaxdiff.training.losses.denoising_loss`; this adapter makes latents and text context."""
    state = scheduler.create_state()
    num_train_timesteps = int(state.alphas_cumprod.shape[0])
    vae_config = pipe.vae.config
    sdxl = is_sdxl(pipe)

    def prepare(batch: Mapping, keys: jax.Array) -> Noising:
        if "pixels" in batch:
            encoders = batch["encoders"]
            moments = jax.lax.stop_gradient(encode_pixels(pipe, encoders["vae"], batch["pixels"]))
        else:
            moments = batch["moments"]
        posterior = DiagonalGaussianDistribution.from_moments(moments)
        latent_shape = posterior.mean.shape[1:]
        draws = jax.vmap(lambda k: per_example_draws(k, latent_shape, num_train_timesteps,
                                                     config.cfg_dropout, config.noise_offset))(keys)
        if "pixels" in batch:
            ids = batch["input_ids"]
            if config.cfg_dropout > 0:
                if null_ids is None:
                    raise JaxdiffError("caption dropout needs null_ids (the empty prompt's token ids)")
                drop = draws["drop"].reshape((-1,) + (1,) * (ids.ndim - 1))
                ids = jnp.where(drop, jnp.asarray(null_ids, ids.dtype)[None], ids)
            context = jax.lax.stop_gradient(encode_text(pipe, encoders["text_encoder"], ids))
        else:
            context = batch["context"].astype(jnp.float32)
            if config.cfg_dropout > 0:
                if null_context is None:
                    raise JaxdiffError("caption dropout needs null_context (the empty prompt's embedding)")
                context = jnp.where(draws["drop"][:, None, None],
                                    jnp.asarray(null_context, jnp.float32)[None], context)
        latents = scale_latents(vae_config, posterior.mean + posterior.std * draws["latent"])
        if sdxl:
            cond = _sdxl_cond(pipe, context)
            time_ids = sdxl_time_ids(latent_shape[0] * pipe.vae_scale_factor)
            context = {**cond, "time_ids": jnp.broadcast_to(jnp.asarray(time_ids), (latents.shape[0], 6))}
        return Noising(latents, draws["noise"], draws["t"], context)

    def batch_size(batch: Mapping) -> int:
        return (batch["pixels"] if "pixels" in batch else batch["moments"]).shape[0]

    if sdxl:
        from jaxdiff.pipelines.sdxl import unet_apply_fn

        apply_fn = unet_apply_fn(pipe.unet)
    else:
        apply_fn = as_apply_fn(pipe.unet)
    return denoising_loss(apply_fn, scheduler, state,
                          prepare, batch_size, snr_gamma=config.snr_gamma, axis_name=axis_name)


# --------------------------------------------------------------------------------------------
# The training set-up of a Stable Diffusion folder
# --------------------------------------------------------------------------------------------

def training_scheduler(model_dir, prediction_type: Optional[str] = None):
    """DDPM on the model's own beta schedule (and prediction type unless overridden), as
    diffusers' training scripts build `DDPMScheduler.from_pretrained(model, "scheduler")`."""
    from pathlib import Path

    from jaxdiff.schedulers import create_scheduler

    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return create_scheduler(Path(model_dir) / "scheduler", name="ddpm", **overrides)


def training_resolution(pipe, resolution: Optional[int] = None) -> int:
    """`resolution` (None: the model's default size), checked against the VAE's downscale factor."""
    resolution = resolution or pipe.default_size
    f = pipe.vae_scale_factor
    if resolution % f:
        raise JaxdiffError(f"--resolution {resolution} must be a multiple of {f} (the VAE's downscale factor)")
    return int(resolution)


def train_step_for(config, loss_fn: Callable, total_steps: int, *, grad_accum: int = 1,
                   axis_name: Optional[str] = AXIS):
    """(train_step, optimizer, learning-rate schedule) of a fine-tuning config (the fields of
    `jaxdiff.training.configs.TextToImageConfig`): AdamW with warm-up and clipping, optional EMA;
    `grad_accum` micro-batches per update; `axis_name` None under `jit` over a mesh."""
    from jaxdiff.training.optim import make_optimizer
    from jaxdiff.training.state import EMA, make_train_step

    tx, lr_schedule = make_optimizer(
        config.lr, total_steps=total_steps, warmup_steps=config.warmup_steps, schedule=config.lr_schedule,
        weight_decay=config.weight_decay, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm or None)
    ema = EMA(decay=config.ema_decay, update_after_step=config.ema_update_after_step, use_warmup=config.ema_warmup,
              inv_gamma=config.ema_inv_gamma, power=config.ema_power) if config.ema_decay > 0 else None
    return make_train_step(loss_fn, tx, ema=ema, grad_accum=grad_accum, axis_name=axis_name), tx, lr_schedule


# --------------------------------------------------------------------------------------------
# Evaluation and export (train.text_to_image)
# --------------------------------------------------------------------------------------------

COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler",
                     "feature_extractor")


class Evaluator:
    """A fixed-noise loss on a fixed batch (the checkpoints' "best" metric) and sample grids of
    validation prompts; with EMA, both use the EMA weights (what is exported). `fetch(ids,
    caption_ids)`: the training batches' fetcher; `batch_size`: the global batch; `seed`: the run's."""

    def __init__(self, pipe, params, data, fetch, loss_fn, *, batch_size: int, resolution: int, seed: int,
                 cached: bool, prompts, samples_per_prompt: int, sample_steps: int, guidance_scale: float,
                 samples: bool, main_process: bool, engine=None, unet_of=None):
        from jaxdiff.parallel import distributed
        from jaxdiff.parallel.engine import PmapEngine
        from jaxdiff.training.program import sampling_params

        self.pipe, self.main, self.samples, self.unet_of = pipe, main_process, samples, unet_of
        self.engine = engine = engine or PmapEngine()  # the training run's (`loss_fn` built for its axis)
        self.frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
        ids = np.arange(batch_size, dtype=np.int64)[distributed.host_slice(batch_size)]
        caps = np.array([data.caption_ids[i][0] for i in ids], np.int64)
        self.batch = engine.place_batch({k: v for k, v in fetch(ids, caps).items() if k != "index"},
                                        shared=None if cached else {"encoders": self.frozen})
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)

        def eval_loss(state, batch):
            loss, _ = loss_fn(sampling_params(state), batch, self.key)
            return loss if engine.axis_name is None else jax.lax.pmean(loss, engine.axis_name)

        if engine.axis_name is None:
            self._eval = jax.jit(lambda state, batch: eval_loss(state, batch)[None])
        else:
            self._eval = jax.pmap(eval_loss, axis_name=engine.axis_name)
        prompts = list(prompts or []) or [c for c in data.caption_strings if c][:4] or ["a photo"]
        self.prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        self.samples_per_prompt, self.sample_steps = samples_per_prompt, sample_steps
        self.guidance_scale, self.resolution = guidance_scale, resolution

    def eval_loss(self, p_state) -> dict:
        return {"eval_loss": float(self._eval(p_state, self.batch)[0])}

    def log_eval(self, log, p_state, step: int, with_loss: bool = True):
        """Log the eval loss and a sample grid (rows = prompts); returns the grid's path."""
        if with_loss:
            values = self.eval_loss(p_state)
            log.scalars(step, values)
            log.write(f"step {step}: eval loss {values['eval_loss']:.5f}")
        collective = self.engine.copy_is_collective(p_state)  # then every process takes part
        host = self.engine.host_copy(p_state) if self.samples and collective else None
        if not self.samples or not self.main:
            return None
        from jaxdiff.images import make_grid, unit_to_uint8
        from jaxdiff.pipelines.stable_diffusion import GenerateConfig, generate, tokenize_prompts
        from jaxdiff.training.program import sampling_params

        unet = sampling_params(host if host is not None else self.engine.host_copy(p_state))
        unet = self.unet_of(unet) if self.unet_of is not None else unet  # LoRA runs: base + adapters
        if is_sdxl(self.pipe):
            from jaxdiff.pipelines import sdxl

            r = self.resolution
            images = sdxl.generate(
                self.pipe, {"unet": unet, "vae": self.frozen["vae"], **self.frozen["text_encoder"]},
                sdxl.tokenize_prompts(self.pipe, self.prompts), sdxl.micro_conditioning(self.pipe, r, r),
                jax.random.PRNGKey(0), self.guidance_scale,
                config=sdxl.XLGenerateConfig(num_inference_steps=self.sample_steps, height=r, width=r))
            return log.image(step, "samples", make_grid(unit_to_uint8(images), nrow=self.samples_per_prompt))
        ids, neg = tokenize_prompts(self.pipe, self.prompts)
        config = GenerateConfig(num_inference_steps=self.sample_steps, height=self.resolution, width=self.resolution)
        images = generate(self.pipe, {"unet": unet, **self.frozen}, ids, neg, jax.random.PRNGKey(0),
                          self.guidance_scale, config=config)
        return log.image(step, "samples", make_grid(unit_to_uint8(images), nrow=self.samples_per_prompt))


def export(out, pipe, unet_params, *, with_pipeline: bool = True):
    """RUN/unet as a diffusers folder; with `with_pipeline`, the model's other components and
    a model_index.json beside it, so RUN is a pipeline folder. Returns RUN/unet."""
    import shutil
    from pathlib import Path

    from jaxdiff.models.unet_2d_condition import save_unet_2d_condition
    from jaxdiff.weights import read_json, save_json

    out = Path(out)
    save_unet_2d_condition(out / "unet", pipe.unet, unet_params)
    src = Path(pipe.folder) if pipe.folder is not None else None
    if with_pipeline and src is not None and src.resolve() != out.resolve():
        for component in COPIED_COMPONENTS:
            if (src / component).is_dir():
                shutil.copytree(src / component, out / component, dirs_exist_ok=True)
        index_path = src / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {"_class_name": "StableDiffusionPipeline"}
        flax = str(index.get("_class_name", "")).startswith("Flax")
        index["unet"] = ["diffusers", "FlaxUNet2DConditionModel" if flax else "UNet2DConditionModel"]
        for component, value in list(index.items()):
            if isinstance(value, list) and len(value) == 2 and value[1] and component != "unet" \
                    and not (out / component).is_dir():
                index[component] = [None, None]  # e.g. a safety checker that was not copied
        save_json(index, out / "model_index.json")
    return out / "unet"
