"""Fine-tune a diffusers UNet2DModel (a DDPM pipeline such as google/ddpm-celebahq-256) on your
images, or train one from a config, data-parallel over every device.

    python -m train.finetune --model-dir ddpm-bedroom-256 --train-data wikiart/ --out runs/wikiart \\
        --batch-size 4 --grad-accum 2 --lr 1e-5 --steps 2000 --eval-every 250
    python -m train.finetune --config unet_config.json --train-data mnist_png/ --out runs/digits --epochs 5
    python -m train.finetune --out runs/wikiart --resume        # continue (settings from RUN/jaxdiff_run.json)

--model-dir is a diffusers UNet2DModel folder, or a pipeline folder with unet/ (and scheduler/,
whose beta schedule and prediction type the training uses; DDPM defaults otherwise); --config a
UNet2DModel config.json (a new model, initialised from --seed, with a DDPM --beta-schedule).
--train-data is a folder of images (flat; one sub-folder per class; or a metadata.jsonl/csv with
file_name and, for class labels, a label column) or a Hugging Face dataset name (user/name,
online or cached). A class-conditional UNet (num_class_embeds) trains on the labels. Images are
resized to cover the model's sample_size (or --resolution), centre- or --random-crop-ped, and
--random-flip-ped; each example's crop and flip are a function of (seed, epoch, example).

The course's loop (unit 2) and diffusers' train_unconditional.py: noise, a random timestep, the
MSE between the UNet's prediction and the noise (or v), AdamW. --grad-accum K averages the
gradients of K micro-batches of --batch-size / K images into one update inside one compiled
step: the update of the whole batch, with a K-th of the activation memory. --ema-decay keeps an EMA (diffusers' EMAModel rule) that the
samples and the export use.

RUN holds jaxdiff_run.json, checkpoints/ (orbax: params, optimizer, EMA, PRNG key, data position;
every --checkpoint-every steps, at the end, and on SIGTERM / Ctrl-C, after which --resume continues
exactly), logs/ (TensorBoard or metrics.jsonl, and the --eval-every sample grids), samples.png
and, at the end, the trained UNet as a diffusers DDPMPipeline folder: RUN/unet, RUN/scheduler,
RUN/model_index.json. `DDPMPipeline.from_pretrained(RUN)` loads it in PyTorch, and
`sample.color_guidance --model-dir RUN` / `sample.clip_guidance` steer it. One JSON line on stdout
sums the run up.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from jaxdiff.cli import (add_compile_cache_flags, at_least, finite_float, in_range, positive, program_main,
                         program_parser)
from jaxdiff.data.captions import MAX_IMAGE_PIXELS, ON_BAD_IMAGE, ON_BAD_IMAGE_CHOICES
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import distributed
from jaxdiff.training.finetune import (BETA_SCHEDULES, FINETUNE_DEFAULT_STEPS, PROGRAM, FinetuneConfig,
                                       FinetuneSettings)
from jaxdiff.training.program import add_loop_flags, check_loop_flags, start_run


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m train.finetune", __doc__)
    num = finite_float
    d = FinetuneConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model-dir", default=None, help="diffusers UNet2DModel or DDPMPipeline folder to fine-tune")
    g.add_argument("--config", default=None, help="UNet2DModel config.json: train a new model instead")
    g.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=None,
                   help="the new model's DDPM schedule (with --config; default linear)")
    g.add_argument("--train-data", default=None, help="image folder (flat, class sub-folders, or metadata with "
                   "file_name[, label]) or a Hugging Face dataset name")
    g.add_argument("--split", default=None, help="HF datasets split (default train)")
    g.add_argument("--image-column", default=None, help="HF datasets image column (default image)")
    g.add_argument("--label-column", default=None, help="column of class labels (default label)")
    g.add_argument("--resolution", type=int, default=None, help="training size (default: the model's sample_size)")
    g.add_argument("--random-crop", action="store_true", default=None, help="random crops (default: centre)")
    g.add_argument("--random-flip", action="store_true", default=None, help="mirror half the images left-right")
    g.add_argument("--out", default="runs/finetune", help="run folder (also the exported pipeline)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images per update, over all devices (default {d.batch_size}; --grad-accum K "
                        "splits them into K micro-batches)")
    g.add_argument("--lr", type=num, default=None, help=f"AdamW learning rate (default {d.lr:g})")
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=None,
                   help="after the warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 0)")
    g.add_argument("--weight-decay", type=num, default=None, help=f"AdamW weight decay (default {d.weight_decay:g})")
    g.add_argument("--max-grad-norm", type=num, default=None, help="clip the global gradient norm (default 0 = off)")
    g.add_argument("--adam-beta1", type=num, default=None)
    g.add_argument("--adam-beta2", type=num, default=None)
    g.add_argument("--adam-epsilon", type=num, default=None)
    g.add_argument("--seed", type=int, default=None, help="initialisation, data order, augmentation and noise")
    g.add_argument("--ema-decay", type=num, default=None, help="maximum EMA decay, e.g. 0.999 (default 0 = off)")
    g.add_argument("--snr-gamma", type=num, default=None, help="min-SNR-γ loss weighting (default off)")
    g = p.add_argument_group("samples, data loading and export")
    g.add_argument("--num-samples", type=int, default=16, help="images per sample grid (default 16)")
    g.add_argument("--sample-steps", type=int, default=50, help="sampler steps (default 50)")
    g.add_argument("--sample-scheduler", default="ddim", help="sampler for the grids (default ddim)")
    g.add_argument("--no-samples", dest="samples", action="store_false", help="no samples.png at the end")
    g.add_argument("--no-export", dest="export", action="store_false", help="do not write RUN as a DDPMPipeline")
    g.add_argument("--workers", type=int, default=4, help="image-loading threads")
    g.add_argument("--on-bad-image", choices=ON_BAD_IMAGE_CHOICES, default=ON_BAD_IMAGE,
                   help=f"an unreadable or too large image: skip it or stop (default {ON_BAD_IMAGE})")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"larger images count as bad (default {MAX_IMAGE_PIXELS:,})")
    g.add_argument("--allow-outside-paths", action="store_true",
                   help="let the data's files point outside its folder (../, absolute, symlinks)")
    add_loop_flags(p, FINETUNE_DEFAULT_STEPS, eval_help="every N steps, log a sample grid (0 = never)")
    add_compile_cache_flags(p)
    distributed.add_arguments(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    check_loop_flags(args)
    at_least(args, 1, "batch_size", "resolution", "num_samples", "sample_steps", "workers",
             "max_image_pixels")
    at_least(args, 0, "warmup_steps", "weight_decay", "max_grad_norm")
    positive(args, "lr", "snr_gamma", "adam_epsilon")
    in_range(args, 0.0, 1.0, "ema_decay", "adam_beta1", "adam_beta2")


def new_config(config: FinetuneConfig) -> FinetuneConfig:
    """A new run's config with its folders made absolute (so --resume works from anywhere)."""
    if config.train_data is None:
        raise JaxdiffError("--train-data is required: an image folder or a Hugging Face dataset name")

    def absolute(path):
        if path is None:
            return None
        p = Path(path).expanduser()
        return str(p.absolute()) if p.exists() else path

    return dataclasses.replace(config, model_dir=absolute(config.model_dir), config=absolute(config.config),
                               train_data=absolute(config.train_data))


