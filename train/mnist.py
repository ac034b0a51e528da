"""Train the diffusion course's class-conditioned MNIST model (unit 2), data-parallel over all
local devices.

    python -m train.mnist --out runs/mnist                 # offline: the MNIST copy shipped with jaxdiff
    python -m train.mnist --data-dir DIR --model course --epochs 10 --out runs/course
    python -m train.mnist --out runs/mnist --steps 4000 --resume   # continue a run

The defaults train a CPU-sized model (`--model small`) in ~10 minutes on two cores: the course's
Adam 1e-3 and DDPM squaredcos_cap_v2 schedule, with batch 64, label dropout 0.1 (so samples can
use classifier-free guidance), min-SNR-5 loss weighting and an EMA of the weights. The course's
own recipe is `--model course --batch-size 128 --cfg-dropout 0 --snr-gamma 0 --ema-decay 0
--epochs 10` (MSE on the noise, no null label). Every step is one `pmap`ped, jitted `train_step` (gradients averaged with
`lax.pmean`); the state (params, Adam moments, step, PRNG key, optional EMA) and the data
position are checkpointed with orbax every `--checkpoint-every` steps, at the end, and when the
run is stopped (SIGTERM / Ctrl-C), so `--resume` continues exactly where it stopped. At the end
`RUN/samples.png` shows `--per-class` samples of every digit (row i = digit i; DDIM, 40 steps,
guidance 3), and one JSON
line on stdout sums up the run: steps, train_seconds (compilation excluded), images_per_s,
final_loss (mean of the last 50 steps' losses).

Model presets: `small` (default: sized to train in minutes on a CPU), `course` (the course's
UNet: channels 32/64/64, attention at 14×14 and 7×7), `tiny` (for tests).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from jaxdiff.errors import JaxdiffError, cli_main
from jaxdiff.pipelines.class_conditioned import DEFAULT_GUIDANCE, default_guidance

# UNet2DModel config keys on top of the course's (jaxdiff.models.class_conditioned.COURSE_UNET).
PRESETS = {
    "course": {},
    # Sized for a CPU: a quarter of the course's channels, one ResNet per level, attention only
    # at 7x7, and the labels also in the UNet's class embedding (every ResNet block sees them).
    "small": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                  unet_class_embedding=True,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}
DEFAULT_PRESET = "small"
DEFAULT_STEPS = 2000
TRAIN_SCHEDULER = dict(name="ddpm", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
# Options fixed by the run: on --resume they come from RUN/config.json; passing a different value
# is an error rather than a silently different run.
RUN_OPTIONS = ("model", "batch_size", "lr", "seed", "cfg_dropout", "ema_decay", "snr_gamma")
# The CPU main job: the course's optimizer and schedule, batch 64 (more updates per second),
# min-SNR-5 weighting and an EMA, which reach readable digits in a third of the steps.
DEFAULTS = dict(model=DEFAULT_PRESET, batch_size=64, lr=1e-3, seed=0, cfg_dropout=0.1, ema_decay=0.999,
                snr_gamma=5.0)
FINAL_LOSS_WINDOW = 50


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.mnist", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST IDX files (.gz or raw); default: "
                   "Hugging Face datasets when reachable, else the test set shipped with jaxdiff")
    p.add_argument("--out", default="runs/mnist", help="run folder (config, checkpoints, samples.png)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help=f"model preset (default {DEFAULT_PRESET})")
    p.add_argument("--steps", type=int, default=None, help=f"train until this step (default {DEFAULT_STEPS})")
    p.add_argument("--epochs", type=float, default=None, help="train for this many passes over the data instead")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over devices (default 64)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="initialisation, data order and noise (default 0)")
    p.add_argument("--cfg-dropout", type=float, default=None,
                   help="probability of replacing a label by the null label, for classifier-free "
                        "guidance (default 0.1; 0 trains without a null label, as the course)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this "
                   "maximum decay (diffusers' EMAModel rule) and sample with it (default 0.999; 0 = off)")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting "
                   "(Hang et al. 2023; default 5, the paper's choice; 0 = plain MSE, as the course)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--sample-scheduler", default="ddim", help="sampler for samples.png (default ddim)")
    p.add_argument("--sample-steps", type=int, default=40, help="sampler steps for samples.png (default 40)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance for samples.png (default {DEFAULT_GUIDANCE:g} with "
                        "--cfg-dropout > 0, else 1)")
    p.add_argument("--per-class", type=int, default=8, help="samples per digit in samples.png (default 8)")
    p.add_argument("--no-samples", action="store_true", help="do not write samples.png")
    p.add_argument("--eval-every", type=int, default=0, help="every N steps, sample a grid like samples.png "
                   "(same sampler, guidance and seed) and log it with the scalars; 0 = never (default)")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged losses")
    p.add_argument("--log-backend", choices=("auto", "tensorboard", "jsonl", "none"), default="auto",
                   help="RUN/logs: TensorBoard when installed (auto), else JSONL (metrics.jsonl + PNGs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the XLA compilation cache")
    from jaxdiff.parallel import distributed

    distributed.add_arguments(p)
    return p.parse_args(argv)


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "sample_steps",
                 "per_class", "log_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JaxdiffError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.steps is not None and args.epochs is not None:
        raise JaxdiffError("give --steps or --epochs, not both")
    if args.epochs is not None and args.epochs <= 0:
        raise JaxdiffError(f"--epochs must be > 0, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise JaxdiffError(f"--lr must be > 0, got {args.lr}")
    if args.cfg_dropout is not None and not 0.0 <= args.cfg_dropout < 1.0:
        raise JaxdiffError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if args.eval_every < 0 or args.log_every < 1 or args.checkpoint_every < 1:
        raise JaxdiffError("--eval-every must be >= 0, --log-every and --checkpoint-every >= 1")
    if args.snr_gamma is not None and args.snr_gamma < 0:
        raise JaxdiffError(f"--snr-gamma must be >= 0, got {args.snr_gamma}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise JaxdiffError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------

def _new_run(args, data):
    """A RunConfig for a fresh run: options from the flags, the model sized to the data."""
    from jaxdiff.models.class_conditioned import ClassConditionedUnet
    from jaxdiff.pipelines.class_conditioned import RunConfig
    from jaxdiff.schedulers import create_scheduler

    opts = {k: getattr(args, k) if getattr(args, k) is not None else DEFAULTS[k] for k in RUN_OPTIONS}
    h, w, c = data.image_shape
    num_classes = int(data.labels.max()) + 1
    try:
        model = ClassConditionedUnet.create(num_classes=num_classes, null_class=opts["cfg_dropout"] > 0,
                                            sample_size=h if h == w else (h, w), in_channels=c,
                                            out_channels=c, **PRESETS[opts["model"]])
    except JaxdiffError as e:
        raise JaxdiffError(f"the {opts['model']} model cannot take {h}x{w}x{c} images: {e}") from None
    sched_cfg = dict(TRAIN_SCHEDULER)
    scheduler = create_scheduler(sched_cfg.pop("name"), **sched_cfg)
    return RunConfig(model=model.to_config(),
                     scheduler={"_class_name": scheduler.diffusers_class, **scheduler.config},
                     train={**opts, "data": data.source})


def _resumed_run(args, out: Path):
    from jaxdiff.pipelines.class_conditioned import RunConfig

    run = RunConfig.read(out)
    for k in RUN_OPTIONS:
        given = getattr(args, k)
        if given is not None and given != run.train.get(k):
            flag = "--" + k.replace("_", "-")
            raise JaxdiffError(f"{flag} {given} differs from the run's {run.train.get(k)}; --resume "
                               f"keeps the run's settings (drop {flag}, or start a new --out)")
    return run


def _check_data(model, data) -> None:
    if data.image_shape != model.image_shape:
        h, w, c = data.image_shape
        mh, mw, mc = model.image_shape
        raise JaxdiffError(f"the data's images are {h}x{w}x{c} but this run's model takes "
                           f"{mh}x{mw}x{mc}; use matching data or a new --out")
    if data.labels.min() < 0 or data.labels.max() >= model.num_classes:
        raise JaxdiffError(f"labels must be in [0, {model.num_classes}), found "
                           f"{data.labels.min()}..{data.labels.max()}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Run (or continue) training as the flags say; returns the summary dict."""
    _check_args(args)
    import jax
    import optax

    from jaxdiff import parallel
    from jaxdiff.parallel import distributed
    from jaxdiff.compile_cache import enable_compilation_cache
    from jaxdiff.data.batches import BatchIterator, DataPosition
    from jaxdiff.data.mnist import load_mnist
    from jaxdiff.images import save_png
    from jaxdiff.pipelines.class_conditioned import CHECKPOINTS, RUN_CONFIG
    from jaxdiff.training.preemption import StopRequests
    from jaxdiff.training.run_log import RunLog
    from jaxdiff.training.loop import run_steps
    from jaxdiff.training.loop import summary as train_summary
    from jaxdiff.training import (EMA, Checkpointer, create_train_state, diffusion_loss,
                                  make_train_step, resume_everywhere)

    distributed.initialize(distributed.config_from_args(args))
    if not args.no_compile_cache:
        enable_compilation_cache()
    out = Path(args.out).expanduser()
    main_process = distributed.is_main_process()
    ckpt_dir = out / CHECKPOINTS

    if args.resume:
        run = _resumed_run(args, out)
    elif (out / RUN_CONFIG).exists() or (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        raise JaxdiffError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")

    data = load_mnist(args.data_dir, verbose=main_process)
    if not args.resume:
        run = _new_run(args, data)
    opts = run.train
    model = run.build_model()
    _check_data(model, data)
    scheduler = run.training_scheduler()
    guidance = args.guidance_scale if args.guidance_scale is not None else default_guidance(model)
    if guidance != 1.0 and model.null_label is None and not args.no_samples:
        raise JaxdiffError("--guidance-scale needs a model trained with --cfg-dropout > 0")
    grids = None if args.no_samples and not args.eval_every else _GridSampler(
        model, run.sampler(args.sample_scheduler), args.sample_steps, args.per_class, guidance,
        int(opts["seed"]))

    n_dev = distributed.global_device_count()
    batch_size = int(opts["batch_size"])
    if batch_size % n_dev:
        raise JaxdiffError(f"--batch-size {batch_size} must be divisible by the {n_dev} devices")
    if args.epochs is not None:
        total_steps = max(1, math.ceil(args.epochs * (len(data) // batch_size)))
    else:
        total_steps = args.steps or DEFAULT_STEPS

    tx = optax.adam(float(opts["lr"]))
    loss_fn = diffusion_loss(lambda p, x, t, y: model.apply({"params": p}, x, t, y), scheduler,
                             scheduler.create_state(), cfg_dropout=float(opts["cfg_dropout"]),
                             null_label=model.null_label, snr_gamma=float(opts.get("snr_gamma") or 0) or None)
    ema_decay = float(opts["ema_decay"])
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=ema_decay) if ema_decay else None)

    seed = int(opts["seed"])
    key = jax.random.PRNGKey(seed)
    state = create_train_state(model.init_weights(key), tx, jax.random.fold_in(key, 1), ema=ema_decay > 0)
    # Process 0 reads and writes checkpoints; the others get the state from it.
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=args.keep_checkpoints,
                                primary_only=True) if main_process else None
    position = DataPosition()
    if args.resume:
        state, position = resume_everywhere(checkpointer, state, ckpt_dir)
    elif main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_CONFIG}.tmp"
        tmp.write_text(run.to_json())
        tmp.replace(out / RUN_CONFIG)
    distributed.sync("run-folder-ready")

    start_step = int(state.step)
    batches = BatchIterator(data, batch_size, seed=seed, position=position,
                            process_index=distributed.process_index(),
                            process_count=distributed.process_count())
    log = RunLog(out, total_steps=total_steps, initial_step=start_step, images_per_step=batch_size,
                 enabled=main_process, progress=not args.no_progress, backend=args.log_backend)

    def save(p_state):
        if checkpointer is not None:
            checkpointer.save(parallel.host_copy(p_state), {"data": batches.position.to_dict()})

    def evaluate(p_state, step):
        if main_process:
            log.image(step, "samples", grids.grid(_sampling_params(parallel.host_copy(p_state))))
            log.flush()

    p_state = parallel.replicate(state)
    del state
    compile_seconds, t_train, losses, step, timed_from = 0.0, 0.0, [], start_step, start_step
    if start_step >= total_steps:
        log.write(f"the run is already at step {start_step}; nothing to train (raise --steps)")
    else:
        def record(step, metrics):
            losses.append(float(metrics["loss"][0]))
            if step % args.log_every == 0:
                log.scalars(step, {"loss": losses[-1]})
            log.step(step, {"loss": losses[-1]})

        with StopRequests() as stop:
            result = run_steps(parallel.pmap(train_step), p_state, lambda: parallel.shard(next(batches)),
                               start_step=start_step, total_steps=total_steps,
                               checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, stop=stop,
                               on_metrics=record, on_checkpoint=lambda s, _: save(s), on_eval=evaluate,
                               on_timing_start=log.start_timing)
        p_state, step, t_train = result.state, result.step, result.train_seconds
        compile_seconds, timed_from = result.compile_seconds, result.timed_from
        if checkpointer is not None:
            checkpointer.wait()
        if result.stopped_by is not None:
            log.close()
            if checkpointer is not None:
                checkpointer.close()
            distributed.log(f"stopped at step {step}; checkpoint saved in {ckpt_dir}; continue with --resume")
            raise SystemExit(128 + result.stopped_by)
    if checkpointer is not None:
        checkpointer.close()

    summary = {
        **train_summary(start_step, step, timed_from, t_train, batch_size, losses, FINAL_LOSS_WINDOW),
        "compile_seconds": round(compile_seconds, 2),
        "devices": n_dev,
        "processes": distributed.process_count(),
        "batch_size": batch_size,
    }
    if not args.no_samples and main_process:
        t0 = time.perf_counter()
        grid = grids.grid(_sampling_params(parallel.host_copy(p_state)))
        summary["sample_seconds"] = round(time.perf_counter() - t0, 2)
        summary["samples"] = str(save_png(grid, out / "samples.png", scale=2))
        log.image(step, "samples", grid)
    log.close()
    return summary


def _sampling_params(state):
    """The weights samples come from: the EMA when the run keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


class _GridSampler:
    """`--per-class` samples of every digit as one uint8 grid image (row i = digit i), with
    one compiled sampler shared by `--eval-every` and the final samples.png."""

    def __init__(self, model, scheduler, steps, per_class, guidance, seed):
        import jax
        import jax.numpy as jnp

        from jaxdiff.pipelines.class_conditioned import class_labels, make_generator

        self.labels = class_labels(model.num_classes, per_class)
        self.per_class = per_class
        self.generate = make_generator(model, scheduler, steps, use_cfg=guidance != 1.0)
        self.key = jax.random.PRNGKey(seed)
        self.guidance = jnp.float32(guidance)

    def grid(self, params):
        import numpy as np

        from jaxdiff.images import make_grid, unit_to_uint8

        images = np.asarray(self.generate(params, self.labels, self.key, self.guidance))
        return make_grid(unit_to_uint8(images), nrow=self.per_class)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    summary = train(args)
    from jaxdiff.parallel import distributed

    if distributed.is_main_process():  # one report per run
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
