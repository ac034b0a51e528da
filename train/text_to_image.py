"""Fine-tune a Stable Diffusion 1.x/2.x UNet on image–caption pairs, data-parallel over every
device of every host.

    python -m train.text_to_image --model-dir sd-v1-5 --train-data my_images/ --out runs/sd \\
        --resolution 512 --batch-size 32 --steps 10000 --lr 1e-5 --cfg-dropout 0.1 --cache-latents
    python -m train.text_to_image --out runs/sd --resume            # continue (flags from RUN/train_config.json)

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

The run folder RUN holds train_config.json (the run's settings), checkpoints/ (orbax: params,
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
import json
import math
import shutil
from pathlib import Path

from jaxdiff.parallel import distributed
from jaxdiff.errors import JaxdiffError, cli_main

RUN_CONFIG = "train_config.json"  # not config.json: RUN is also a pipeline folder
CHECKPOINTS = "checkpoints"
# Settings fixed by the run: --resume reads them from RUN/train_config.json; a different value is an error.
RUN_OPTIONS = ("model_dir", "train_data", "split", "caption_column", "image_column", "resolution",
               "batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
               "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "cfg_dropout", "noise_offset",
               "snr_gamma", "prediction_type", "mixed_precision", "ema_decay", "ema_update_after_step",
               "ema_warmup", "ema_inv_gamma", "ema_power", "cache_latents", "cache_dtype")
DEFAULTS = dict(model_dir=None, train_data=None, split="train", caption_column=None, image_column=None,
                resolution=None, batch_size=16, lr=1e-5, lr_schedule="constant", warmup_steps=0,
                weight_decay=1e-2, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8, seed=0, cfg_dropout=0.1, noise_offset=0.0, snr_gamma=None,
                prediction_type=None, mixed_precision="bf16", ema_decay=0.0, ema_update_after_step=0,
                ema_warmup=False, ema_inv_gamma=1.0, ema_power=2 / 3, cache_latents=False,
                cache_dtype="float16")
DEFAULT_STEPS = 1000
FINAL_LOSS_WINDOW = 50
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.text_to_image", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model-dir", default=None, help="diffusers Stable Diffusion folder to fine-tune")
    g.add_argument("--train-data", default=None, help="image folder with metadata.jsonl/csv, or a HF datasets name")
    g.add_argument("--split", default=None, help="HF datasets split (default train)")
    g.add_argument("--caption-column", default=None, help="caption column (default: text, caption or prompt)")
    g.add_argument("--image-column", default=None, help="HF datasets image column (default image)")
    g.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's, 512 for SD1.5)")
    g.add_argument("--out", default="runs/text_to_image", help="run folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest good checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"train until this step (default {DEFAULT_STEPS})")
    g.add_argument("--epochs", type=float, default=None, help="train for this many passes over the data instead")
    g.add_argument("--batch-size", type=int, default=None, help="global batch over all devices and hosts (default 16)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5)")
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=None,
                   help="after the warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-2)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the global gradient norm (default 1; 0 = off)")
    g.add_argument("--adam-beta1", type=float, default=None)
    g.add_argument("--adam-beta2", type=float, default=None)
    g.add_argument("--adam-epsilon", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="data order, noise and dropout (default 0)")
    g.add_argument("--cfg-dropout", type=float, default=None,
                   help="probability of training on the empty prompt (default 0.1)")
    g.add_argument("--noise-offset", type=float, default=None, help="offset-noise std (default 0)")
    g.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting (e.g. 5; default off)")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the scheduler's prediction type (default: the model's)")
    g.add_argument("--mixed-precision", choices=("bf16", "no"), default=None,
                   help="UNet compute dtype; master weights stay float32 (default bf16)")
    g = p.add_argument_group("EMA (diffusers' EMAModel)")
    g.add_argument("--ema-decay", type=float, default=None, help="maximum EMA decay, e.g. 0.9999 (default 0 = off)")
    g.add_argument("--ema-update-after-step", type=int, default=None)
    g.add_argument("--ema-warmup", action="store_true", default=None,
                   help="decay 1 - (1 + step/inv_gamma)^-power instead of (1 + step)/(10 + step)")
    g.add_argument("--ema-inv-gamma", type=float, default=None)
    g.add_argument("--ema-power", type=float, default=None)
    g = p.add_argument_group("cache")
    g.add_argument("--cache-latents", action="store_true", default=None,
                   help="encode every image and caption once; train the UNet only")
    g.add_argument("--cache-dir", default=None, help="where the cache lives (default RUN/cache)")
    g.add_argument("--cache-dtype", choices=("float16", "float32"), default=None, help="default float16")
    g = p.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument("--keep-checkpoints", type=int, default=3, help="recent checkpoints kept")
    g.add_argument("--best-metric", choices=("eval_loss", "train_loss", "none"), default="eval_loss",
                   help="also keep the checkpoint best by this (lower is better)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N steps: a fixed-noise eval loss and a grid of samples (0 = only at the end)")
    g.add_argument("--validation-prompt", action="append", default=None,
                   help="prompt for the sample grids (repeatable; default: the first captions)")
    g.add_argument("--samples-per-prompt", type=int, default=2)
    g.add_argument("--sample-steps", type=int, default=25)
    g.add_argument("--sample-scheduler", default=None, help="sampler for the grids (default: the model's)")
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--no-samples", action="store_true", help="no sample grids")
    g.add_argument("--log-every", type=int, default=10, help="steps between logged scalars")
    g.add_argument("--log-backend", choices=("auto", "tensorboard", "jsonl", "none"), default="auto")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--workers", type=int, default=4, help="image-loading threads")
    g.add_argument("--no-export-pipeline", action="store_true",
                   help="export RUN/unet only, without copying the model's other components into RUN")
    g.add_argument("--no-compile-cache", action="store_true", help="do not use the XLA compilation cache")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "resolution",
                 "samples_per_prompt", "sample_steps", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JaxdiffError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("eval_every", "warmup_steps", "ema_update_after_step", "weight_decay", "noise_offset",
                 "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise JaxdiffError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.steps is not None and args.epochs is not None:
        raise JaxdiffError("give --steps or --epochs, not both")
    if args.epochs is not None and not args.epochs > 0:
        raise JaxdiffError(f"--epochs must be > 0, got {args.epochs}")
    for name in ("lr", "snr_gamma", "ema_inv_gamma", "ema_power", "adam_epsilon"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise JaxdiffError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.cfg_dropout is not None and not 0.0 <= args.cfg_dropout < 1.0:
        raise JaxdiffError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise JaxdiffError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise JaxdiffError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------

def _run_options(args, out: Path) -> dict:
    """The run's settings: from the flags for a new run, from RUN/train_config.json on --resume
    (where a flag that differs is an error)."""
    path = out / RUN_CONFIG
    if args.resume:
        if not path.is_file():
            raise JaxdiffError(f"--resume: {out} holds no run ({RUN_CONFIG} missing); start one without --resume")
        try:
            saved = json.loads(path.read_text())["train"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise JaxdiffError(f"{path} cannot be read ({e}); start a new --out") from None
        for k in RUN_OPTIONS:
            given = getattr(args, k)
            if given is not None and given != saved.get(k):
                flag = "--" + k.replace("_", "-")
                raise JaxdiffError(f"{flag} {given} differs from the run's {saved.get(k)}; --resume keeps "
                                   f"the run's settings (drop {flag}, or start a new --out)")
        return {**DEFAULTS, **saved}
    if path.exists() or (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        raise JaxdiffError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    opts = {k: getattr(args, k) if getattr(args, k) is not None else DEFAULTS[k] for k in RUN_OPTIONS}
    if opts["model_dir"] is None:
        raise JaxdiffError("--model-dir is required: a diffusers Stable Diffusion folder to fine-tune")
    if opts["train_data"] is None:
        raise JaxdiffError("--train-data is required: an image folder with metadata.jsonl/csv, or a "
                           "Hugging Face dataset name")
    folder = Path(opts["model_dir"]).expanduser()
    opts["model_dir"] = str(folder.absolute()) if folder.exists() else opts["model_dir"]
    data = Path(opts["train_data"]).expanduser()
    opts["train_data"] = str(data.absolute()) if data.exists() else opts["train_data"]
    return opts


def _write_config(out: Path, opts: dict, total_steps: int, data) -> None:
    from jaxdiff.weights import save_json

    save_json({"train": opts, "total_steps": total_steps,
               "data": {"fingerprint": data.fingerprint, "images": len(data), "source": data.source}},
              out / RUN_CONFIG)


def _check_same_data(out: Path, data) -> None:
    """--resume continues exactly only on the data the run started with."""
    saved = json.loads((out / RUN_CONFIG).read_text()).get("data") or {}
    if saved.get("fingerprint") not in (None, data.fingerprint):
        raise JaxdiffError(f"the training data changed since this run started ({saved.get('images')} images "
                           f"then, {len(data)} now, or files/captions edited); --resume needs the same "
                           "data, or start a new --out")


def _sizes(opts: dict, pipe) -> int:
    resolution = opts["resolution"] or pipe.default_size
    f = pipe.vae_scale_factor
    if resolution % f:
        raise JaxdiffError(f"--resolution {resolution} must be a multiple of {f} (the VAE's downscale factor)")
    return int(resolution)


def _training_scheduler(opts: dict, model_dir: Path):
    """DDPM on the model's own beta schedule (and prediction type unless overridden), as
    diffusers' training scripts build `DDPMScheduler.from_pretrained(model, "scheduler")`."""
    from jaxdiff.schedulers import create_scheduler

    overrides = {"prediction_type": opts["prediction_type"]} if opts["prediction_type"] else {}
    return create_scheduler(model_dir / "scheduler", name="ddpm", **overrides)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def export(out: Path, pipe, unet_params, *, with_pipeline: bool = True) -> Path:
    """RUN/unet as a diffusers folder; with `with_pipeline`, the model's other components and
    a model_index.json beside it, so RUN is a pipeline folder."""
    from jaxdiff.models.unet_2d_condition import save_unet_2d_condition
    from jaxdiff.weights import read_json, save_json

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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Run (or continue) training as the flags say; returns the summary dict."""
    _check_args(args)
    distributed.initialize(distributed.config_from_args(args))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.data.captions import CaptionBatches, load_captions, pixel_fetcher
    from jaxdiff.compile_cache import enable_compilation_cache
    from jaxdiff.data.batches import DataPosition
    from jaxdiff.data.latent_cache import LatentCache
    from jaxdiff.pipelines.stable_diffusion import load_pipeline
    from jaxdiff.training.preemption import StopRequests
    from jaxdiff.training.run_log import RunLog
    from jaxdiff.training.optim import make_optimizer
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss
    from jaxdiff.tokenizer import tokenize
    from jaxdiff.training.loop import run_steps
    from jaxdiff.training.loop import summary as train_summary
    from jaxdiff.training import EMA, Checkpointer, create_train_state, make_train_step, resume_everywhere

    if not args.no_compile_cache:
        enable_compilation_cache()
    out = Path(args.out).expanduser().absolute()
    main_process = distributed.is_main_process()
    opts = _run_options(args, out)
    distributed.all_equal(json.dumps(opts, sort_keys=True), "the run's settings")

    # ---- data, model, scheduler
    data = load_captions(opts["train_data"], split=opts["split"], caption_column=opts["caption_column"],
                         image_column=opts["image_column"], verbose=main_process)
    distributed.all_equal(data.fingerprint, "the training data")
    if args.resume:
        _check_same_data(out, data)
    dtype = jnp.bfloat16 if opts["mixed_precision"] == "bf16" else jnp.float32
    pipe, params = load_pipeline(opts["model_dir"], dtype=dtype, param_dtype=jnp.float32,
                                 scheduler=args.sample_scheduler)
    resolution = _sizes(opts, pipe)
    scheduler = _training_scheduler(opts, Path(opts["model_dir"]))

    batch_size = int(opts["batch_size"])
    distributed.check_batch_size(batch_size)
    if batch_size > len(data):
        raise JaxdiffError(f"--batch-size {batch_size} is larger than the data set ({len(data)} images)")
    if args.epochs is not None:
        total_steps = max(1, math.ceil(args.epochs * (len(data) // batch_size)))
    else:
        total_steps = args.steps or (json.loads((out / RUN_CONFIG).read_text()).get("total_steps")
                                     if args.resume else None) or DEFAULT_STEPS
    schedule_steps = total_steps
    if args.resume:
        planned = json.loads((out / RUN_CONFIG).read_text()).get("total_steps", total_steps)
        if opts["lr_schedule"] != "constant" and total_steps != planned:
            raise JaxdiffError(f"this run's {opts['lr_schedule']} learning-rate schedule ends at step "
                               f"{planned}; --resume cannot change its length (drop --steps/--epochs, "
                               "or start a new --out)")
        if total_steps != planned and main_process:
            _write_config(out, opts, total_steps, data)  # a constant-rate run extended or shortened

    def tok(strings):
        return tokenize(pipe.tokenizer, list(strings), pipe.max_length)

    null_ids = tok([""])[0]
    if opts["cache_latents"]:
        cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else out / "cache"
        cache = LatentCache.build_or_open(cache_dir, data, pipe, params, resolution=resolution, tokenize=tok,
                                          dtype=opts["cache_dtype"], batch_size=max(1, batch_size // max(
                                              1, distributed.process_count())), workers=args.workers,
                                          verbose=main_process)
        fetch = cache.fetch
        null_context = cache.null_context
    else:
        fetch = pixel_fetcher(data, resolution, tok, workers=args.workers)
        null_context = None

    # ---- the step
    loss_cfg = LossConfig(cfg_dropout=float(opts["cfg_dropout"]), noise_offset=float(opts["noise_offset"]),
                          snr_gamma=opts["snr_gamma"])
    loss_fn = text_to_image_loss(pipe, scheduler, loss_cfg, null_ids=null_ids, null_context=null_context)
    tx, lr_schedule = make_optimizer(
        float(opts["lr"]), total_steps=schedule_steps, warmup_steps=int(opts["warmup_steps"]),
        schedule=opts["lr_schedule"], weight_decay=float(opts["weight_decay"]),
        b1=float(opts["adam_beta1"]), b2=float(opts["adam_beta2"]), eps=float(opts["adam_epsilon"]),
        max_grad_norm=float(opts["max_grad_norm"]) or None)
    ema_on = float(opts["ema_decay"]) > 0
    ema = EMA(decay=float(opts["ema_decay"]), update_after_step=int(opts["ema_update_after_step"]),
              use_warmup=bool(opts["ema_warmup"]), inv_gamma=float(opts["ema_inv_gamma"]),
              power=float(opts["ema_power"])) if ema_on else None
    train_step = make_train_step(loss_fn, tx, ema=ema)

    key = jax.random.PRNGKey(int(opts["seed"]))
    state = create_train_state(params.pop("unet"), tx, jax.random.fold_in(key, 1), ema=ema_on)
    checkpointer = Checkpointer(out / CHECKPOINTS, max_to_keep=args.keep_checkpoints,
                                best_metric=None if args.best_metric == "none" else args.best_metric,
                                primary_only=True) if main_process else None
    position = DataPosition()
    if args.resume:
        state, position = resume_everywhere(checkpointer, state, out / CHECKPOINTS)
    elif main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(out, opts, total_steps, data)
    distributed.sync("run-folder-ready")
    start_step = int(state.step)

    batches = CaptionBatches(data, batch_size, fetch, seed=int(opts["seed"]), position=position,
                             process_index=distributed.process_index(),
                             process_count=distributed.process_count(), workers=args.workers)
    encoders = None if opts["cache_latents"] else parallel.replicate(
        {"vae": params["vae"], "text_encoder": params["text_encoder"]})

    def device_batch(batch):
        batch = {k: v for k, v in batch.items() if k != "index"}
        sharded = parallel.shard(batch)
        if encoders is not None:
            sharded["encoders"] = encoders
        return sharded

    evaluator = _Evaluator(args, opts, pipe, params, data, fetch, loss_fn, batch_size, resolution, main_process)
    log = RunLog(out, total_steps=total_steps, initial_step=start_step, images_per_step=batch_size,
                 enabled=main_process, progress=not args.no_progress, backend=args.log_backend)

    p_state = parallel.replicate(state)
    del state
    compile_seconds, t_train, losses, step, timed_from = 0.0, 0.0, [], start_step, start_step
    last_eval: dict = {}
    stopped_by = None
    if start_step >= total_steps:
        log.write(f"the run is already at step {start_step}; nothing to train (raise --steps)")
    else:
        step_fn = parallel.pmap(train_step)

        def save(p_state, step, window):
            metrics = {"train_loss": float(np.mean(window)) if window else float("nan")}
            if args.best_metric == "eval_loss" or args.eval_every:
                metrics.update(evaluator.eval_loss(p_state))
            last_eval.update(metrics)
            if checkpointer is not None:
                checkpointer.save(parallel.host_copy(p_state), {"data": batches.position.to_dict()},
                                  metrics=metrics)

        window: list[float] = []  # the losses since the last checkpoint

        def record(done, metrics):
            """Log the loss of a step (read after the next one was dispatched)."""
            value = float(metrics["loss"][0])
            losses.append(value)
            window.append(value)
            if done % args.log_every == 0:
                log.scalars(done, {"loss": value, "mse": float(metrics["mse"][0]),
                                   "grad_norm": float(metrics["grad_norm"][0]),
                                   "lr": float(lr_schedule(done - 1))})
            log.step(done, {"loss": value})

        def checkpoint(p_state, step):
            save(p_state, step, list(window))
            window.clear()

        with StopRequests() as stop:
            result = run_steps(step_fn, p_state, lambda: device_batch(next(batches)), start_step=start_step,
                               total_steps=total_steps, checkpoint_every=args.checkpoint_every,
                               eval_every=args.eval_every, stop=stop, on_metrics=record,
                               on_checkpoint=checkpoint,
                               on_eval=lambda p_state, step: evaluator.log_eval(log, p_state, step),
                               on_timing_start=log.start_timing)
        p_state, step, t_train, stopped_by = result.state, result.step, result.train_seconds, result.stopped_by
        compile_seconds, timed_from = result.compile_seconds, result.timed_from
        batches.close()
        if checkpointer is not None:
            checkpointer.wait()
        if stopped_by is not None:
            log.close()
            if checkpointer is not None:
                checkpointer.close()
            distributed.log(f"stopped at step {step}; checkpoint saved in {out / CHECKPOINTS}; "
                            "continue with --resume")
            raise SystemExit(128 + int(stopped_by))

    final = parallel.host_copy(p_state)
    unet_params = final.ema_params if final.ema_params is not None else final.params
    summary = {
        **train_summary(start_step, step, timed_from, t_train, batch_size, losses, FINAL_LOSS_WINDOW),
        "first_step_seconds": round(compile_seconds, 2),  # compilation + one step
        "devices": jax.device_count(),
        "processes": distributed.process_count(),
        "batch_size": batch_size,
        "ema": ema_on,
    }
    if "eval_loss" in last_eval:
        summary["eval_loss"] = round(last_eval["eval_loss"], 5)
    if main_process:
        if not args.no_samples:
            summary["samples"] = str(evaluator.log_eval(log, p_state, step, with_loss=False))
        summary["unet"] = str(export(out, pipe, unet_params, with_pipeline=not args.no_export_pipeline))
    log.close()
    if checkpointer is not None:
        checkpointer.close()
    distributed.sync("run-finished")
    return summary


class _Evaluator:
    """A fixed-noise loss on a fixed batch (the checkpoints' "best" metric) and sample grids of
    the validation prompts; with EMA, both use the EMA weights (what is exported)."""

    def __init__(self, args, opts, pipe, params, data, fetch, loss_fn, batch_size, resolution, main_process):
        import jax
        import numpy as np

        from jaxdiff import parallel

        self.args, self.pipe, self.main = args, pipe, main_process
        self.frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
        rows = distributed.host_slice(batch_size)
        ids = np.arange(batch_size, dtype=np.int64)[rows]
        caps = np.array([data.caption_ids[i][0] for i in ids], np.int64)
        batch = {k: v for k, v in fetch(ids, caps).items() if k != "index"}
        self.batch = parallel.shard(batch)
        if not opts["cache_latents"]:
            self.batch["encoders"] = parallel.replicate(self.frozen)
        self.key = jax.random.fold_in(jax.random.PRNGKey(int(opts["seed"])), 2)

        def eval_loss(state, batch):
            params = state.params if state.ema_params is None else state.ema_params
            loss, _ = loss_fn(params, batch, self.key)
            return jax.lax.pmean(loss, parallel.AXIS)

        self._eval = parallel.pmap(eval_loss, donate_state=False)
        prompts = args.validation_prompt or [c for c in data.caption_strings if c][:4] or ["a photo"]
        self.prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
        self.resolution = resolution
        self._generate = None

    def eval_loss(self, p_state) -> dict:
        return {"eval_loss": float(self._eval(p_state, self.batch)[0])}

    def log_eval(self, log, p_state, step, with_loss: bool = True):
        """Log the eval loss and a sample grid (rows = prompts); returns the grid's path."""
        if with_loss:
            values = self.eval_loss(p_state)
            log.scalars(step, values)
            log.write(f"step {step}: eval loss {values['eval_loss']:.5f}")
        if self.args.no_samples or not self.main:
            return None
        import jax

        from jaxdiff import parallel
        from jaxdiff.images import make_grid, unit_to_uint8
        from jaxdiff.pipelines.stable_diffusion import GenerateConfig, generate, tokenize_prompts

        state = parallel.host_copy(p_state)
        unet = state.params if state.ema_params is None else state.ema_params
        ids, neg = tokenize_prompts(self.pipe, self.prompts)
        config = GenerateConfig(num_inference_steps=self.args.sample_steps, height=self.resolution,
                                width=self.resolution)
        images = generate(self.pipe, {"unet": unet, **self.frozen}, ids, neg, jax.random.PRNGKey(0),
                          self.args.guidance_scale, config=config)
        grid = make_grid(unit_to_uint8(images), nrow=self.args.samples_per_prompt)
        return log.image(step, "samples", grid)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    summary = train(args)
    if distributed.is_main_process():
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
