"""LoRA on an SD 1.5-shaped UNet (random weights, the real shapes; nothing is downloaded).

    python -m benchmarks.lora [--skip-fuse] [--skip-memory] [--rank 8] [--resolution 512]

1. Fuse: a rank-8 adapter on every attention projection, feed-forward and transformer
   projection of the UNet (what kohya's default LoRA trains) fused into float32 params with
   `jaxdiff.adapters.fuse`, then `unfuse`; wall time of each (best of 3). The issue's bar: fusing
   ≤ 2 s on the CPU.
2. Memory: one training step at `--resolution`² (cached latents, batch 1, bf16 params and compute),
   compiled for the CPU with `jax.jit(train_step, donate_argnums=0).lower(...).compile()` and read
   with `memory_analysis()` (arguments + outputs + temporaries − donated aliases), for full
   fine-tuning (AdamW on every UNet parameter) and for LoRA rank `--rank` on to_q/to_k/to_v/to_out.0
   (AdamW on the adapters; the base params frozen in bf16). Full fine-tuning is compiled twice:
   with params and AdamW state in bf16, and with float32 master params and AdamW state (what
   train.text_to_image --mixed-precision bf16 does). Nothing is allocated: only shapes are
   compiled. The issue's bar: LoRA ≤ 0.5× full fine-tuning.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.single_file import CONFIGS


def sd15_pipeline(dtype=jnp.bfloat16):
    """An SD 1.5-shaped StableDiffusion (modules from the shipped configs, no weights)."""
    from jaxdiff import weights as W
    from jaxdiff.models import autoencoder_kl as vae_lib
    from jaxdiff.models import clip as clip_lib
    from jaxdiff.models import unet_2d_condition as unet_lib
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from jaxdiff.schedulers import create_scheduler

    folder = CONFIGS / "sd-v1"
    unet = unet_lib.UNet2DConditionModel(
        unet_lib.UNet2DConditionConfig.from_dict(W.read_json(folder / "unet" / "config.json")), dtype=dtype)
    vae = vae_lib.AutoencoderKL(vae_lib.AutoencoderKLConfig.from_dict(W.read_json(folder / "vae" / "config.json")))
    te = clip_lib.build_model("CLIPTextModel", clip_lib.CLIPTextConfig.from_dict(
        W.read_json(folder / "text_encoder" / "config.json")))
    return StableDiffusion(unet, vae, te, None, create_scheduler(folder / "scheduler"), folder)


def kohya_like_adapter(shapes, rank: int, seed: int = 0) -> dict:
    """A random rank-`rank` adapter on every kernel inside the transformer blocks (attention
    q/k/v/out, feed-forward, proj_in/proj_out), in `load_lora`'s format."""
    from jaxdiff import weights as W

    rng = np.random.default_rng(seed)
    layers = {}
    for path, s in W.flatten(shapes).items():
        if path[-1] == "kernel" and any(p.startswith("attentions_") for p in path):
            a = rng.standard_normal(tuple(s.shape[:-1]) + (rank,), dtype=np.float32) * 0.01
            b = rng.standard_normal((rank, s.shape[-1]), dtype=np.float32) * 0.01
            layers["/".join(path)] = {"a": a, "b": b, "scale": np.float32(1.0)}
    return {"unet": layers}


def bench_fuse(rank: int) -> None:
    from jaxdiff import weights as W
    from jaxdiff.adapters import fuse, unfuse
    from jaxdiff.models.unet_2d_condition import param_shapes

    pipe = sd15_pipeline(jnp.float32)
    shapes = param_shapes(pipe.unet)
    rng = np.random.default_rng(0)
    flat = {p: jax.device_put(rng.standard_normal(s.shape, dtype=np.float32) * 0.02)
            for p, s in W.flatten(shapes).items()}
    params = {"unet": W.unflatten(flat)}
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    adapter = kohya_like_adapter(shapes, rank)
    layers = adapter["unet"]
    n_lora = sum(v["a"].size + v["b"].size for v in layers.values())
    fuse_s, unfuse_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        fused, originals = fuse(params, adapter, 0.8)
        jax.block_until_ready(fused)
        fuse_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = unfuse(fused, originals)
        jax.block_until_ready(back)
        unfuse_s.append(time.perf_counter() - t0)
        del fused, originals, back
    print(f"fuse: UNet {n / 1e6:.0f}M params (float32), adapter rank {rank} on {len(layers)} kernels "
          f"({n_lora / 1e6:.1f}M params): fuse {min(fuse_s):.2f} s (first, with the per-shape compiles: "
          f"{fuse_s[0]:.2f} s), unfuse {min(unfuse_s) * 1e3:.1f} ms (best of 3; bar: fuse <= 2 s)")