def train_and_evaluate(run, settings: FinetuneSettings) -> dict:
    """Train (or continue) the run as configured; returns the summary."""
    import jax

    from jaxdiff.data.images import ImageBatches, ImageFetcher, Preprocess, load_images
    from jaxdiff.images import save_png
    from jaxdiff.schedulers import scheduler_class
    from jaxdiff.training import create_train_state
    from jaxdiff.training.finetune import (SampleGrid, check_data, export_pipeline, finetune_loss, model_from_record,
                                           model_record, new_model, train_step_for, training_scheduler)
    from jaxdiff.training.program import sampling_params
    from jaxdiff.training.run_folder import RunRecord

    config = run.config
    scheduler_class(settings.sample_scheduler)  # an unknown sampler fails before anything is loaded
    data = load_images(config.train_data, split=config.split, image_column=config.image_column,
                       label_column=config.label_column, verbose=run.main,
                       allow_outside_paths=settings.allow_outside_paths, max_image_pixels=settings.max_image_pixels)
    run.check_same_data(data.fingerprint, len(data))
    model = model_from_record(run.record) if run.resuming else new_model(config)
    labelled = check_data(model, data)
    step_batch = config.batch_size
    if step_batch > len(data):
        raise JaxdiffError(f"--batch-size {step_batch} is larger than the data set ({len(data)} images)")
    total_steps = run.plan_steps(len(data), step_batch, FINETUNE_DEFAULT_STEPS, fixed_length=None
                                 if config.lr_schedule == "constant" else f"{config.lr_schedule} learning-rate schedule")
    scheduler = training_scheduler(model.scheduler_config)
    engine = run.engine
    loss_fn = finetune_loss(model.module, scheduler, snr_gamma=config.snr_gamma, axis_name=engine.axis_name)
    train_step, tx, lr_schedule = train_step_for(config, loss_fn, total_steps, grad_accum=settings.grad_accum,
                                                 axis_name=engine.axis_name)
    params = model.params
    if params is None:  # resuming: the shapes only; the weights come from the checkpoint
        from jaxdiff.models.unet_2d import init_params

        params = init_params(model.module, jax.random.PRNGKey(0))
    record = RunRecord(PROGRAM, dataclasses.asdict(config), model=model_record(model),
                       scheduler=model.scheduler_config,
                       data={"source": data.source, "fingerprint": data.fingerprint, "images": len(data)})
    state = run.start(create_train_state(params, tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                                         ema=config.ema_decay > 0), record, batch_size=step_batch)
    preprocess = Preprocess(model.size, model.channels, random_crop=config.random_crop,
                            random_flip=config.random_flip)
    fetch = ImageFetcher(data, preprocess, seed=config.seed, workers=settings.workers,
                         on_bad_image=settings.on_bad_image)
    batches = ImageBatches(data, step_batch, fetch, seed=config.seed, position=run.position,
                           process_index=distributed.process_index(), process_count=distributed.process_count())
    keep = ("images", "labels") if labelled else ("images",)

    def next_batch():
        batch = next(batches)
        return engine.place_batch({k: batch[k] for k in keep})

    grids = SampleGrid(model, settings.sample_scheduler, settings.sample_steps, settings.num_samples, config.seed) \
        if settings.samples or settings.eval_every else None

    def host_params(p_state):
        """The sampling weights on the host (every process joins a collective copy)."""
        if run.main or engine.copy_is_collective(p_state):
            return sampling_params(engine.host_copy(p_state))
        return None

    def evaluate(p_state, step):
        params = host_params(p_state)
        if run.main:
            run.log.image(step, "samples", grids.grid(params))
            run.log.flush()

    def scalars(step, m):
        return {"loss": float(m["loss"][0]), "grad_norm": float(m["grad_norm"][0]), "lr": float(lr_schedule(step - 1))}

    trained = run.train(engine.compile(train_step), engine.place_state(state), next_batch, lambda: batches.position,
                        scalars=scalars, evaluate=evaluate, close_data=batches.close)
    summary = {**run.summary(trained, step_batch), "compile_seconds": round(trained.compile_seconds, 2),
               "grad_accum": settings.grad_accum, "ema": config.ema_decay > 0,
               "skipped_images": batches.skipped_images}

    final = host_params(trained.state)

    def samples_and_export():
        params = final
        if settings.samples:
            t0 = time.perf_counter()
            grid = grids.grid(params)
            summary["sample_seconds"] = round(time.perf_counter() - t0, 2)
            summary["samples"] = str(save_png(grid, run.run_dir / "samples.png"))
            run.log.image(trained.step, "samples", grid)
        if settings.export:
            summary["pipeline"] = str(export_pipeline(run.run_dir, model.module, params, model.scheduler_config))

    distributed.on_main_process(samples_and_export, "writing the samples and the exported pipeline")
    run.close()
    return summary


def train(args: argparse.Namespace) -> dict:
    """Flags → the run's config and this invocation's settings → `train_and_evaluate`."""
    with start_run(PROGRAM, FinetuneConfig, FinetuneSettings, args, check=check_args) as run:
        if not run.resuming:
            run.config = new_config(run.config)
        return train_and_evaluate(run, run.settings)


main = program_main(parse_args, train)


if __name__ == "__main__":
    main()
