"""Cost of loss guidance: guided vs unguided sampling steps, and jaxdiff's loop vs the course's.

Same random UNet2DModel in both frameworks (diffusers builds it and `save_pretrained`s it,
jaxdiff loads the folder), DDIM with clip_sample as in the course, the course's colour loss at
scale 40. For each of: no guidance, the shortcut variant, the gradient through the UNet, it times
the whole `--steps`-step loop

* in jaxdiff: one jitted `lax.scan` (`jaxdiff.guidance.guided_sample`), compile excluded;
* in PyTorch: the course's Python loop (diffusers UNet2DModel + DDIMScheduler, autograd),

alternating the contenders round by round, and prints

* guided step cost / unguided step cost within jaxdiff (the issue's bars: shortcut ≤ 1.2×,
  through the UNet ≤ 3.5×), and the same ratios for PyTorch;
* speed vs PyTorch = t_torch / t_jax for each loop (> 1: jaxdiff is faster).

`--clip` adds a CLIP-guided loop (jaxdiff only: the course's torchvision transforms are not
available here) with a random ViT-B/32-shaped CLIP and 4 cutouts.

    python benchmarks/guidance.py                       # CPU, "small" 64×64 UNet, batch 4, 10 steps
    python benchmarks/guidance.py --preset course --batch 8 --steps 40     # the course's 256×256 UNet
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

PRESETS = {
    # the course's architecture scaled to 64×64 for a 2-core CPU: single-head attention at 16×16
    "small": dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                  block_out_channels=(64, 128, 128, 256), norm_num_groups=32,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                  attention_head_dim=None),
    # google/ddpm-bedroom-256, the architecture of the course's wikiart model
    "course": dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                   block_out_channels=(128, 128, 256, 256, 512, 512), norm_num_groups=32,
                   down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                   attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                   norm_eps=1e-6),
}
TARGET = (0.1, 0.9, 0.5)
SCALE = 40.0
LOOPS = ("unguided", "shortcut", "through_model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="timed repetitions of each loop")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch loops")
    p.add_argument("--clip", action="store_true", help="also time a CLIP-guided loop (jaxdiff only)")
    p.add_argument("--json", action="store_true", help="print the raw times as one JSON line too")
    return p.parse_args(argv)


def build(preset: str):
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from jaxdiff.models.unet_2d import load_unet_2d
    from jaxdiff.schedulers import create_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(**PRESETS[preset]).eval()
    scheduler = DDIMScheduler(clip_sample=True)
    with tempfile.TemporaryDirectory() as folder:
        unet.save_pretrained(folder)
        scheduler.save_pretrained(folder)
        module, params = load_unet_2d(folder)
        sched = create_scheduler(folder)
    return unet, scheduler, module, params, sched


def jax_loops(module, params, sched, steps, x_T, clip: bool):
    import jax
    import jax.numpy as jnp

    from jaxdiff import guidance as G
    from jaxdiff.sampling import as_denoiser, sample

    state = sched.set_timesteps(sched.create_state(), steps)
    schedule = G.guidance_schedule("constant", state.alphas_cumprod)
    target = jnp.asarray(TARGET)

    def run(params, x, key, scale, schedule, variant, loss_args=None):
        denoise = as_denoiser(module, params)
        if variant == "unguided":
            return sample(denoise, sched, state, x, key)
        if variant == "clip":
            clip_module, clip_params, text = loss_args
            feats = lambda im: clip_module.apply({"params": clip_params}, im,  # noqa: E731
                                                 method=clip_module.get_image_features)
            loss = G.make_clip_loss(feats, text, n_cuts=4, size=224)
            variant = "shortcut"
        else:
            loss = G.make_color_loss(target)
        return G.guided_sample(denoise, sched, state, x, key, loss=loss, guidance_scale=scale,
                               schedule=schedule, variant=variant)

    fn = jax.jit(run, static_argnames="variant")
    key = jax.random.key(0)
    x = jnp.asarray(x_T)
    loops, compile_s = {}, {}
    variants = list(LOOPS) + (["clip"] if clip else [])
    for variant in variants:
        loss_args = None
        if variant == "clip":
            from jaxdiff.models.clip import CLIPConfig, CLIPModel, init_params

            clip_module = CLIPModel(CLIPConfig())  # ViT-B/32 shapes
            loss_args = (clip_module, init_params(clip_module, jax.random.key(1)),
                         jax.random.normal(jax.random.key(2), (1, 512)))
        t0 = time.perf_counter()
        if variant == "clip":
            compiled = jax.jit(lambda p, x, k, s, w, cp, te: run(p, x, k, s, w, "clip", (loss_args[0], cp, te))
                               ).lower(params, x, key, SCALE, schedule, loss_args[1], loss_args[2]).compile()
            loops["jax " + variant] = (lambda c=compiled, a=loss_args:
                                       c(params, x, key, SCALE, schedule, a[1], a[2]).block_until_ready())
        else:
            compiled = fn.lower(params, x, key, SCALE, schedule, variant).compile()
            loops["jax " + variant] = (lambda c=compiled:
                                       c(params, x, key, SCALE, schedule).block_until_ready())
        compile_s[variant] = time.perf_counter() - t0
    return loops, compile_s


def torch_loops(unet, scheduler, steps, x_T):
    """The course's loops (unit 2, "Guidance"): `jaxdiff.reference.course_color_guided_loop`."""
    import torch

    from jaxdiff.testing.reference import course_color_guided_loop

    x_start = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())

    def loop(variant):
        return lambda: course_color_guided_loop(unet, scheduler, x_start, steps, variant=variant, scale=SCALE,
                                                target_color=TARGET)

    return {"torch unguided": loop(None), "torch shortcut": loop("shortcut"),
            "torch through_model": loop("through_model")}


