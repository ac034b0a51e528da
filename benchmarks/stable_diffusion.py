"""Stable Diffusion speed: jaxdiff (bf16, one compiled program) next to diffusers' PyTorch pipeline.

    python -m benchmarks.stable_diffusion --device gpu            # SD 1.5 shapes, 512², batch 1 and 8
    python -m benchmarks.stable_diffusion --device cpu --reduced  # a small model that runs on a laptop CPU

Random weights with SD 1.5's shapes (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M),
PNDM (SD's default scheduler), classifier-free guidance. Printed, for each batch size:

* ms per CFG UNet step: one UNet call on the 2B-batch (uncond ‖ cond); jaxdiff's is measured
  inside a jitted `fori_loop` of steps, as the sampler runs it;
* end to end: text encoder + `--steps` steps + VAE decode (jaxdiff: `generate`, one program;
  diffusers: `StableDiffusionPipeline(prompt_embeds=...)` after its text encoder);
* compile: a fresh process tracing, lowering and compiling `generate` (cold), and again with the
  persistent compilation cache filled by a previous process.

PyTorch runs in fp16 on a GPU and in fp32 on a CPU (its usual precisions), in the same run, on
the same machine. `--skip-torch` leaves it out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# diffusers' configs of SD 1.5 (runwayml/stable-diffusion-v1-5) — and a small variant for CPUs
SD15 = {
    "unet": dict(sample_size=64, cross_attention_dim=768),  # other keys: diffusers' defaults = SD 1.5
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512),
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
}
REDUCED = {
    "unet": dict(sample_size=16, cross_attention_dim=128, block_out_channels=(64, 128, 128, 128),
                 layers_per_block=1, attention_head_dim=4),
    "vae": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=128),
    "text": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=998, eos_token_id=999, pad_token_id=999),
}
PNDM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            skip_prk_steps=True, set_alpha_to_one=False)


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# jaxdiff
# --------------------------------------------------------------------------------------------

def jax_pipeline(configs: dict, dtype_name: str, shapes_only: bool = False):
    """(pipe, params) with random weights; params as ShapeDtypeStructs when `shapes_only`."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import autoencoder_kl as V
    from jaxdiff.models import clip as C
    from jaxdiff.models import unet_2d_condition as U
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from jaxdiff.schedulers import create_scheduler

    dtype = jnp.dtype(dtype_name)
    unet = U.UNet2DConditionModel(U.UNet2DConditionConfig.from_dict(configs["unet"]), dtype=dtype)
    vae_config = V.AutoencoderKLConfig.from_dict(configs["vae"])
    vae = V.AutoencoderKL(vae_config, dtype=V.decode_dtype(vae_config, dtype))
    text = C.CLIPTextModel(C.CLIPTextConfig.from_dict(configs["text"]), jnp.float32)
    pipe = StableDiffusion(unet, vae, text, None, create_scheduler("pndm", **PNDM))
    if shapes_only:
        params = {"unet": U.param_shapes(unet, dtype), "vae": V.param_shapes(vae, vae.dtype),
                  "text_encoder": C.param_shapes(text)}
    else:
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        params = {"unet": U.init_params(unet, k1, dtype), "vae": V.init_params(vae, k2, vae.dtype),
                  "text_encoder": C.init_params(text, k3)}
    return pipe, params


