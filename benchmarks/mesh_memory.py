"""Per-device memory of a UNet training step, from XLA's compiled memory analysis (nothing is
allocated: the inputs are `jax.ShapeDtypeStruct`s with shardings), and the throughput of the
sharded step against `pmap` for the MNIST model.

    python benchmarks/mesh_memory.py --model sd15              # SD 1.5 UNet, 512², batch 1/device
    python benchmarks/mesh_memory.py --model sdxl              # SDXL UNet (2.6 B), 1024², fsdp 8 + remat
    python benchmarks/mesh_memory.py --throughput              # MNIST model: mesh vs pmap steps/s
    python benchmarks/mesh_memory.py --model tiny              # a seconds-long check of the script

On 8 host CPU devices (set here). Each step is the real `make_train_step`: float32 master
weights, bf16 compute, AdamW, EMA, the denoising MSE on (latents, text context). Per-device
bytes = arguments + outputs - donated aliases + temporaries of the compiled per-device program.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

GiB = 2 ** 30

SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)
# diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
MODELS = {"sd15": (SD15, 77), "sdxl": (SDXL, 77), "tiny": (TINY, 8)}


def unet_step(name: str, remat: str | None, axis_name):
    """(train_step, abstract state, abstract per-device batch) of a UNet training step."""
    from jaxdiff.models.remat import checkpointed
    from jaxdiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel, param_shapes
    from jaxdiff.training import EMA, create_train_state, make_train_step

    config, tokens = MODELS[name]
    unet = UNet2DConditionModel(UNet2DConditionConfig(**config), dtype=jnp.bfloat16)
    sdxl = config.get("addition_embed_type") == "text_time"

    def apply(params, x, t, batch):
        added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]} if sdxl else None
        return unet.apply({"params": params}, x, t, batch["context"], train=True, added_cond_kwargs=added)

    apply = checkpointed(apply, remat)

    def loss_fn(params, batch, key):
        latents = batch["latents"].astype(jnp.float32)
        k_noise, k_t = jax.random.split(key)
        noise = jax.random.normal(k_noise, latents.shape)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, 1000)
        x_t = 0.7 * latents + 0.7 * noise
        pred = apply(params, x_t, t, batch)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise)), {}

    tx = optax.adamw(1e-5, weight_decay=1e-2)
    step = make_train_step(loss_fn, tx, axis_name=axis_name, ema=EMA(decay=0.9999))
    shapes = param_shapes(unet, jnp.float32)
    state = jax.eval_shape(lambda p: create_train_state(p, tx, jnp.zeros((2,), jnp.uint32), ema=True), shapes)
    size = config["sample_size"]
    batch = {"latents": jax.ShapeDtypeStruct((1, size, size, 4), jnp.bfloat16),
             "context": jax.ShapeDtypeStruct((1, tokens, config["cross_attention_dim"]), jnp.bfloat16)}
    if sdxl:
        batch["text_embeds"] = jax.ShapeDtypeStruct((1, 1280), jnp.bfloat16)
        batch["time_ids"] = jax.ShapeDtypeStruct((1, 6), jnp.float32)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    return step, state, batch, n_params


def per_device_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"arguments_gib": m.argument_size_in_bytes / GiB, "temporaries_gib": m.temp_size_in_bytes / GiB,
            "total_gib": total / GiB}


def pmap_memory(name: str, remat: str | None = None) -> dict:
    from jaxdiff.parallel import AXIS

    step, state, batch, n = unet_step(name, remat, AXIS)
    n_dev = jax.local_device_count()

    def lead(s):
        return jax.ShapeDtypeStruct((n_dev,) + s.shape, s.dtype)

    t0 = time.perf_counter()
    compiled = jax.pmap(step, axis_name=AXIS, donate_argnums=0).lower(
        jax.tree.map(lead, state), jax.tree.map(lead, batch)).compile()
    return {"params": n, "compile_s": round(time.perf_counter() - t0, 1), **per_device_bytes(compiled)}


def mesh_memory(name: str, mesh_text: str, remat: str | None) -> dict:
    from jax.sharding import NamedSharding

    from jaxdiff.parallel import mesh as M

    step, state, batch, n = unet_step(name, remat, None)
    mesh = M.make_mesh(mesh_text)
    state_sh = M.state_shardings(state, mesh)
    batch_sh = NamedSharding(mesh, M.BATCH)
    n_dev = mesh.devices.size
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh)
    abstract_batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((s.shape[0] * n_dev,) + s.shape[1:], s.dtype,
                                                                 sharding=batch_sh), batch)
    t0 = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                       donate_argnums=0).lower(abstract_state, abstract_batch).compile()
    return {"params": n, "compile_s": round(time.perf_counter() - t0, 1), **per_device_bytes(compiled)}


def throughput(steps: int, batch_size: int) -> dict:
    """The MNIST `small` model's train step, 8 devices: steps/s of mesh (jit) vs pmap."""
    from jaxdiff.models.class_conditioned import ClassConditionedUnet
    from jaxdiff.parallel.engine import MeshEngine, PmapEngine
    from jaxdiff.sampling import as_apply_fn
    from jaxdiff.schedulers import create_scheduler
    from jaxdiff.training import EMA, create_train_state, diffusion_loss, make_train_step
    from jaxdiff.training.configs import MNIST_PRESETS

    model = ClassConditionedUnet.create(num_classes=10, null_class=True, sample_size=28, **MNIST_PRESETS["small"])
    sched = create_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")
    params = model.init_weights(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = [{"images": rng.integers(0, 256, (batch_size, 28, 28, 1)).astype(np.uint8),
                "labels": rng.integers(0, 10, (batch_size,)).astype(np.int32)} for _ in range(4)]
    out = {}
    for engine in (PmapEngine(), MeshEngine()):
        loss = diffusion_loss(as_apply_fn(model), sched, sched.create_state(), cfg_dropout=0.1,
                              null_label=model.null_label, snr_gamma=5.0, axis_name=engine.axis_name)
        tx = optax.adam(1e-3)
        step = engine.compile(make_train_step(loss, tx, axis_name=engine.axis_name, ema=EMA(decay=0.999)))
        state = engine.place_state(create_train_state(params, tx, jax.random.PRNGKey(1), ema=True))
        state, _ = step(state, engine.place_batch(batches[0]))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, engine.place_batch(batches[i % 4]))
        jax.block_until_ready(state)
        out[engine.name] = steps / (time.perf_counter() - t0)
    return {"steps": steps, "batch_size": batch_size, "pmap_steps_per_s": round(out["pmap"], 2),
            "mesh_steps_per_s": round(out["mesh"], 2), "mesh_vs_pmap": round(out["mesh"] / out["pmap"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default=None)
    p.add_argument("--remat", choices=("full", "matmuls"), default="full", help="for the fsdp step")
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}", flush=True)
    if args.throughput:
        print(json.dumps(throughput(args.steps, args.batch_size)), flush=True)
    if args.model in ("sd15", "tiny"):
        fsdp = mesh_memory(args.model, "fsdp=8", args.remat)
        print(json.dumps({"model": args.model, "step": f"mesh fsdp=8 + remat {args.remat}", **fsdp}), flush=True)
        replicated = pmap_memory(args.model)
        print(json.dumps({"model": args.model, "step": "pmap (replicated)", **replicated}), flush=True)
        print(json.dumps({"model": args.model, "fsdp8_remat_vs_pmap": round(fsdp["total_gib"] /
                                                                         replicated["total_gib"], 3)}))
    elif args.model == "sdxl":
        fsdp = mesh_memory("sdxl", "fsdp=8", args.remat)
        print(json.dumps({"model": "sdxl", "step": f"mesh fsdp=8 + remat {args.remat}", **fsdp,
                          "fits_16_gib": fsdp["total_gib"] <= 16}), flush=True)


if __name__ == "__main__":
    main()
