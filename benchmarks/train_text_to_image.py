"""UNet training throughput of text-to-image fine-tuning: jaxdiff's train step next to diffusers'
PyTorch UNet trained the way its train_text_to_image.py does, in the same run, on the same machine.

    python -m benchmarks.train_text_to_image --device gpu    # SD 1.5 shapes, 512², bf16, cached latents
    python -m benchmarks.train_text_to_image --device cpu    # a reduced model that runs on a laptop CPU

What one step is, on both sides (cached latents: the VAE and text encoder are not run):
a latent sample from the VAE posterior (mean ‖ log-variance inputs), per-example timesteps and
noise, the noisy latents, the UNet forward and backward in bf16 autocast with float32 master
weights, the MSE to the noise, global-norm clipping to 1 and an AdamW update (+ EMA with
--ema). jaxdiff runs the program's own step (`text_to_image_loss` + `make_train_step`),
`pmap`ped over every local device, fed from host numpy batches as the program feeds it; PyTorch
runs on one device. Random weights with SD 1.5's UNet shapes (860M parameters).

Printed: one JSON line per implementation (images/s, ms/step, compile seconds, peak memory
where known) and the ratio jaxdiff / PyTorch per device. Bar on one H100/H200: ≥ 60 images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest: diffusers' defaults = SD 1.5
REDUCED_UNET = dict(sample_size=16, cross_attention_dim=128, block_out_channels=(64, 128, 128, 128),
                    layers_per_block=1, attention_head_dim=4)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
VAE_SCALING = 0.18215
TOKENS = 77


def _stats(times: list[float], images_per_step: int) -> dict:
    per_step = statistics.median(times)
    return {"ms_per_step": round(1e3 * per_step, 2), "images_per_s": round(images_per_step / per_step, 2)}


# --------------------------------------------------------------------------------------------
# jaxdiff
# --------------------------------------------------------------------------------------------

def run_jax(args, unet_config: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.models import autoencoder_kl as V
    from jaxdiff.models import unet_2d_condition as U
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training.optim import make_optimizer
    from jaxdiff.training.text_to_image import LossConfig, text_to_image_loss
    from jaxdiff.training import EMA, create_train_state, make_train_step

    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    unet = U.UNet2DConditionModel(U.UNet2DConditionConfig.from_dict(unet_config), dtype=dtype)
    vae = V.AutoencoderKL(V.AutoencoderKLConfig(scaling_factor=VAE_SCALING))  # only its config is used
    scheduler = create_scheduler("ddpm", **SCHEDULER)
    pipe = StableDiffusion(unet, vae, None, None, scheduler)
    params = U.init_params(unet, jax.random.key(0), jnp.float32)  # float32 master weights
    n_params = sum(x.size for x in jax.tree.leaves(params))

    loss_fn = text_to_image_loss(pipe, scheduler, LossConfig(cfg_dropout=0.1, snr_gamma=args.snr_gamma),
                                 null_context=np.zeros((TOKENS, unet_config["cross_attention_dim"]), np.float32))
    tx, _ = make_optimizer(1e-5, total_steps=10_000, warmup_steps=0, max_grad_norm=1.0)
    step = make_train_step(loss_fn, tx, ema=EMA(decay=0.9999) if args.ema else None)
    state = create_train_state(params, tx, jax.random.key_data(jax.random.key(1)), ema=args.ema)
    del params
    p_state = parallel.replicate(state)
    del state
    n_dev = parallel.device_count()
    global_batch = args.batch_size * n_dev
    h = args.resolution // 8
    rng = np.random.default_rng(0)
    batches = [{"moments": rng.normal(size=(n_dev, args.batch_size, h, h, 8)).astype(np.float16),
                "context": rng.normal(size=(n_dev, args.batch_size, TOKENS, unet_config["cross_attention_dim"]))
                .astype(np.float16)} for _ in range(2)]
    p_step = parallel.pmap(step)

    t0 = time.perf_counter()
    p_state, metrics = p_step(p_state, batches[0])
    jax.block_until_ready(p_state)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        p_state, metrics = p_step(p_state, batches[1])
    jax.block_until_ready(p_state)
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            p_state, metrics = p_step(p_state, batches[i % 2])  # host numpy in, as the program feeds it
        jax.block_until_ready(p_state)
        times.append((time.perf_counter() - t0) / args.steps)
    out = {"impl": "jaxdiff", "devices": n_dev, "device": str(jax.devices()[0].device_kind),
           "global_batch": global_batch, "params_M": round(n_params / 1e6, 1),
           "first_step_s": round(first, 2), "loss": float(metrics["loss"][0]), **_stats(times, global_batch)}
    out["images_per_s_per_device"] = round(out["images_per_s"] / n_dev, 2)
    try:
        mem = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in mem:
            out["peak_gib"] = round(mem["peak_bytes_in_use"] / 2**30, 2)
    except Exception:  # not every backend reports memory
        pass
    return out


# --------------------------------------------------------------------------------------------
# PyTorch (diffusers' train_text_to_image.py step, cached latents)
# --------------------------------------------------------------------------------------------

def run_torch(args, unet_config: dict) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return {"impl": "diffusers-pytorch", "skipped": "torch has no CUDA here"}
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    unet = UNet2DConditionModel(**unet_config).to(device).train()
    ema = None
    if args.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=0.9999)
        ema.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(**SCHEDULER)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    b, h, d = args.batch_size, args.resolution // 8, unet_config["cross_attention_dim"]
    moments = torch.randn(b, 8, h, h, device=device, dtype=torch.float16)
    context = torch.randn(b, TOKENS, d, device=device, dtype=torch.float16)
    autocast = args.dtype == "bf16"

    def step():
        mean, logvar = moments.float().chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * VAE_SCALING
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            pred = unet(noisy, t, context.float()).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        times.append((time.perf_counter() - t0) / args.steps)
    out = {"impl": "diffusers-pytorch", "devices": 1, "batch": b, "first_step_s": round(first, 2),
           "precision": "bf16 autocast" if autocast else "fp32", "loss": float(loss.detach()), **_stats(times, b)}
    if device == "cuda":
        out["device"] = torch.cuda.get_device_name(0)
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default=None, help="default: gpu when JAX sees one")
    p.add_argument("--reduced", action="store_true", help="a small UNet (the default on --device cpu)")
    p.add_argument("--full", action="store_true", help="SD 1.5 shapes even on a CPU")
    p.add_argument("--resolution", type=int, default=None, help="image side (default 512; reduced: 128)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per device (default 8 on a GPU: SD1.5 at 512² without remat; 4 on a CPU)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="compute precision (default bf16 on a GPU, fp32 on a CPU); weights stay float32")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="also update an EMA of the weights each step")
    p.add_argument("--snr-gamma", type=float, default=None)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args(argv)

    import jax

    if args.device is None:
        args.device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    if args.device == "gpu" and jax.default_backend() != "gpu":
        sys.exit("error: --device gpu but JAX sees no GPU (install jax[cuda12])")
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    reduced = not args.full and (args.reduced or args.device == "cpu")
    unet_config = REDUCED_UNET if reduced else SD15_UNET
    args.resolution = args.resolution or (128 if reduced else 512)
    args.batch_size = args.batch_size or (8 if args.device == "gpu" else 4)
    args.dtype = args.dtype or ("bf16" if args.device == "gpu" else "fp32")
    args.steps = args.steps or (20 if args.device == "gpu" else 3)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    header = {"benchmark": "train_text_to_image", "unet": "reduced" if reduced else "SD1.5",
              "resolution": args.resolution, "batch_per_device": args.batch_size, "dtype": args.dtype,
              "ema": args.ema, "cached_latents": True, "jax": jax.__version__, "backend": jax.default_backend()}
    print(json.dumps(header), flush=True)
    ours = run_jax(args, unet_config)
    print(json.dumps(ours), flush=True)
    if not args.skip_torch:
        theirs = run_torch(args, unet_config)
        print(json.dumps(theirs), flush=True)
        if "images_per_s" in theirs:
            ratio = ours["images_per_s_per_device"] / theirs["images_per_s"]
            print(json.dumps({"ratio_jaxdiff_over_pytorch_per_device": round(ratio, 2)}), flush=True)
    if args.device == "gpu" and not reduced and args.resolution == 512:
        ok = ours["images_per_s_per_device"] >= 60
        print(json.dumps({"bar_60_images_per_s_per_device": "met" if ok else "NOT met"}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    main()