def jax_unet_step_ms(pipe, params, batch: int, size: int, repeats: int, loop: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    from jaxdiff.sampling import as_denoiser, cfg

    h = size // pipe.vae_scale_factor
    x = jnp.zeros((batch, h, h, pipe.latent_channels), jnp.float32) + 0.1
    ctx = jnp.zeros((batch, pipe.max_length, pipe.text_encoder.config.hidden_size), jnp.float32) + 0.01

    @jax.jit
    def steps(p, x, ctx):
        denoise = cfg(as_denoiser(pipe.unet, p), 7.5)

        def body(i, x):
            return x + 1e-3 * denoise(x, 999 - i * 20, (ctx, ctx))
        return jax.lax.fori_loop(0, loop, body, x)

    return 1e3 * median_time(lambda: steps(params["unet"], x, ctx).block_until_ready(), repeats) / loop


def jax_end_to_end(pipe, params, batch: int, size: int, steps: int, repeats: int) -> float:
    import jax
    import numpy as np

    from jaxdiff.pipelines import stable_diffusion as sd

    config = sd.GenerateConfig(num_inference_steps=steps, height=size, width=size)
    fn = sd.compile_generate(pipe, params, batch, config=config)
    ids = np.random.default_rng(0).integers(0, pipe.text_encoder.config.vocab_size, (batch, 77)).astype(np.int32)
    key = jax.random.key(0)
    return median_time(lambda: fn(params, ids, ids, key, 7.5).block_until_ready(), repeats)


def child_compile(args) -> None:
    """In a fresh process: seconds to trace+lower and to compile `generate` (cache as asked)."""
    import jax

    if args.cache_dir:
        from jaxdiff.compile_cache import enable_compilation_cache
        enable_compilation_cache(args.cache_dir, min_compile_seconds=0.0)
    from jaxdiff.pipelines import stable_diffusion as sd

    configs = REDUCED if args.reduced else SD15
    pipe, shapes = jax_pipeline(configs, args.dtype, shapes_only=True)
    config = sd.GenerateConfig(num_inference_steps=args.steps, height=args.size, width=args.size)
    ids = jax.ShapeDtypeStruct((args.compile_batch, 77), "int32")
    scalar = jax.ShapeDtypeStruct((), "float32")
    t0 = time.perf_counter()
    lowered = sd._generate_jit.lower(pipe, config, shapes, ids, ids, jax.random.key(0), scalar, scalar,
                                     None, None, None)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1}))


