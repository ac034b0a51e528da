"""Host memory of Stable Diffusion: loading an SD1.5-shaped UNet (860M parameters) saved by
diffusers in fp16, and one full-size float32 CFG UNet step on the CPU.

    python -m benchmarks.sd_memory [--dir /tmp/sd15-unet-fp16] [--skip-step]

1. diffusers builds `UNet2DConditionModel()` with SD 1.5's config (random weights) and saves it
   with `variant="fp16"` (1.7 GB), in a child process so torch's memory is not counted.
2. Fresh child processes load it with `jaxdiff.models.unet_2d_condition.load_unet_2d_condition` (as bf16 and
   as fp32, then moved to the device as `load_pipeline` does) and report the peak resident set
   size (`ru_maxrss`) above the process's RSS after imports, relative to the parameters' size.
   The issue's bar: ≤ ~1.5× the parameters' size.
3. A fresh child loads it as float32 and runs one classifier-free-guidance UNet step at 512²
   (latents (2, 64, 64, 4), 77 × 768 text context) on the CPU, jitted, and reports its peak RSS
   and time. The issue's bar: within 24 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SD15 = dict(sample_size=64, cross_attention_dim=768)  # the rest are diffusers' defaults = SD 1.5


def save(folder: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15).half().save_pretrained(folder, variant="fp16")


def measure(folder: Path, dtype: str) -> dict:
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition
    from jaxdiff.pipelines.stable_diffusion import _to_device

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    jnp.zeros(1).block_until_ready()
    base = rss()
    _, params = load_unet_2d_condition(folder, subfolder=None, variant="fp16", dtype=jnp.dtype(dtype))
    after_load = rss()
    params = _to_device(params)
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return dict(dtype=dtype, params=n, param_bytes=nbytes, base=base, after_load=after_load - base,
                peak_above_base=peak - base, ratio=(peak - base) / nbytes)


def unet_step(folder: Path) -> dict:
    import resource

    import jax
    import jax.numpy as jnp

    from jaxdiff.models.unet_2d_condition import load_unet_2d_condition
    from jaxdiff.pipelines.stable_diffusion import _to_device
    from jaxdiff.sampling import as_denoiser, cfg

    unet, params = load_unet_2d_condition(folder, subfolder=None, variant="fp16", dtype=jnp.float32)
    params = _to_device(params)

    @jax.jit
    def step(params, x, t, context, uncond):
        denoise = cfg(as_denoiser(unet, params), 7.5)
        return denoise(x, t, (context, uncond))

    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 77, 768))
    t0 = time.perf_counter()
    compiled = step.lower(params, x, 999, ctx, ctx).compile()
    t1 = time.perf_counter()
    out = compiled(params, x, 999, ctx, ctx).block_until_ready()
    t2 = time.perf_counter()
    compiled(params, x, 500, ctx, ctx).block_until_ready()
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak=peak, compile_s=t1 - t0, first_s=t2 - t1, second_s=t3 - t2,
                finite=bool(jnp.isfinite(out).all()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/sd15-unet-fp16")
    p.add_argument("--child", choices=("save", "bfloat16", "float32", "step"))
    p.add_argument("--skip-step", action="store_true", help="only measure loading")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if args.child == "save":
        return save(folder)
    if args.child == "step":
        print(json.dumps(unet_step(folder)))
        return
    if args.child:
        print(json.dumps(measure(folder, args.child)))
        return
    if not (folder / "diffusion_pytorch_model.fp16.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.sd_memory", "--dir", str(folder),
                        "--child", "save"], check=True)
    size = (folder / "diffusion_pytorch_model.fp16.safetensors").stat().st_size
    print(f"file: {folder}/diffusion_pytorch_model.fp16.safetensors, {size / 2**30:.2f} GiB")
    for dtype in ("bfloat16", "float32"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.sd_memory", "--dir", str(folder),
                              "--child", dtype], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{dtype:>8}: {r['params'] / 1e6:.0f}M params = {r['param_bytes'] / 2**30:.2f} GiB; "
              f"peak RSS above the post-import baseline {r['peak_above_base'] / 2**30:.2f} GiB "
              f"= {r['ratio']:.2f}× the parameters (RSS after loading: {r['after_load'] / 2**30:.2f} GiB)")
    if args.skip_step:
        return
    out = subprocess.run([sys.executable, "-m", "benchmarks.sd_memory", "--dir", str(folder),
                          "--child", "step"], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"float32 CFG UNet step at 512² on the CPU ({os.cpu_count()} cores): peak RSS "
          f"{r['peak'] / 2**30:.2f} GiB (whole process); compile {r['compile_s']:.0f} s, first step "
          f"{r['first_s']:.1f} s, second {r['second_s']:.1f} s; output finite: {r['finite']}")


if __name__ == "__main__":
    main()
