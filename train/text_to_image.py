"""Fine-tune a Stable Diffusion 1.x/2.x or SDXL (base) UNet on image–caption pairs, data-parallel
over every device of every host.

    python -m train.text_to_image --model-dir sd-v1-5 --train-data my_images/ --out runs/sd \\
        --resolution 512 --batch-size 32 --steps 10000 --lr 1e-5 --cfg-dropout 0.1 --cache-latents
    python -m train.text_to_image --out runs/sd --resume            # continue (settings from RUN/jaxdiff_run.json)

--train-data is an image folder with a metadata.jsonl or metadata.csv (Hugging Face's
imagefolder convention: a file_name column and a caption column, "text" by default) or a
Hugging Face datasets name (user/name; needs the network or the local cache). Images are resized
(shorter side) and centre-cropped to --resolution.

Each step is one `pmap`ped train step (gradients averaged with `lax.pmean` over every device of
every host): a VAE posterior sample and the text embedding (computed on the fly, or read from the
cache --cache-latents builds once), a random timestep and noise, the UNet in bf16 with float32
master weights, the noise (or v) target, AdamW with gradient clipping and a warm-up. With
--cfg-dropout p a caption is replaced by the empty prompt with probability p, so the model works
with classifier-free guidance. --noise-offset and --snr-gamma (min-SNR weighting) as in
diffusers' train_text_to_image.py; v-prediction models (SD 2.x-v) train on the v target.
SDXL folders (model_index.json's StableDiffusionXLPipeline, or a text_time UNet) train with both
text encoders (penultimate states concatenated + text_encoder_2's pooled projection; cached too)
and the time ids original_size = target_size = (R, R), crop (0, 0) (centre crops; the crop
offset is not tracked). SDXL refiners are refused.

The run folder RUN holds jaxdiff_run.json (the run's settings, length and data), checkpoints/ (orbax: params,
optimizer, EMA, PRNG key and data position; written asynchronously every --checkpoint-every
steps, the last --keep-checkpoints kept plus the best by --best-metric), logs/ (TensorBoard
events, or metrics.jsonl, and sample grids), cache/ (the latent cache), and at the end unet/: the
trained UNet (EMA weights when --ema-decay > 0) as a diffusers folder, beside the model's other
components, so RUN loads as a pipeline in diffusers (PyTorch) and in jaxdiff. SIGTERM or Ctrl-C
saves a checkpoint and stops; --resume continues exactly. One JSON line on stdout sums the run up.

Multi-host: start one process per host with the same flags plus --coordinator-address
HOST:PORT --num-processes N --process-id I (or --distributed auto on a TPU pod / SLURM); each
reads its own rows of every batch; process 0 writes logs, checkpoints and the export.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaxdiff.cli import (add_compile_cache_flags, at_least, finite_float, in_range, positive, program_main,
                         program_parser)
from jaxdiff.data.captions import MAX_IMAGE_PIXELS, ON_BAD_IMAGE, ON_BAD_IMAGE_CHOICES
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import distributed
from jaxdiff.training.configs import TEXT_TO_IMAGE_DEFAULT_STEPS, TextToImageConfig, TextToImageSettings
from jaxdiff.training.program import add_loop_flags, check_loop_flags, start_run

PROGRAM = "train.text_to_image"


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m train.text_to_image", __doc__)
    num = finite_float
    g = p.add_argument_group("model and data")
    g.add_argument("--model-dir", default=None, help="diffusers Stable Diffusion (1.x/2.x/XL base) folder to fine-tune")
    g.add_argument("--train-data", default=None, help="image folder with metadata.jsonl/csv, or a HF datasets name")
    g.add_argument("--split", default=None, help="HF datasets split (default train)")
    g.add_argument("--caption-column", default=None, help="caption column (default: text, caption or prompt)")
    g.add_argument("--image-column", default=None, help="HF datasets image column (default image)")
    g.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's, 512 for SD1.5)")
    g.add_argument("--out", default="runs/text_to_image", help="run folder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="global batch over all devices and hosts (default 16)")
    g.add_argument("--lr", type=num, default=None, help="peak learning rate (default 1e-5)")
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=None,
                   help="after the warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--weight-decay", type=num, default=None, help="AdamW weight decay (default 1e-2)")
    g.add_argument("--max-grad-norm", type=num, default=None, help="clip the global gradient norm (default 1; 0 = off)")
    g.add_argument("--adam-beta1", type=num, default=None)
    g.add_argument("--adam-beta2", type=num, default=None)
    g.add_argument("--adam-epsilon", type=num, default=None)
    g.add_argument("--seed", type=int, default=None, help="data order, noise and dropout (default 0)")
    g.add_argument("--cfg-dropout", type=num, default=None, help="probability of training on the empty prompt (default 0.1)")
    g.add_argument("--noise-offset", type=num, default=None, help="offset-noise std (default 0)")
    g.add_argument("--snr-gamma", type=num, default=None, help="min-SNR-γ loss weighting (e.g. 5; default off)")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the scheduler's prediction type (default: the model's)")
    g.add_argument("--mixed-precision", choices=("bf16", "no"), default=None,
                   help="UNet compute dtype; master weights stay float32 (default bf16)")
    g = p.add_argument_group("EMA (diffusers' EMAModel)")
    g.add_argument("--ema-decay", type=num, default=None, help="maximum EMA decay, e.g. 0.9999 (default 0 = off)")
    g.add_argument("--ema-update-after-step", type=int, default=None)
    g.add_argument("--ema-warmup", action="store_true", default=None,
                   help="decay 1 - (1 + step/inv_gamma)^-power instead of (1 + step)/(10 + step)")
    g.add_argument("--ema-inv-gamma", type=num, default=None)
    g.add_argument("--ema-power", type=num, default=None)
    g = p.add_argument_group("cache")
    g.add_argument("--cache-latents", action="store_true", default=None,
                   help="encode every image and caption once; train the UNet only")
    g.add_argument("--cache-dir", default=None, help="where the cache lives (default RUN/cache)")
    g.add_argument("--cache-dtype", choices=("float16", "float32"), default=None, help="default float16")
    g = p.add_argument_group("evaluation and export")
    g.add_argument("--best-metric", choices=("eval_loss", "train_loss", "none"), default="eval_loss",
                   help="also keep the checkpoint best by this (lower is better)")
    g.add_argument("--validation-prompt", action="append", default=None,
                   help="prompt for the sample grids (repeatable; default: the first captions)")
    g.add_argument("--samples-per-prompt", type=int, default=2)
    g.add_argument("--sample-steps", type=int, default=25)
    g.add_argument("--sample-scheduler", default=None, help="sampler for the grids (default: the model's)")
    g.add_argument("--guidance-scale", type=num, default=7.5)
    g.add_argument("--no-samples", dest="samples", action="store_false", help="no sample grids")
    g.add_argument("--workers", type=int, default=4, help="image-loading threads")
    g.add_argument("--on-bad-image", choices=ON_BAD_IMAGE_CHOICES, default=ON_BAD_IMAGE,
                   help="an unreadable or too large image: skip it (counted, with a warning; its batch "
                        f"slot goes to another example) or stop with an error (default {ON_BAD_IMAGE})")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"larger images count as bad (default {MAX_IMAGE_PIXELS:,}, PIL's own limit)")
    g.add_argument("--allow-outside-paths", action="store_true",
                   help="let the data's file_name entries point outside its folder (../, absolute, symlinks)")
    g.add_argument("--no-export-pipeline", dest="export_pipeline", action="store_false",
                   help="export RUN/unet only, without copying the model's other components into RUN")
    from jaxdiff.adapters.training import add_lora_flags

    add_lora_flags(p)
    add_loop_flags(p, TEXT_TO_IMAGE_DEFAULT_STEPS, eval_help="every N steps: a fixed-noise eval loss and a "
                   "grid of samples (0 = only at the end)")
    add_compile_cache_flags(p)
    distributed.add_arguments(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    check_loop_flags(args)
    at_least(args, 1, "batch_size", "resolution", "samples_per_prompt", "sample_steps", "workers",
             "max_image_pixels", "lora_rank")
    positive(args, "lora_alpha")
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets or args.lora_kohya):
        raise JaxdiffError("--lora-alpha, --lora-targets and --lora-kohya go with --lora-rank R")
    if args.lora_targets:
        args.lora_targets = tuple(args.lora_targets)
    at_least(args, 0, "warmup_steps", "ema_update_after_step", "weight_decay", "noise_offset", "max_grad_norm")
    positive(args, "lr", "snr_gamma", "ema_inv_gamma", "ema_power", "adam_epsilon")
    in_range(args, 0.0, 1.0, "cfg_dropout", "ema_decay", "adam_beta1", "adam_beta2")


def new_config(config: TextToImageConfig) -> TextToImageConfig:
    """A new run's config with its model and data folders made absolute."""
    if config.model_dir is None:
        raise JaxdiffError("--model-dir is required: a diffusers Stable Diffusion folder to fine-tune")
    if config.train_data is None:
        raise JaxdiffError("--train-data is required: an image folder with metadata.jsonl/csv, or a "
                           "Hugging Face dataset name")

    def absolute(path):
        folder = Path(path).expanduser()
        return str(folder.absolute()) if folder.exists() else path

    return dataclasses.replace(config, model_dir=absolute(config.model_dir), train_data=absolute(config.train_data))


