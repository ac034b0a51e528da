"""The class-conditioned MNIST model: jaxdiff vs the course's PyTorch code on the same machine.

For the course's model (diffusers UNet2DModel 32/64/64 with the label embedding), batch 128:

* training images/s: jaxdiff's pmapped, jitted `train_step` (compilation excluded) vs the
  course's loop (add_noise, forward, MSE, backward, Adam step);
* sampling 80 digits (8 per class) with the course's 1000-step DDPM: jaxdiff's single `lax.scan`
  vs the course's Python loop over `DDPMScheduler.step`;
* time to a grid: jaxdiff's DDIM (`--fast-steps`, default 40) and DPM-Solver++ (20) against the
  course's 1000-step DDPM loop.

The contenders alternate round by round; each number is the best of `--rounds`. The 1000-step
loops are timed over `--sample-steps` steps (default 50) and scaled to 1000 unless `--full`.
Printed as a table with ratios (> 1: jaxdiff is faster). `--run RUN` (a train.mnist run) also
samples 100 digits from the trained model with each sampler and reports the share the digit
classifier reads as the requested digit: the quality side of time-to-a-good-grid.

    python benchmarks/mnist.py                            # CPU: course model, batch 128
    python benchmarks/mnist.py --preset small             # jaxdiff's CPU default model (no torch twin)
    python benchmarks/mnist.py --xla-flags=--xla_cpu_use_onednn=true
    python benchmarks/mnist.py --run runs/mnist --no-torch   # quality per sampler
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="course", help="train.mnist model preset (torch twin only for course)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per round")
    p.add_argument("--sample-steps", type=int, default=50,
                   help="steps timed of each 1000-step loop (scaled to 1000)")
    p.add_argument("--full", action="store_true", help="time the full 1000-step loops")
    p.add_argument("--fast-steps", type=int, default=40, help="DDIM steps (DPM-Solver++: half)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--run", default=None, help="a train.mnist run folder: also measure sample quality")
    p.add_argument("--xla-flags", default=None, help="extra XLA_FLAGS for this run (e.g. oneDNN)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="also print the raw numbers as one JSON line")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The course's PyTorch code
# ------------------------------------------------------------------------------------------------

def torch_course(batch: int):
    import torch
    from diffusers import DDPMScheduler

    from jaxdiff.testing.reference import course_class_conditioned_unet

    torch.manual_seed(0)
    net = course_class_conditioned_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch,))

    def train(steps):
        for _ in range(steps):
            noise = torch.randn_like(x)
            timesteps = torch.randint(0, 999, (x.shape[0],)).long()
            noisy_x = scheduler.add_noise(x, noise, timesteps)
            loss = loss_fn(net(noisy_x, timesteps, y), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss)

    def sample(steps):
        """The course's sampling loop for 80 digits, over the first `steps` of the 1000."""
        xs = torch.randn(80, 1, 28, 28)
        ys = torch.tensor([[i] * 8 for i in range(10)]).flatten()
        scheduler.set_timesteps(1000)
        for t in scheduler.timesteps[:steps]:
            with torch.no_grad():
                residual = net(xs, t, ys)
            xs = scheduler.step(residual, t, xs).prev_sample
        return xs

    return train, sample


# ------------------------------------------------------------------------------------------------
# jaxdiff
# ------------------------------------------------------------------------------------------------

def jax_course(preset: str, batch: int):
    import jax
    import numpy as np
    import optax

    from jaxdiff import parallel
    from jaxdiff.models.class_conditioned import ClassConditionedUnet
    from jaxdiff.sampling import as_apply_fn
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training import create_train_state, diffusion_loss, make_train_step
    from jaxdiff.training.configs import MNIST_PRESETS as PRESETS

    model = ClassConditionedUnet.create(**PRESETS[preset])
    params = model.init_weights(jax.random.PRNGKey(0))
    sched = create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")
    tx = optax.adam(1e-3)
    loss_fn = diffusion_loss(as_apply_fn(model), sched, sched.create_state())
    rng = np.random.default_rng(0)
    b = parallel.shard({"images": rng.integers(0, 256, (batch, 28, 28, 1)).astype(np.uint8),
                        "labels": rng.integers(0, 10, (batch,)).astype(np.int32)})
    holder = {"state": parallel.replicate(create_train_state(params, tx, jax.random.PRNGKey(1)))}
    t0 = time.perf_counter()
    step = parallel.pmap(make_train_step(loss_fn, tx)).lower(holder["state"], b).compile()
    compile_s = time.perf_counter() - t0

    def train(steps):
        state = holder["state"]
        for _ in range(steps):
            state, metrics = step(state, b)
        jax.block_until_ready(state)
        holder["state"] = state
        return float(metrics["loss"][0])

    return model, params, train, compile_s


def jax_sampler(model, scheduler_name: str, steps: int, scheduler_config: dict | None = None):
    """A compiled 80-digit sampler; returns (fn() -> images, compile seconds)."""
    import jax

    from jaxdiff.pipelines.class_conditioned import class_labels, make_generator
    from jaxdiff.schedulers import create_scheduler

    config = scheduler_config or {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}
    sched = create_scheduler(config, name=scheduler_name)
    generate = make_generator(model, sched, steps)
    labels = class_labels(10, 8)
    key = jax.random.PRNGKey(0)
    return generate, labels, key


