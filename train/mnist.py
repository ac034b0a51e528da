"""Train the diffusion course's class-conditioned MNIST model (unit 2), data-parallel over all
local devices.

    python -m train.mnist --out runs/mnist                 # offline: the MNIST copy shipped with jaxdiff
    python -m train.mnist --data-dir DIR --model course --epochs 10 --out runs/course
    python -m train.mnist --out runs/mnist --steps 4000 --resume   # continue a run

The defaults train a CPU-sized model (`--model small`) in ~10 minutes on two cores: the course's
Adam 1e-3 and DDPM squaredcos_cap_v2 schedule, with batch 64, label dropout 0.1 (so samples can
use classifier-free guidance), min-SNR-5 loss weighting and an EMA of the weights. The course's
own recipe is `--model course --batch-size 128 --cfg-dropout 0 --snr-gamma 0 --ema-decay 0
--epochs 10` (MSE on the noise, no null label). Every step is one jitted `train_step` over a device
mesh (`--mesh data=D,fsdp=F`; `--parallel pmap` for the replicated path); the state (params, Adam moments, step, PRNG key, optional EMA) and the data
position are checkpointed with orbax every `--checkpoint-every` steps, at the end, and when the
run is stopped (SIGTERM / Ctrl-C), so `--resume` continues exactly where it stopped. At the end
`RUN/samples.png` shows `--per-class` samples of every digit (row i = digit i; DDIM, 40 steps,
guidance 3), and one JSON
line on stdout sums up the run: steps, train_seconds (compilation excluded), images_per_s,
final_loss (mean of the last 50 steps' losses).

The run folder RUN holds jaxdiff_run.json (the run's settings, model and training scheduler),
checkpoints/, logs/ and samples.png. Model presets: `small` (default: sized to train in
minutes on a CPU), `course` (the course's UNet: channels 32/64/64, attention at 14×14 and 7×7),
`tiny` (for tests). Defaults: jaxdiff/training/configs.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from jaxdiff.cli import (add_compile_cache_flags, at_least, finite_float, in_range, positive, program_main,
                         program_parser)
from jaxdiff.errors import JaxdiffError
from jaxdiff.parallel import distributed
from jaxdiff.pipelines.class_conditioned import DEFAULT_GUIDANCE, PROGRAM, default_guidance
from jaxdiff.training.configs import (MNIST_DEFAULT_STEPS, MNIST_MISSING, MNIST_PRESETS,
                                      MNIST_TRAIN_SCHEDULER, MnistConfig, MnistSettings)
from jaxdiff.training.program import add_loop_flags, check_loop_flags, start_run

PRESETS = MNIST_PRESETS  # the model presets, by name


def parse_args(argv=None) -> argparse.Namespace:
    p = program_parser("python -m train.mnist", __doc__)
    d = MnistConfig()
    p.add_argument("--data-dir", default=None, help="folder with MNIST IDX files (.gz or raw); default: "
                   "Hugging Face datasets when reachable, else the test set shipped with jaxdiff")
    p.add_argument("--out", default="runs/mnist", help="run folder (run record, checkpoints, samples.png)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help=f"model preset (default {d.model})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch, split over devices (default {d.batch_size})")
    p.add_argument("--lr", type=finite_float, default=None, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, default=None, help="initialisation, data order and noise (default 0)")
    p.add_argument("--cfg-dropout", type=finite_float, default=None,
                   help="probability of replacing a label by the null label, for classifier-free "
                        f"guidance (default {d.cfg_dropout:g}; 0 trains without a null label, as the course)")
    p.add_argument("--ema-decay", type=finite_float, default=None, help="keep an EMA of the weights with this "
                   f"maximum decay (diffusers' EMAModel rule) and sample with it (default {d.ema_decay:g}; 0 = off)")
    p.add_argument("--snr-gamma", type=finite_float, default=None, help="min-SNR-γ loss weighting "
                   f"(Hang et al. 2023; default {d.snr_gamma:g}, the paper's choice; 0 = plain MSE, as the course)")
    p.add_argument("--sample-scheduler", default="ddim", help="sampler for samples.png (default ddim)")
    p.add_argument("--sample-steps", type=int, default=40, help="sampler steps for samples.png (default 40)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help=f"classifier-free guidance for samples.png (default {DEFAULT_GUIDANCE:g} with "
                        "--cfg-dropout > 0, else 1)")
    p.add_argument("--per-class", type=int, default=8, help="samples per digit in samples.png (default 8)")
    p.add_argument("--no-samples", dest="samples", action="store_false", help="do not write samples.png")
    add_loop_flags(p, MNIST_DEFAULT_STEPS, eval_help="every N steps, sample a grid like samples.png (same "
                   "sampler, guidance and seed) and log it with the scalars; 0 = never (default)")
    add_compile_cache_flags(p)
    distributed.add_arguments(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    check_loop_flags(args)
    at_least(args, 1, "batch_size", "sample_steps", "per_class")
    at_least(args, 0, "snr_gamma")
    positive(args, "lr")
    in_range(args, 0.0, 1.0, "cfg_dropout", "ema_decay")


def new_run(config: MnistConfig, data):
    """The record of a fresh run: the model sized to the data, the training scheduler."""
    from jaxdiff.models.class_conditioned import ClassConditionedUnet
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.run_folder import RunRecord

    h, w, c = data.image_shape
    try:
        model = ClassConditionedUnet.create(num_classes=int(data.labels.max()) + 1,
                                            null_class=config.cfg_dropout > 0, sample_size=h if h == w else (h, w),
                                            in_channels=c, out_channels=c, **PRESETS[config.model])
    except JaxdiffError as e:
        raise JaxdiffError(f"the {config.model} model cannot take {h}x{w}x{c} images: {e}") from None
    sched = dict(MNIST_TRAIN_SCHEDULER)
    scheduler = create_scheduler(sched.pop("name"), **sched)
    return RunRecord(PROGRAM, dataclasses.asdict(config), model=model.to_config(),
                     data={"source": data.source, "fingerprint": data.fingerprint, "images": len(data)},
                     scheduler={"_class_name": scheduler.diffusers_class, **scheduler.config})


def check_data(model, data) -> None:
    if data.image_shape != model.image_shape:
        h, w, c = data.image_shape
        mh, mw, mc = model.image_shape
        raise JaxdiffError(f"the data's images are {h}x{w}x{c} but this run's model takes "
                           f"{mh}x{mw}x{mc}; use matching data or a new --out")
    if data.labels.min() < 0 or data.labels.max() >= model.num_classes:
        raise JaxdiffError(f"labels must be in [0, {model.num_classes}), found "
                           f"{data.labels.min()}..{data.labels.max()}")


def train_and_evaluate(run, settings: MnistSettings) -> dict:
    """Train (or continue) the run as configured; returns the summary."""
    import jax
    import optax

    from jaxdiff.data.batches import BatchIterator
    from jaxdiff.data.mnist import load_mnist
    from jaxdiff.images import save_png
    from jaxdiff.models.remat import checkpointed
    from jaxdiff.pipelines.class_conditioned import GridSampler, RunConfig
    from jaxdiff.sampling import as_apply_fn
    from jaxdiff.training import EMA, create_train_state, diffusion_loss, make_train_step
    from jaxdiff.training.program import sampling_params

    config = run.config
    data = load_mnist(settings.data_dir, verbose=run.main)
    run.check_same_data(data.fingerprint, len(data))
    record = run.record if run.resuming else new_run(config, data)
    run_config = RunConfig(model=record.model, scheduler=record.scheduler, train=record.train)
    model, scheduler = run_config.build_model(), run_config.training_scheduler()
    check_data(model, data)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else default_guidance(model)
    if guidance != 1.0 and model.null_label is None and settings.samples:
        raise JaxdiffError("--guidance-scale needs a model trained with --cfg-dropout > 0")
    grids = GridSampler(model, run_config.sampler(settings.sample_scheduler), settings.sample_steps,
                        settings.per_class, guidance, config.seed) if settings.samples or settings.eval_every else None
    n_dev = distributed.global_device_count()
    if config.batch_size % n_dev:
        raise JaxdiffError(f"--batch-size {config.batch_size} must be divisible by the {n_dev} devices")
    run.plan_steps(len(data), config.batch_size, MNIST_DEFAULT_STEPS)

    tx = optax.adam(config.lr)
    engine = run.engine
    loss_fn = diffusion_loss(as_apply_fn(model), scheduler,
                             scheduler.create_state(), cfg_dropout=config.cfg_dropout,
                             null_label=model.null_label, snr_gamma=config.snr_gamma or None,
                             axis_name=engine.axis_name)
    loss_fn = checkpointed(loss_fn, settings.gradient_checkpointing)
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=config.ema_decay) if config.ema_decay else None,
                                 grad_accum=settings.grad_accum, axis_name=engine.axis_name)
    key = jax.random.PRNGKey(config.seed)
    state = run.start(create_train_state(model.init_weights(key), tx, jax.random.fold_in(key, 1),
                                         ema=config.ema_decay > 0), record, batch_size=config.batch_size)
    batches = BatchIterator(data, config.batch_size, seed=config.seed, position=run.position,
                            process_index=distributed.process_index(), process_count=distributed.process_count())

    def evaluate(p_state, step):
        params = sampling_params(engine.host_copy(p_state)) if run.main or engine.copy_is_collective(p_state) \
            else None
        if run.main:
            run.log.image(step, "samples", grids.grid(params))
            run.log.flush()

    trained = run.train(engine.compile(train_step), engine.place_state(state),
                        lambda: engine.place_batch(next(batches)), lambda: batches.position, evaluate=evaluate)
    summary = {**run.summary(trained, config.batch_size), "compile_seconds": round(trained.compile_seconds, 2)}
    if settings.samples:
        final = engine.host_copy(trained.state) if engine.copy_is_collective(trained.state) else None

        def write_samples():
            t0 = time.perf_counter()
            grid = grids.grid(sampling_params(final if final is not None else engine.host_copy(trained.state)))
            summary["sample_seconds"] = round(time.perf_counter() - t0, 2)
            summary["samples"] = str(save_png(grid, run.run_dir / "samples.png", scale=2))
            run.log.image(trained.step, "samples", grid)

        distributed.on_main_process(write_samples, "writing samples.png")
    run.close()
    return summary


def train(args: argparse.Namespace) -> dict:
    """Flags → the run's config and this invocation's settings → `train_and_evaluate`."""
    with start_run(PROGRAM, MnistConfig, MnistSettings, args, check=check_args, missing=MNIST_MISSING) as run:
        return train_and_evaluate(run, run.settings)


main = program_main(parse_args, train)


if __name__ == "__main__":
    main()
