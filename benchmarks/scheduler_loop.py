"""Scheduler + loop overhead: jaxdiff's jitted `sample` scan vs diffusers' Python loop.

The denoiser is a cheap elementwise function, so the time is the sampler itself: the scheduler
arithmetic and the per-step cost of the loop (Python + torch dispatch for diffusers, nothing for
the compiled scan). Same shapes, same machine, same process.

    python benchmarks/scheduler_loop.py [--batch 80] [--size 32] [--repeats 3]
    python benchmarks/scheduler_loop.py --python-loop [--batch 4] [--size 8]

`--python-loop` times instead the loop a notebook writes: `scale_model_input` and `step` called
from plain Python, un-jitted, 50 steps (DDIM, PNDM, DPM-Solver++), after a first loop that
compiles them (jaxdiff compiles scheduler methods on first use). The bar: ≤ 2 s per loop at
(4, 8, 8, 3).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def python_loop_main(args):
    from jaxdiff.schedulers import create_scheduler

    shape = (args.batch, args.size, args.size, 3)
    x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    print(f"device: {jax.devices()[0].device_kind}, shape {shape}, plain Python loop, 50 steps")
    print(f"{'scheduler':10s} {'first loop s':>13s} {'next loops s':>13s}")
    for name, kwargs in (("ddim", {}), ("pndm", {"skip_prk_steps": True}), ("pndm", {}), ("dpm++", {})):
        sched = create_scheduler(name, **kwargs)
        key = jax.random.key(0)

        def loop():
            state = sched.set_timesteps(sched.create_state(), 50, shape=shape)
            x = jnp.asarray(x_np) * sched.init_noise_sigma(state)
            for i, t in enumerate(state.loop_timesteps):
                out = 0.9 * sched.scale_model_input(state, x, t)
                step = sched.step(state, out, t, x, key=jax.random.fold_in(key, i))
                x, state = step.prev_sample, step.state
            return x.block_until_ready()

        t0 = time.perf_counter()
        loop()
        first = time.perf_counter() - t0
        label = name + ("-prk" if name == "pndm" and not kwargs else "")
        print(f"{label:10s} {first:13.2f} {best_of(loop, args.repeats):13.3f}")


def main():
    import diffusers
    import torch

    from jaxdiff.sampling import sample
    from jaxdiff.schedulers import create_scheduler

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 80 (4 with --python-loop)")
    p.add_argument("--size", type=int, default=None, help="default 32 (8 with --python-loop)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--python-loop", action="store_true",
                   help="time un-jitted 50-step DDIM/PNDM/DPM++ loops (default shape 4x8x8x3)")
    args = p.parse_args()
    if args.python_loop:
        args.batch, args.size = args.batch or 4, args.size or 8
        return python_loop_main(args)
    args.batch, args.size = args.batch or 80, args.size or 32
    shape = (args.batch, args.size, args.size, 3)
    x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    print(f"device: {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}, shape {shape}")
    print(f"{'scheduler':10s} {'steps':>5s} {'diffusers s':>12s} {'jaxdiff s':>10s} {'speed-up':>9s}")

    for name, steps in (("ddpm", 1000), ("ddim", 50), ("pndm", 50), ("euler", 50), ("euler_a", 50),
                        ("dpm++", 25), ("lms", 50)):
        kwargs = {"skip_prk_steps": True} if name == "pndm" else {}
        sched = create_scheduler(name, **kwargs)
        ref = getattr(diffusers, sched.diffusers_class)(**kwargs)

        def torch_loop():
            ref.set_timesteps(steps)
            gen = torch.Generator().manual_seed(0)
            x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()) * ref.init_noise_sigma
            for t in ref.timesteps:
                out = 0.9 * ref.scale_model_input(x, t)
                kw = {"generator": gen} if name in ("ddpm", "euler_a") else {}
                x = ref.step(out, t, x, **kw).prev_sample
            return x

        state = sched.set_timesteps(sched.create_state(), steps)
        run = jax.jit(lambda x, key: sample(lambda x, t, c: 0.9 * x, sched, state, x, key))
        x = jnp.asarray(x_np)
        key = jax.random.key(0)
        run(x, key).block_until_ready()  # compile

        t_torch = best_of(torch_loop, args.repeats)
        t_jax = best_of(lambda: run(x, key).block_until_ready(), args.repeats)
        print(f"{name:10s} {steps:5d} {t_torch:12.4f} {t_jax:10.4f} {t_torch / t_jax:8.1f}x")


if __name__ == "__main__":
    main()
