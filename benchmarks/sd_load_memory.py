"""Peak host memory of loading an SD1.5-shaped UNet (860M parameters) saved by diffusers in fp16.

    python -m benchmarks.sd_load_memory [--dir /tmp/sd15-unet-fp16]

1. diffusers builds `UNet2DConditionModel()` with SD 1.5's config (random weights) and saves it
   with `variant="fp16"` (1.7 GB), in a child process so torch's memory is not counted.
2. Fresh child processes load it with `jaxdiff.models.unet_2d_condition.load_unet` (as bf16 and
   as fp32, then moved to the device as `load_pipeline` does) and report the peak resident set
   size (`ru_maxrss`) above the process's RSS after imports, relative to the parameters' size.
The issue's bar: ≤ ~1.5× the parameters' size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
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

    from jaxdiff.models.unet_2d_condition import load_unet
    from jaxdiff.pipelines.stable_diffusion import _to_device

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    jnp.zeros(1).block_until_ready()
    base = rss()
    _, params = load_unet(folder, subfolder=None, variant="fp16", dtype=jnp.dtype(dtype))
    after_load = rss()
    params = _to_device(params)
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return dict(dtype=dtype, params=n, param_bytes=nbytes, base=base, after_load=after_load - base,
                peak_above_base=peak - base, ratio=(peak - base) / nbytes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/sd15-unet-fp16")
    p.add_argument("--child", choices=("save", "bfloat16", "float32"))
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if args.child == "save":
        return save(folder)
    if args.child:
        print(json.dumps(measure(folder, args.child)))
        return
    if not (folder / "diffusion_pytorch_model.fp16.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.sd_load_memory", "--dir", str(folder),
                        "--child", "save"], check=True)
    size = (folder / "diffusion_pytorch_model.fp16.safetensors").stat().st_size
    print(f"file: {folder}/diffusion_pytorch_model.fp16.safetensors, {size / 2**30:.2f} GiB")
    for dtype in ("bfloat16", "float32"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.sd_load_memory", "--dir", str(folder),
                              "--child", dtype], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{dtype:>8}: {r['params'] / 1e6:.0f}M params = {r['param_bytes'] / 2**30:.2f} GiB; "
              f"peak RSS above the post-import baseline {r['peak_above_base'] / 2**30:.2f} GiB "
              f"= {r['ratio']:.2f}× the parameters (RSS after loading: {r['after_load'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