def interleaved(fns: dict, rounds: int, pause: float = 1.0) -> dict[str, list[float]]:
    """Alternate the contenders round by round. `pause` seconds between runs let the other
    framework's worker threads (XLA's and torch's pools spin for a while after work) go idle:
    on a 2-core machine they otherwise slow down whoever runs next several-fold."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    unet, scheduler, module, params, sched = build(args.preset)
    size = PRESETS[args.preset]["sample_size"]
    x_T = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), np.float32)
    fns, compile_s = jax_loops(module, params, sched, args.steps, x_T, args.clip)
    if not args.no_torch:
        fns = {**torch_loops(unet, scheduler, args.steps, x_T), **fns}
    times = interleaved(fns, args.rounds)
    # best of the rounds: on a shared machine the median mostly measures the neighbours
    # (oversubscribed OpenMP barriers can slow torch down 10x)
    best = {k: min(v) for k, v in times.items()}

    print(f"\n== loss guidance, {args.preset} UNet2DModel {size}×{size}, batch {args.batch}, "
          f"{args.steps} DDIM steps, jax on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f} ==")
    for k, ts in times.items():
        variant = k.split(" ", 1)[1]
        line = (f"  {k:22s} best {best[k] * 1e3:9.1f} ms ({best[k] / args.steps * 1e3:7.1f} ms/step)"
                f"  median {statistics.median(ts) * 1e3:9.1f} ms")
        if k.startswith("jax"):
            line += f"  compile {compile_s[variant]:5.1f} s"
        print(line)
    print("  step cost relative to the unguided step, best times (bars: shortcut ≤ 1.2×, through the UNet ≤ 3.5×):")
    for side in ("jax", "torch"):
        if f"{side} unguided" not in best:
            continue
        ratios = "  ".join(f"{v} {best[f'{side} {v}'] / best[f'{side} unguided']:5.2f}×"
                           for v in LOOPS[1:] + (("clip",) if args.clip and side == "jax" else ())
                           if f"{side} {v}" in best)
        print(f"    {side:6s} {ratios}")
    if not args.no_torch:
        print("  speed vs the course's PyTorch loop, best times (t_torch / t_jax; > 1: jaxdiff is faster):")
        print("    " + "  ".join(f"{v} {best[f'torch {v}'] / best[f'jax {v}']:5.2f}×" for v in LOOPS))
    if args.json:
        print(json.dumps({"args": vars(args), "times": times, "compile_s": compile_s}))


if __name__ == "__main__":
    main()