def _time(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    use_torch = not args.no_torch and args.preset == "course"
    n1000 = 1000 if args.full else args.sample_steps
    scale = 1000 / n1000

    model, params, jax_train, jax_compile = jax_course(args.preset, args.batch)
    jax_train(1)
    ddpm_gen, labels, key = jax_sampler(model, "ddpm", n1000)
    ddim_gen, _, _ = jax_sampler(model, "ddim", args.fast_steps)
    dpm_gen, _, _ = jax_sampler(model, "dpm++", max(1, args.fast_steps // 2))
    compiled = {}
    for name, gen in (("ddpm", ddpm_gen), ("ddim", ddim_gen), ("dpm++", dpm_gen)):
        t0 = time.perf_counter()
        compiled[name] = gen.lower(params, labels, key).compile()
        compiled[name + "_compile_s"] = time.perf_counter() - t0
    run_sample = {k: (lambda c=compiled[k]: jax.block_until_ready(c(params, labels, key)))
                  for k in ("ddpm", "ddim", "dpm++")}
    for f in run_sample.values():
        f()
    if use_torch:
        torch_train, torch_sample = torch_course(args.batch)
        torch_train(1)
        torch_sample(2)

    best = {}

    def record(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)

    for _ in range(args.rounds):
        record("jax_train_s", _time(jax_train, args.train_steps) / args.train_steps)
        if use_torch:
            record("torch_train_s", _time(torch_train, args.train_steps) / args.train_steps)
        record("jax_ddpm1000_s", _time(run_sample["ddpm"]) * scale)
        if use_torch:
            record("torch_ddpm1000_s", _time(torch_sample, n1000) * scale)
        record("jax_ddim_s", _time(run_sample["ddim"]))
        record("jax_dpm_s", _time(run_sample["dpm++"]))

    r = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
         "preset": args.preset, "batch": args.batch, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "jax_train_images_per_s": args.batch / best["jax_train_s"],
         "jax_train_compile_s": jax_compile, "jax_ddpm1000_s": best["jax_ddpm1000_s"],
         f"jax_ddim{args.fast_steps}_s": best["jax_ddim_s"],
         f"jax_dpm++{max(1, args.fast_steps // 2)}_s": best["jax_dpm_s"],
         "ddpm1000_extrapolated_from": n1000}
    print(f"{r['platform']} ({r['device']}), preset {args.preset}, batch {args.batch}"
          + (f", XLA_FLAGS={r['xla_flags']}" if r["xla_flags"] else ""))
    print(f"  train: jaxdiff {r['jax_train_images_per_s']:.1f} images/s (compile {jax_compile:.1f} s)", end="")
    if use_torch:
        r["torch_train_images_per_s"] = args.batch / best["torch_train_s"]
        r["train_speed_ratio"] = r["jax_train_images_per_s"] / r["torch_train_images_per_s"]
        print(f" | PyTorch {r['torch_train_images_per_s']:.1f} images/s | ratio {r['train_speed_ratio']:.2f}x")
    else:
        print()
    ext = "" if args.full else f" (timed {n1000} steps, x{scale:g})"
    print(f"  80 digits, DDPM 1000 steps{ext}: jaxdiff {r['jax_ddpm1000_s']:.1f} s", end="")
    if use_torch:
        r["torch_ddpm1000_s"] = best["torch_ddpm1000_s"]
        r["ddpm1000_speed_ratio"] = r["torch_ddpm1000_s"] / r["jax_ddpm1000_s"]
        print(f" | PyTorch {r['torch_ddpm1000_s']:.1f} s | ratio {r['ddpm1000_speed_ratio']:.2f}x")
    else:
        print()
    reference = r.get("torch_ddpm1000_s", r["jax_ddpm1000_s"])
    who = "PyTorch" if use_torch else "jaxdiff"
    for name, key_ in ((f"DDIM {args.fast_steps}", "jax_ddim_s"),
                       (f"DPM-Solver++ {max(1, args.fast_steps // 2)}", "jax_dpm_s")):
        print(f"  80 digits, jaxdiff {name} steps: {best[key_]:.2f} s | {reference / best[key_]:.1f}x faster "
              f"than {who}'s 1000-step DDPM")
    r["time_to_grid_ratio_ddim"] = reference / best["jax_ddim_s"]
    r["time_to_grid_ratio_dpm"] = reference / best["jax_dpm_s"]

    if args.run:
        r["quality"] = quality(args.run, args.fast_steps)
        for name, q in r["quality"].items():
            print(f"  {args.run}: {name}: {q['accuracy']:.0%} of 100 digits read as requested "
                  f"({q['seconds']:.1f} s for 100)")
    if args.json:
        print(json.dumps(r))
    return r


def quality(run_dir: str, fast_steps: int) -> dict:
    """Class accuracy of 100 samples (10 per digit) of a trained run, per sampler."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.data.mnist import load_mnist
    from jaxdiff.eval.digit_classifier import accuracy, load_or_train
    from jaxdiff.pipelines.class_conditioned import class_labels, default_guidance, load_run, make_generator

    model, params, run = load_run(run_dir)
    classifier, _ = load_or_train(load_mnist(None, use_hf=False, verbose=False))
    labels = class_labels(model.num_classes, 10)
    guidance = default_guidance(model)
    out = {}
    for name, steps in (("ddpm", 1000), ("ddim", fast_steps), ("dpm++", max(1, fast_steps // 2))):
        gen = make_generator(model, run.sampler(name), steps, use_cfg=guidance != 1.0)
        args = (params, labels, jax.random.PRNGKey(0), jnp.float32(guidance))
        fn = gen.lower(*args).compile()
        t0 = time.perf_counter()
        images = np.asarray(jax.block_until_ready(fn(*args)))
        out[f"{name}-{steps} (w={guidance:g})"] = {"accuracy": accuracy(classifier, images, labels),
                                                   "seconds": time.perf_counter() - t0}
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