def compile_times(args, batch: int) -> dict:
    """Cold compile and compile with a warm persistent cache, each in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.stable_diffusion", "--child-compile", "--device", args.device,
           "--dtype", args.dtype, "--steps", str(args.steps), "--size", str(args.size),
           "--compile-batch", str(batch)] + (["--reduced"] if args.reduced else [])
    env = dict(os.environ)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, extra in (("cold", []), ("fill", ["--cache-dir", cache]), ("cached", ["--cache-dir", cache])):
            r = subprocess.run(cmd + extra, capture_output=True, text=True, env=env)
            if r.returncode:
                raise RuntimeError(f"compile child failed:\n{r.stderr[-3000:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------
# diffusers (PyTorch)
# --------------------------------------------------------------------------------------------

def torch_pipeline(configs: dict, device: str):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"]).eval()
        vae = AutoencoderKL(**configs["vae"]).eval()
        text = CLIPTextModel(CLIPTextConfig(**configs["text"])).eval()
    if dtype != torch.float32:
        unet, vae, text = unet.to(dtype), vae.to(dtype), text.to(dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=PNDMScheduler(**PNDM), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dtype


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_unet_step_ms(pipe, dtype, device: str, batch: int, size: int, repeats: int) -> float:
    import torch

    h = size // pipe.vae_scale_factor
    x = torch.full((2 * batch, 4, h, h), 0.1, device=device, dtype=dtype)
    ctx = torch.full((2 * batch, 77, pipe.text_encoder.config.hidden_size), 0.01, device=device, dtype=dtype)
    t = torch.tensor(999, device=device)

    def step():
        with torch.no_grad():
            out = pipe.unet(x, t, ctx).sample
            u, c = out.chunk(2)
            _ = u + 7.5 * (c - u)
        torch_sync(device)

    return 1e3 * median_time(step, repeats)


def torch_end_to_end(pipe, dtype, device: str, batch: int, size: int, steps: int, repeats: int) -> float:
    import torch

    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (batch, 77), device=device)

    def run():
        with torch.no_grad():
            embeds = pipe.text_encoder(ids)[0]
            uncond = pipe.text_encoder(ids)[0]
            pipe(prompt_embeds=embeds, negative_prompt_embeds=uncond, num_inference_steps=steps,
                 guidance_scale=7.5, height=size, width=size, output_type="np")
        torch_sync(device)

    return median_time(run, repeats)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default=None, help="default: gpu if JAX sees one")
    p.add_argument("--reduced", action="store_true", help="small model, 128², 5 steps, batches 1 and 2")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="skip the fresh-process compile timings")
    p.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (128 if args.reduced else 512)
    args.steps = args.steps or (5 if args.reduced else 50)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.reduced else [1, 8])
    if args.device:
        os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    if args.child_compile:
        return child_compile(args)

    import jax

    args.device = args.device or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    repeats = args.repeats or (10 if args.device == "gpu" else 2)
    configs = REDUCED if args.reduced else SD15
    card = jax.devices()[0].device_kind
    print(f"jaxdiff Stable Diffusion benchmark — {'reduced model' if args.reduced else 'SD 1.5 shapes'}, "
          f"{args.size}², {args.steps} PNDM steps, CFG; JAX {jax.__version__} on {card} ({args.dtype})")

    rows = {}
    pipe, params = jax_pipeline(configs, args.dtype)
    for b in args.batch_sizes:
        rows[b] = {"jax_step_ms": jax_unet_step_ms(pipe, params, b, args.size, repeats),
                   "jax_e2e_s": jax_end_to_end(pipe, params, b, args.size, args.steps, max(1, repeats // 3))}
    del params

    torch_label = ""
    if not args.skip_torch:
        import diffusers
        import torch

        device = "cuda" if args.device == "gpu" else "cpu"
        tpipe, tdtype = torch_pipeline(configs, device)
        torch_label = f"diffusers {diffusers.__version__} PyTorch {torch.__version__} {str(tdtype).replace('torch.', '')}"
        for b in args.batch_sizes:
            rows[b]["torch_step_ms"] = torch_unet_step_ms(tpipe, tdtype, device, b, args.size, repeats)
            rows[b]["torch_e2e_s"] = torch_end_to_end(tpipe, tdtype, device, b, args.size, args.steps,
                                                     max(1, repeats // 3))
        del tpipe

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\n{'batch':>5} | {'CFG UNet step ms':>17} {'torch':>9} {'x':>6} | "
          f"{'end to end s':>13} {'torch':>8} {'x':>6}")
    for b, r in rows.items():
        ts, te = r.get("torch_step_ms"), r.get("torch_e2e_s")
        step_ratio = None if ts is None else ts / r["jax_step_ms"]
        e2e_ratio = None if te is None else te / r["jax_e2e_s"]
        print(f"{b:>5} | {r['jax_step_ms']:>17.2f} {fmt(ts, '.2f'):>9} {fmt(step_ratio, '.2f'):>6} | "
              f"{r['jax_e2e_s']:>13.3f} {fmt(te, '.3f'):>8} {fmt(e2e_ratio, '.2f'):>6}")
    if torch_label:
        print(f"(torch: {torch_label}; x = torch time / jaxdiff time)")

    if not args.skip_compile:
        c = compile_times(args, args.batch_sizes[0])
        print(f"\ncompile of `generate` (batch {args.batch_sizes[0]}) in a fresh process: cold "
              f"{c['cold']['lower_s'] + c['cold']['compile_s']:.1f} s (trace+lower {c['cold']['lower_s']:.1f} s, "
              f"XLA {c['cold']['compile_s']:.1f} s); with the persistent cache "
              f"{c['cached']['lower_s'] + c['cached']['compile_s']:.1f} s "
              f"(trace+lower {c['cached']['lower_s']:.1f} s, cache load {c['cached']['compile_s']:.1f} s)")


if __name__ == "__main__":
    main()
