"""Train the diffusion course's class-conditioned MNIST model (unit 2), data-parallel over all
local devices.

    python -m train.mnist --out runs/mnist                 # offline: the MNIST copy shipped with jaxdiff
    python -m train.mnist --data-dir DIR --model course --epochs 10 --out runs/course
    python -m train.mnist --out runs/mnist --steps 4000 --resume   # continue a run

The course's recipe: Adam 1e-3, batch 128, MSE on the noise, DDPM with the squaredcos_cap_v2
schedule. Every step is one `pmap`ped, jitted `train_step` (gradients averaged with
`lax.pmean`); the state (params, Adam moments, step, PRNG key, optional EMA) and the data
position are checkpointed with orbax every `--checkpoint-every` steps, at the end, and when the
run is stopped (SIGTERM / Ctrl-C), so `--resume` continues exactly where it stopped. At the end
`RUN/samples.png` shows `--per-class` samples of every digit (row i = digit i), and one JSON
line on stdout sums up the run: steps, train_seconds (compilation excluded), images_per_s,
final_loss (mean of the last 50 steps' losses).

Model presets: `small` (default: sized to train in minutes on a CPU), `course` (the course's
UNet: channels 32/64/64, attention at 14×14 and 7×7), `tiny` (for tests).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

from jaxdiff.errors import JaxdiffError, cli_main

# UNet2DModel config keys on top of the course's (jaxdiff.models.class_conditioned.COURSE_UNET).
PRESETS = {
    "course": {},
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
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
RUN_OPTIONS = ("model", "batch_size", "lr", "seed", "cfg_dropout", "ema_decay")
DEFAULTS = dict(model=DEFAULT_PRESET, batch_size=128, lr=1e-3, seed=0, cfg_dropout=0.1, ema_decay=0.0)
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
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over devices (default 128)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="initialisation, data order and noise (default 0)")
    p.add_argument("--cfg-dropout", type=float, default=None,
                   help="probability of replacing a label by the null label, for classifier-free "
                        "guidance (default 0.1; 0 trains the course's model exactly)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this "
                   "maximum decay (diffusers' EMAModel rule) and sample with it; 0 = off (default)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--sample-scheduler", default="ddim", help="sampler for samples.png (default ddim)")
    p.add_argument("--sample-steps", type=int, default=40, help="sampler steps for samples.png (default 40)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance for samples.png (default 2 with --cfg-dropout > 0, else 1)")
    p.add_argument("--per-class", type=int, default=8, help="samples per digit in samples.png (default 8)")
    p.add_argument("--no-samples", action="store_true", help="do not write samples.png")
    p.add_argument("--log-every", type=int, default=10, help="progress-bar refresh interval in steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the XLA compilation cache")
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
# Stopping cleanly
# --------------------------------------------------------------------------------------------

class StopRequests:
    """While active, SIGTERM and the first Ctrl-C only set `signum`; the loop then checkpoints
    and exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, stop requests are ignored
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Run (or continue) training as the flags say; returns the summary dict."""
    _check_args(args)
    import jax
    import numpy as np
    import optax
    from tqdm import tqdm

    from jaxdiff import parallel
    from jaxdiff.compile_cache import enable_compilation_cache
    from jaxdiff.data import BatchIterator, DataPosition, load_mnist
    from jaxdiff.images import save_grid
    from jaxdiff.pipelines.class_conditioned import CHECKPOINTS, RUN_CONFIG, sample_grid
    from jaxdiff.training import (EMA, Checkpointer, create_train_state, diffusion_loss,
                                  make_train_step)

    parallel.initialize()
    if not args.no_compile_cache:
        enable_compilation_cache()
    out = Path(args.out).expanduser()
    main_process = parallel.is_main_process()
    ckpt_dir = out / CHECKPOINTS

    if args.resume:
        run = _resumed_run(args, out)
    elif (out / RUN_CONFIG).exists() or (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        raise JaxdiffError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")

    data = load_mnist(args.data_dir)
    if not args.resume:
        run = _new_run(args, data)
    opts = run.train
    model = run.build_model()
    _check_data(model, data)
    scheduler = run.training_scheduler()
    sampler = None if args.no_samples else run.sampler(args.sample_scheduler)
    guidance = args.guidance_scale if args.guidance_scale is not None else \
        (2.0 if model.null_label is not None else 1.0)
    if guidance != 1.0 and model.null_label is None and not args.no_samples:
        raise JaxdiffError("--guidance-scale needs a model trained with --cfg-dropout > 0")

    n_dev = parallel.device_count() * parallel.process_count()
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
                             null_label=model.null_label)
    ema_decay = float(opts["ema_decay"])
    train_step = make_train_step(loss_fn, tx, ema=EMA(decay=ema_decay) if ema_decay else None)

    seed = int(opts["seed"])
    key = jax.random.PRNGKey(seed)
    state = create_train_state(model.init_weights(key), tx, jax.random.fold_in(key, 1), ema=ema_decay > 0)
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=args.keep_checkpoints)
    position = DataPosition()
    if args.resume:
        found = checkpointer.restore_latest(state)
        if found is None:
            print(f"--resume: no checkpoint in {ckpt_dir} yet; starting the run from step 0",
                  file=sys.stderr)
        else:
            state, meta = found
            position = DataPosition.from_dict(meta["data"])
            print(f"resumed from step {int(state.step)} ({ckpt_dir})", file=sys.stderr)
    elif main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_CONFIG}.tmp"
        tmp.write_text(run.to_json())
        tmp.replace(out / RUN_CONFIG)

    start_step = int(state.step)
    batches = BatchIterator(data, batch_size, seed=seed, position=position,
                            process_index=parallel.process_index(), process_count=parallel.process_count())

    def save(state_r, position):
        if main_process:
            checkpointer.save(parallel.unreplicate(state_r), {"data": position.to_dict()})

    p_state = parallel.replicate(state)
    compile_seconds, t_train, losses, step = 0.0, 0.0, [], start_step
    if start_step >= total_steps:
        print(f"the run is already at step {start_step}; nothing to train (raise --steps)", file=sys.stderr)
    else:
        # Compile once, ahead of time, so the timing below is training only.
        first = parallel.shard(next(batches))
        t0 = time.perf_counter()
        step_fn = parallel.pmap(train_step).lower(p_state, first).compile()
        compile_seconds = time.perf_counter() - t0
        bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True,
                   disable=args.no_progress or not main_process, unit="step")
        with StopRequests() as stop:
            p_state, step, losses, t_train = _loop(
                step_fn, p_state, first, batches, start_step, total_steps, save, bar, stop, args,
                batch_size)
        bar.close()
        if main_process:
            checkpointer.wait()
        if stop.signum is not None:
            checkpointer.close()
            print(f"stopped at step {step}; checkpoint saved in {ckpt_dir}; continue with --resume",
                  file=sys.stderr)
            raise SystemExit(128 + stop.signum)
    checkpointer.close()

    steps_run = step - start_step
    summary = {
        "steps": steps_run,
        "global_step": step,
        "train_seconds": round(t_train, 3),
        "images_per_s": round(steps_run * batch_size / t_train, 2) if t_train > 0 else None,
        "final_loss": round(float(np.mean(losses[-FINAL_LOSS_WINDOW:])), 5) if losses else None,
        "compile_seconds": round(compile_seconds, 2),
        "devices": n_dev,
        "batch_size": batch_size,
    }
    if not args.no_samples and main_process:
        final = parallel.unreplicate(p_state)
        params = final.ema_params if final.ema_params is not None else final.params
        t0 = time.perf_counter()
        images, _ = sample_grid(model, params, sampler,
                                num_inference_steps=args.sample_steps, per_class=args.per_class,
                                guidance_scale=guidance, seed=seed)
        summary["sample_seconds"] = round(time.perf_counter() - t0, 2)
        summary["samples"] = str(save_grid(images, out / "samples.png", nrow=args.per_class,
                                           value_range="unit", scale=2))
    return summary


def _loop(step_fn, p_state, first_batch, batches, start_step, total_steps, save, bar, stop, args,
          batch_size):
    """Steps until `total_steps` or a stop request; checkpoints on the way. Returns (state, step,
    per-step losses, training seconds excluding checkpoint writes)."""
    import jax
    import numpy as np

    from jaxdiff import parallel

    losses: list[float] = []
    pending = None  # metrics of the step in flight: read after the next step is dispatched
    step, t_train, batch = start_step, 0.0, first_batch
    t_last = time.perf_counter()
    while step < total_steps:
        if step > start_step:
            batch = parallel.shard(next(batches))
        p_state, metrics = step_fn(p_state, batch)
        step += 1
        if pending is not None:
            losses.append(float(pending["loss"][0]))
        pending = metrics
        if step % args.log_every == 0 and losses:
            elapsed = t_train + time.perf_counter() - t_last
            bar.set_postfix(loss=f"{np.mean(losses[-args.log_every:]):.4f}",
                            img_s=f"{(step - start_step) * batch_size / max(elapsed, 1e-9):.1f}",
                            refresh=False)
        bar.update(1)
        if step % args.checkpoint_every == 0 or step == total_steps or stop.signum is not None:
            jax.block_until_ready(p_state)
            t_train += time.perf_counter() - t_last
            save(p_state, batches.position)
            t_last = time.perf_counter()
        if stop.signum is not None:
            break
    jax.block_until_ready(p_state)
    t_train += time.perf_counter() - t_last
    if pending is not None:
        losses.append(float(pending["loss"][0]))
    return p_state, step, losses, t_train


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    summary = train(args)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