def _memory(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def bench_memory(rank: int, resolution: int, runs=("full-bf16", "full-fp32", "lora")) -> None:
    import optax

    from jaxdiff.adapters.training import DEFAULT_TARGETS, init_lora, lora_loss
    from jaxdiff.models.unet_2d_condition import param_shapes
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.state import create_train_state, make_train_step
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss

    pipe = sd15_pipeline(jnp.bfloat16)
    sched = create_scheduler(CONFIGS / "sd-v1" / "scheduler", name="ddpm")
    unet_loss = text_to_image_loss(pipe, sched, LossConfig(), axis_name=None)
    h = resolution // 8
    batch = {"moments": jax.ShapeDtypeStruct((1, h, h, 8), jnp.bfloat16),
             "context": jax.ShapeDtypeStruct((1, 77, 768), jnp.bfloat16)}
    tx = optax.adamw(1e-4)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    gib = 2 ** 30
    print(f"memory: SD 1.5-shaped UNet training step, {resolution}² (latents {h}×{h}), batch 1, bf16 compute, "
          f"AdamW (compiled for {jax.devices()[0].platform}, memory_analysis: arguments + outputs + "
          "temporaries - donated)", flush=True)
    results = {}
    for run in runs:
        t0 = time.perf_counter()
        if run.startswith("full"):
            pdt = jnp.bfloat16 if run == "full-bf16" else jnp.float32
            shapes = param_shapes(pipe.unet, pdt)
            state = jax.eval_shape(lambda p, r: create_train_state(p, tx, r), shapes, rng)
            step = jax.jit(make_train_step(unet_loss, tx, axis_name=None), donate_argnums=0)
            results[run] = _memory(step.lower(state, batch).compile())
            what = ("full fine-tuning, params and AdamW state in bf16" if run == "full-bf16" else
                    "full fine-tuning, float32 master params and AdamW state (train.text_to_image "
                    "--mixed-precision bf16)")
        else:
            shapes = param_shapes(pipe.unet, jnp.bfloat16)
            lora = jax.eval_shape(lambda k, s=shapes: init_lora(s, rank, DEFAULT_TARGETS, k), jax.random.key(0))
            state = jax.eval_shape(lambda p, r: create_train_state(p, tx, r), lora, rng)
            step = jax.jit(make_train_step(lora_loss(unet_loss, 1.0), tx, axis_name=None), donate_argnums=0)
            results[run] = _memory(step.lower(state, {**batch, "encoders": {"unet": shapes}}).compile())
            n_lora = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(lora))
            what = (f"LoRA rank {rank} ({n_lora / 1e6:.2f}M float32 trainable params on "
                    f"{', '.join(DEFAULT_TARGETS)}), frozen base in bf16")
        print(f"  {run}: {results[run] / gib:.2f} GiB — {what} (compile {time.perf_counter() - t0:.0f} s)",
              flush=True)
    if "lora" in results:
        for run in ("full-bf16", "full-fp32"):
            if run in results:
                print(f"  ratio lora / {run}: {results['lora'] / results[run]:.2f} (bar: <= 0.5)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--skip-fuse", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-runs", default="full-bf16,full-fp32,lora",
                   help="which training steps to compile (comma-separated; each takes minutes on a CPU)")
    args = p.parse_args(argv)
    if not args.skip_fuse:
        bench_fuse(args.rank)
    if not args.skip_memory:
        bench_memory(args.rank, args.resolution, tuple(args.memory_runs.split(",")))


if __name__ == "__main__":
    main()
