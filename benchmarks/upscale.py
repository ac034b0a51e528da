"""x4 upscaling 512² → 2048² with the shapes of stabilityai/stable-diffusion-x4-upscaler: peak device
memory and time of the whole compiled program (text encoder, sampling loop, tiled VAE decode).

    python -m benchmarks.upscale --device gpu                 # random bf16 weights; runs it, peak memory
    python -m benchmarks.upscale --device cpu                 # compiles only: XLA's memory analysis

The networks have the published folder's configs (UNet 7 channels, 256-512-512-1024, only-cross-
attention in the first three levels, 1000 noise-level classes; VAE 128-256-512, factor 4, 256-pixel
tiles; OpenCLIP-H text encoder, 23 layers) with random weights: time and memory do not depend on
the values. With a GPU the program runs `--steps` steps after compiling and the figure is
`peak_bytes_in_use` of the device; on the CPU nothing runs (one 512² upscale would take hours) and
the figures are those of XLA's compiled-program memory analysis (arguments + outputs + temporaries
− aliased), computed from abstract parameters (nothing allocated). `--compare-decode` adds the
analysis of the VAE decode alone at 512² latents, tiled and whole, which is what needs the tiling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[256, 512, 512, 1024],
            cross_attention_dim=1024, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=7, layers_per_block=2,
            mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=1000,
            only_cross_attention=[True, True, True, False], out_channels=4, sample_size=128,
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            use_linear_projection=True)
VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3,
           up_block_types=["UpDecoderBlock2D"] * 3, in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.08333)
TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build(dtype, vae_dtype):
    """(pipe, abstract params) of an x4 upscaler with the published configs."""
    import jax.numpy as jnp

    from jaxdiff.models import autoencoder_kl as vae_lib
    from jaxdiff.models import clip as clip_lib
    from jaxdiff.models import unet_2d_condition as unet_lib
    from jaxdiff.pipelines.upscale import Upscaler
    from jaxdiff.schedulers import create_scheduler

    unet = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(UNET), dtype=dtype)
    vae = vae_lib.AutoencoderKL(vae_lib.AutoencoderKLConfig.from_dict(VAE), dtype=vae_dtype)
    text = clip_lib.build_model("CLIPTextModel", clip_lib.CLIPTextConfig(**TEXT), jnp.float32)
    pipe = Upscaler(unet, vae, text, None, create_scheduler("ddim", **SCHEDULER),
                    low_res_scheduler=create_scheduler("ddpm", beta_start=0.0001, beta_end=0.02,
                                                       beta_schedule="scaled_linear"))
    params = {"unet": unet_lib.param_shapes(unet, dtype), "vae": vae_lib.param_shapes(vae, vae_dtype),
              "text_encoder": clip_lib.param_shapes(text)}
    return pipe, params


def analysis(compiled) -> dict:
    """XLA's memory figures of a compiled program, in GiB."""
    m = compiled.memory_analysis()
    gib = 2.0 ** 30
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return dict(arguments_gib=round(m.argument_size_in_bytes / gib, 3), outputs_gib=round(m.output_size_in_bytes / gib, 3),
                temporaries_gib=round(m.temp_size_in_bytes / gib, 3), total_gib=round(total / gib, 3))


def decode_analysis(pipe, params, size: int) -> dict:
    """Memory analysis of the VAE decode alone at (1, size, size, 4) latents, tiled and whole."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import autoencoder_kl as vae_lib

    z = jax.ShapeDtypeStruct((1, size, size, 4), jnp.float32)
    out = {}
    for name, fn in (("tiled", lambda p, x: vae_lib.decode_tiled(pipe.vae, p, x)),
                     ("whole", lambda p, x: pipe.vae.apply({"params": p}, x, method=pipe.vae.decode))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(params["vae"], z).compile()
        out[name] = dict(analysis(compiled), compile_s=round(time.perf_counter() - t0, 1))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default=None, help="default: gpu if JAX sees one")
    p.add_argument("--size", type=int, default=512, help="low-resolution side (output: 4×)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (diffusers' default: 75)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="UNet dtype (the VAE: float32)")
    p.add_argument("--no-tiling", action="store_true", help="decode the whole image in one pass")
    p.add_argument("--compare-decode", action="store_true", help="also: the VAE decode alone, tiled and whole")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models import autoencoder_kl as vae_lib
    from jaxdiff.models import clip as clip_lib
    from jaxdiff.models import unet_2d_condition as unet_lib
    from jaxdiff.pipelines import upscale

    device = args.device or ("gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu")
    if device == "gpu" and jax.devices()[0].platform != "gpu":
        sys.exit("error: --device gpu but JAX sees no GPU; run with --device cpu for the compile-only figures")
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    pipe, shapes = build(dtype, jnp.float32)
    config = upscale.UpscaleConfig(num_inference_steps=args.steps, tiled_decode=not args.no_tiling)
    report = dict(device=f"{device} ({jax.devices()[0].device_kind})", low_res=args.size, out=4 * args.size,
                  batch=args.batch, steps=args.steps, unet_dtype=args.dtype, tiled_decode=not args.no_tiling)

    if device == "gpu":
        key = jax.random.key(0)
        k1, k2, k3 = jax.random.split(key, 3)
        params = {"unet": unet_lib.init_params(pipe.unet, k1, dtype), "vae": vae_lib.init_params(pipe.vae, k2),
                  "text_encoder": clip_lib.init_params(pipe.text_encoder, k3)}
        jax.block_until_ready(params)
    else:
        params = shapes
    t0 = time.perf_counter()
    fn = upscale.compile_generate(pipe, params, args.batch, args.size, args.size, config=config)
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    report["xla_memory_analysis"] = analysis(fn.compiled)
    if device == "gpu":
        ids = np.zeros((args.batch, 77), np.int32)
        image = np.random.default_rng(0).uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
        fn(params, ids, ids, jax.random.key(1), 9.0, image, 20).block_until_ready()  # warm-up
        t0 = time.perf_counter()
        fn(params, ids, ids, jax.random.key(2), 9.0, image, 20).block_until_ready()
        report["generate_s"] = round(time.perf_counter() - t0, 2)
        report["per_step_s"] = round(report["generate_s"] / args.steps, 3)
        stats = jax.devices()[0].memory_stats() or {}
        report["peak_device_memory_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2.0 ** 30, 2)
    if args.compare_decode:
        report["decode_only"] = decode_analysis(pipe, shapes, args.size)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