def batches_and_loss(run, settings, config, data, pipe, params, resolution):
    """(fetch(ids, caption_ids) -> host batch, the loss): from the latent cache or on the fly."""
    from jaxdiff.data.captions import pixel_fetcher
    from jaxdiff.data.latent_cache import LatentCache
    from jaxdiff.training.text_to_image import (LossConfig, caption_tokenizer, sd_encoders, text_to_image_loss,
                                                training_scheduler)

    tok = caption_tokenizer(pipe)  # SDXL: both tokenizers' ids, (b, 2, L)

    null_context = None
    if config.cache_latents:
        cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else run.run_dir / "cache"
        cache = LatentCache.build_or_open(
            cache_dir, data, pipe, params, resolution=resolution, tokenize=tok, dtype=config.cache_dtype,
            batch_size=max(1, config.batch_size // max(1, distributed.process_count())), workers=settings.workers,
            verbose=run.main, **sd_encoders(pipe))
        fetch, null_context = cache.fetch, cache.null_context
    else:
        fetch = pixel_fetcher(data, resolution, tok, workers=settings.workers, on_bad_image=settings.on_bad_image)
    loss_cfg = LossConfig(cfg_dropout=config.cfg_dropout, noise_offset=config.noise_offset, snr_gamma=config.snr_gamma)
    return fetch, text_to_image_loss(pipe, training_scheduler(config.model_dir, config.prediction_type), loss_cfg, null_ids=tok([""])[0],
                                     null_context=null_context, axis_name=run.engine.axis_name)


def train_and_evaluate(run, settings: TextToImageSettings) -> dict:
    """Train (or continue) the run as configured; returns the summary."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.data.captions import CaptionBatches, load_captions
    from jaxdiff.models.remat import checkpointed
    from jaxdiff.training import create_train_state
    from jaxdiff.training.program import sampling_params
    from jaxdiff.training.run_folder import RunRecord
    from jaxdiff.training.text_to_image import (Evaluator, export, load_training_pipeline, train_step_for,
                                                training_resolution)

    config = run.config
    data = load_captions(config.train_data, split=config.split, caption_column=config.caption_column,
                         image_column=config.image_column, verbose=run.main,
                         allow_outside_paths=settings.allow_outside_paths, max_image_pixels=settings.max_image_pixels)
    run.check_same_data(data.fingerprint, len(data))
    dtype = jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32
    pipe, params = load_training_pipeline(config.model_dir, dtype=dtype, param_dtype=jnp.float32,
                                          scheduler=settings.sample_scheduler)
    resolution = training_resolution(pipe, config.resolution)
    distributed.check_batch_size(config.batch_size)
    if config.batch_size > len(data):
        raise JaxdiffError(f"--batch-size {config.batch_size} is larger than the data set ({len(data)} images)")
    total_steps = run.plan_steps(len(data), config.batch_size, TEXT_TO_IMAGE_DEFAULT_STEPS, fixed_length=None
                                 if config.lr_schedule == "constant" else f"{config.lr_schedule} learning-rate schedule")
    fetch, loss_fn = batches_and_loss(run, settings, config, data, pipe, params, resolution)
    lora_base = unet_of = None
    if config.lora_rank:  # LoRA: the trainable tree is the adapters; the base UNet is a frozen batch entry
        from jaxdiff.adapters import training as lora_training

        lora_base, scale = params["unet"], lora_training.lora_scale(config.lora_rank, config.lora_alpha)
        unet_loss, loss_fn = loss_fn, lora_training.lora_loss(loss_fn, scale)
        params["unet"] = lora_training.init_lora(lora_base, config.lora_rank, config.lora_targets,
                                                 jax.random.fold_in(jax.random.PRNGKey(config.seed), 3))

        def unet_of(lora):
            return lora_training.apply_lora(lora_base, lora, scale)

        def eval_loss_fn(lora, batch, key):  # the evaluator's batches carry no base: closed over
            return unet_loss(unet_of(lora), batch, key)
    engine = run.engine
    train_step, tx, lr_schedule = train_step_for(config, checkpointed(loss_fn, settings.gradient_checkpointing),
                                                 total_steps, grad_accum=settings.grad_accum,
                                                 axis_name=engine.axis_name)
    record = RunRecord(PROGRAM, dataclasses.asdict(config),
                       data={"fingerprint": data.fingerprint, "images": len(data), "source": data.source})
    state = run.start(create_train_state(params.pop("unet"), tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                                         ema=config.ema_decay > 0), record, batch_size=config.batch_size,
                      best_metric=None if settings.best_metric == "none" else settings.best_metric)
    batches = CaptionBatches(data, config.batch_size, fetch, seed=config.seed, position=run.position,
                             process_index=distributed.process_index(), process_count=distributed.process_count(),
                             workers=settings.workers)
    shared = None if config.cache_latents else {"encoders": {"vae": params["vae"], "text_encoder": params["text_encoder"]}}
    if lora_base is not None:
        shared = {"encoders": {**(shared or {}).get("encoders", {}), "unet": lora_base}}

    def next_batch():
        return engine.place_batch({k: v for k, v in next(batches).items() if k != "index"}, shared=shared)

    evaluator = Evaluator(pipe, params, data, fetch, loss_fn if lora_base is None else eval_loss_fn, batch_size=config.batch_size, resolution=resolution,
                          seed=config.seed, cached=config.cache_latents, prompts=settings.validation_prompt,
                          samples_per_prompt=settings.samples_per_prompt, sample_steps=settings.sample_steps,
                          guidance_scale=settings.guidance_scale, samples=settings.samples, main_process=run.main,
                          engine=engine, unet_of=unet_of)
    last_eval: dict = {}

    def checkpoint_metrics(p_state, window):
        metrics = {"train_loss": float(np.mean(window)) if window else float("nan")}
        if settings.best_metric == "eval_loss" or settings.eval_every:
            metrics.update(evaluator.eval_loss(p_state))
        last_eval.update(metrics)
        return metrics

    def scalars(step, m):
        return {"loss": float(m["loss"][0]), "mse": float(m["mse"][0]), "grad_norm": float(m["grad_norm"][0]),
                "lr": float(lr_schedule(step - 1))}

    trained = run.train(engine.compile(train_step), engine.place_state(state), next_batch, lambda: batches.position,
                        scalars=scalars, checkpoint_metrics=checkpoint_metrics, close_data=batches.close,
                        evaluate=lambda p_state, step: evaluator.log_eval(run.log, p_state, step))
    summary = {**run.summary(trained, config.batch_size), "first_step_seconds": round(trained.compile_seconds, 2),
               "ema": config.ema_decay > 0}
    if "eval_loss" in last_eval:
        summary["eval_loss"] = round(last_eval["eval_loss"], 5)
    summary["skipped_images"] = batches.skipped_images  # this process's share

    final = engine.host_copy(trained.state) if engine.copy_is_collective(trained.state) else None

    def samples_and_export():
        host_state = final if final is not None else engine.host_copy(trained.state)
        if settings.samples:
            summary["samples"] = str(evaluator.log_eval(run.log, host_state, trained.step, with_loss=False))
        unet_params = sampling_params(host_state)
        if lora_base is not None:
            from jaxdiff.adapters.training import export_lora

            summary["lora"] = export_lora(run.run_dir, unet_params, lora_base, rank=config.lora_rank,
                                          alpha=config.lora_alpha, targets=config.lora_targets,
                                          kohya=config.lora_kohya)
            return
        summary["unet"] = str(export(run.run_dir, pipe, unet_params, with_pipeline=settings.export_pipeline))

    distributed.on_main_process(samples_and_export, "writing the samples and the exported UNet")
    run.close()
    return summary


def train(args: argparse.Namespace) -> dict:
    """Flags → the run's config and this invocation's settings → `train_and_evaluate`."""
    with start_run(PROGRAM, TextToImageConfig, TextToImageSettings, args, check=check_args,
                   validation_prompt=tuple(args.validation_prompt or ()) or None) as run:
        if not run.resuming:
            run.config = new_config(run.config)
        return train_and_evaluate(run, run.settings)


main = program_main(parse_args, train)


if __name__ == "__main__":
    main()
