"""SDXL equals diffusers' PyTorch SDXL: the `text_time` UNet, both text encoders, and (extended)
the text-to-image, img2img and base → refiner pipelines from the same latents.

diffusers/transformers build tiny SDXL-shaped models from configs (SDXL's block layout: no
attention at the first level, more transformer layers deeper, linear projections, 6 micro-
conditioning time ids for a base and 5 for a refiner), perturb every weight by N(0, 0.02) and
`save_pretrained` them; jaxdiff loads the folders with its real loaders.
Tolerances: networks max |ours − torch| ≤ 1e-4 · max |torch| (float32); images ≤ 5e-4 absolute
on [0, 1] (the issue's bar).
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_trees_equal, nchw, perturb, rel_err

from jaxdiff.errors import JaxdiffError
from jaxdiff.models import clip as clip_lib
from jaxdiff.models.unet_2d_condition import (
    UNet2DConditionConfig,
    load_unet_2d_condition,
)

RTOL = 1e-4
IMAGE_ATOL = 5e-4

# SDXL base layout at toy size: DownBlock2D first, two cross-attention levels with (1, 2)
# transformer layers, linear projections, per-level heads, 64 = 32 + 32 (both encoders) context,
# 6 time ids × 8 + a 32-wide pooled embedding.
BASE_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 32, 64), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 2, 4), "transformer_layers_per_block": (1, 1, 2), "use_linear_projection": True,
    "cross_attention_dim": 64, "norm_num_groups": 8, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32}
# The refiner: four levels, context from the second encoder only, 5 time ids (aesthetic score).
REFINER_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4, 4, 4), "transformer_layers_per_block": (1, 2, 1, 1),
    "use_linear_projection": True, "cross_attention_dim": 32, "norm_num_groups": 8,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 5 * 8 + 32}


def torch_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**config).eval())


def unet_inputs(config: dict, n_ids: int, batch: int = 2, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, 4)).astype(np.float32)
    t = np.array([999, 17][:batch], np.int64)
    ctx = rng.normal(size=(batch, 7, config["cross_attention_dim"])).astype(np.float32)
    pooled = config["projection_class_embeddings_input_dim"] - n_ids * config["addition_time_embed_dim"]
    text_embeds = rng.normal(size=(batch, pooled)).astype(np.float32)
    time_ids = np.array([[1024, 768, 0, 16, 1024, 1024][:n_ids],
                         [512, 512, 32, 0, 6.0, 768][:n_ids]][:batch], np.float32)
    return x, t, ctx, {"text_embeds": text_embeds, "time_ids": time_ids}


def torch_unet_out(model, x, t, ctx, added) -> np.ndarray:
    with torch.no_grad():
        out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                    added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def base_unet(tmp_path_factory):
    """(torch model, its folder, jaxdiff's jitted apply, loaded params, inputs, torch output)."""
    model = torch_unet(BASE_UNET)
    folder = tmp_path_factory.mktemp("sdxl-unet")
    model.save_pretrained(folder)
    unet, params = load_unet_2d_condition(folder, subfolder=None)
    args = unet_inputs(BASE_UNET, 6)
    return model, folder, jax.jit(unet.apply), params, args, torch_unet_out(model, *args)


def test_sdxl_base_unet_matches_diffusers(base_unet):
    _, _, apply, params, (x, t, ctx, added), want = base_unet
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (80, 128)
    assert rel_err(apply({"params": params}, x, t, ctx, added_cond_kwargs=added), want) < RTOL


def test_sdxl_unet_loads_fp16_variant_and_shards(base_unet, tmp_path):
    """The published forms of an SDXL `unet/`: a sharded `*.safetensors.index.json` (same
    output) and `*.fp16.safetensors` (the float32 weights rounded to half, leaf for leaf)."""
    model, _, apply, params, (x, t, ctx, added), want = base_unet
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, p_sharded = load_unet_2d_condition(sharded, subfolder=None)
    assert rel_err(apply({"params": p_sharded}, x, t, ctx, added_cond_kwargs=added), want) < RTOL

    half = tmp_path / "fp16"
    model.half().save_pretrained(half, variant="fp16")
    model.float()
    assert (half / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, p16 = load_unet_2d_condition(half, subfolder=None, variant="fp16", param_dtype=jnp.float32)
    assert_trees_equal(p16, jax.tree.map(lambda p: p.astype(jnp.float16).astype(jnp.float32), params))


def test_old_flax_sdxl_msgpack_loads_as_the_safetensors(base_unet, tmp_path):
    """diffusers' Flax SDXL folders (`diffusion_flax_model.msgpack`, `FlaxUNet2DConditionModel`)
    name the text_time parameters as the PyTorch ones (`add_embedding/linear_1/kernel`, ...)."""
    from flax.serialization import msgpack_serialize

    _, folder, _, params, _, _ = base_unet
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "FlaxUNet2DConditionModel"}))
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(msgpack_serialize(jax.tree.map(np.asarray, params)))
    _, loaded = load_unet_2d_condition(tmp_path, subfolder=None)
    assert_trees_equal(loaded, params)


def test_text_time_unet_without_its_inputs_is_one_clear_error(base_unet):
    _, _, apply, params, (x, t, ctx, added), _ = base_unet
    with pytest.raises(JaxdiffError, match="added_cond_kwargs"):
        apply({"params": params}, x, t, ctx)
    with pytest.raises(JaxdiffError, match="refiner takes 5 time ids"):
        apply({"params": params}, x, t, ctx, added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :5]})
    with pytest.raises(JaxdiffError, match="needs addition_time_embed_dim"):
        UNet2DConditionConfig.from_dict({**BASE_UNET, "addition_time_embed_dim": None})


@pytest.mark.extended
def test_sdxl_refiner_unet_matches_diffusers(tmp_path):
    model = torch_unet(REFINER_UNET, seed=1)
    model.save_pretrained(tmp_path)
    unet, params = load_unet_2d_condition(tmp_path, subfolder=None)
    x, t, ctx, added = unet_inputs(REFINER_UNET, 5, batch=1, size=8, seed=1)
    got = jax.jit(unet.apply)({"params": params}, x, t, ctx, added_cond_kwargs=added)
    assert rel_err(got, torch_unet_out(model, x, t, ctx, added)) < RTOL


# ----------------------------------------------------------------------------- text encoders

def text_encoder_config(**kw):
    """A tiny CLIP text config on the shared fixture's 523-token vocabulary (as diffusers' SDXL
    tests: 5 layers, gelu, projection 32)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{"bos_token_id": 521, "eos_token_id": 522, "pad_token_id": 1,
                             "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                             "num_hidden_layers": 5, "vocab_size": 523, "hidden_act": "gelu",
                             "projection_dim": 32, **kw})


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    """CLIPTextModel (ViT-L's role) and CLIPTextModelWithProjection (bigG's: the legacy
    eos_token_id=2 config, pooled at the argmax of the ids) saved as a pipeline's two folders."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl-encoders")
    torch.manual_seed(0)
    te1 = perturb(CLIPTextModel(text_encoder_config()).eval())
    te2 = perturb(CLIPTextModelWithProjection(text_encoder_config(eos_token_id=2, hidden_act="gelu_pytorch_tanh")).eval())
    te1.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    return te1, te2, root


def token_ids(batch=2, length=77, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), 0, np.int64)
    for i, n in enumerate([5, 11, 3, 20][:batch]):
        ids[i, 0], ids[i, n] = 521, 522
        ids[i, 1:n] = rng.integers(2, 500, n - 1)
    return ids


def test_both_text_encoders_match_transformers(text_encoders):
    """What SDXL takes from each: the penultimate hidden state (no final norm) of both, and the
    projected pooled `text_embeds` of the second."""
    te1, te2, root = text_encoders
    ids = token_ids()
    m1, p1 = clip_lib.load_clip_text_encoder(root, subfolder="text_encoder")
    m2, p2 = clip_lib.load_clip_text_encoder(root, subfolder="text_encoder_2")
    assert isinstance(m2, clip_lib.CLIPTextModelWithProjection) and m2.config.eos_token_id == 2
    with torch.no_grad():
        r1 = te1(torch.from_numpy(ids), output_hidden_states=True)
        r2 = te2(torch.from_numpy(ids), output_hidden_states=True)
    o1 = jax.jit(lambda p, i: m1.apply({"params": p}, i, output_hidden_states=True))(p1, ids)
    o2 = jax.jit(lambda p, i: m2.apply({"params": p}, i, output_hidden_states=True))(p2, ids)
    assert rel_err(o1.hidden_states[-2], r1.hidden_states[-2].numpy()) < RTOL
    assert rel_err(o2.hidden_states[-2], r2.hidden_states[-2].numpy()) < RTOL
    assert rel_err(o2.text_embeds, r2.text_embeds.numpy()) < RTOL
    assert o1.text_embeds is None


# ----------------------------------------------------------------------------- pipelines (extended)

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "timestep_spacing": "leading"}  # SDXL's scheduler_config.json
PROMPTS = ["a red apple on a table", "a photo of a cat"]


@pytest.fixture(scope="module")
def sdxl_folders(text_encoders, fixtures_dir, tmp_path_factory):
    """A tiny SDXL base and refiner built with diffusers and `save_pretrained` (the tiny SD
    fixture's VAE and tokenizer; tokenizer_2 pads with "!" as SDXL's does): (base folder,
    refiner folder, diffusers base pipeline, diffusers refiner pipeline)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    te1, te2, _ = text_encoders
    fixture = fixtures_dir / "tiny-sd-pt-v1"
    tokenizer = CLIPTokenizer.from_pretrained(fixture / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(fixture / "tokenizer", pad_token="!")
    vae = AutoencoderKL.from_pretrained(fixture / "vae").eval()
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=torch_unet(BASE_UNET), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=torch_unet(REFINER_UNET, seed=1), scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    base_dir, refiner_dir = tmp_path_factory.mktemp("sdxl-base"), tmp_path_factory.mktemp("sdxl-refiner")
    base.save_pretrained(base_dir)
    refiner.save_pretrained(refiner_dir)
    return base_dir, refiner_dir, base, refiner


@pytest.fixture(scope="module")
def jax_sdxl(sdxl_folders):
    from jaxdiff.pipelines import sdxl

    base_dir, refiner_dir, _, _ = sdxl_folders
    return (sdxl.load_sdxl_pipeline(base_dir, dtype=jnp.float32),
            sdxl.load_sdxl_pipeline(refiner_dir, dtype=jnp.float32))


def noise(shape, seed=0) -> np.ndarray:
    """NHWC float32 latents, from torch's generator (as diffusers draws them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).numpy().transpose(0, 2, 3, 1).copy()


def diffusers_images(pipe, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = pipe(output_type="np", **kwargs).images
    return np.asarray(out, np.float32)


@pytest.mark.extended
def test_sdxl_txt2img_matches_diffusers(sdxl_folders, jax_sdxl):
    """Two prompts, negative prompts (and the zeroed unconditional branch), guidance 5,
    a non-square original size and a crop: the images within 5e-4."""
    from jaxdiff.pipelines import sdxl

    _, _, base, _ = sdxl_folders
    (pipe, params), _ = jax_sdxl
    lat = noise((2, 4, 8, 8))
    cond = {"original_size": (64, 48), "crops_coords_top_left": (4, 0)}
    images = []
    for negative in (None, ["blurry", "ugly"]):
        want = diffusers_images(base, prompt=PROMPTS, negative_prompt=negative, num_inference_steps=3,
                                guidance_scale=5.0, latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)),
                                height=16, width=16, **cond)
        got = sdxl.generate(pipe, params, sdxl.tokenize_prompts(pipe, PROMPTS, negative),
                            sdxl.micro_conditioning(pipe, 16, 16, **cond), jax.random.key(0), 5.0,
                            config=sdxl.XLGenerateConfig(3, 16, 16), latents=lat)
        assert got.shape == (2, 16, 16, 3)
        np.testing.assert_allclose(np.asarray(got), want, atol=IMAGE_ATOL, rtol=0)
        images.append(want)
    assert np.abs(images[0] - images[1]).max() > 20 * IMAGE_ATOL  # the tolerance tells them apart


@pytest.mark.extended
def test_sdxl_with_dpm_solver_karras_matches_diffusers(sdxl_folders, jax_sdxl):
    """Another sampler SDXL folders are run with: DPM-Solver++ (2M) on Karras sigmas, taken from
    the folder's Euler config as diffusers' `from_config` does."""
    from diffusers import DPMSolverMultistepScheduler

    from jaxdiff.pipelines import sdxl
    from jaxdiff.schedulers import create_scheduler

    _, _, base, _ = sdxl_folders
    (pipe, params), _ = jax_sdxl
    lat = noise((1, 4, 8, 8), seed=7)
    euler = base.scheduler
    base.scheduler = DPMSolverMultistepScheduler.from_config(euler.config, use_karras_sigmas=True)
    try:
        want = diffusers_images(base, prompt="a cat", num_inference_steps=4, guidance_scale=5.0, height=16,
                                width=16, latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)))
    finally:
        base.scheduler = euler
    dpm = pipe.with_scheduler(create_scheduler(pipe.folder / "scheduler", name="dpm++", use_karras_sigmas=True))
    got = sdxl.generate(dpm, params, sdxl.tokenize_prompts(dpm, "a cat"), sdxl.micro_conditioning(dpm, 16, 16),
                        jax.random.key(0), 5.0, config=sdxl.XLGenerateConfig(4, 16, 16), latents=lat)
    np.testing.assert_allclose(np.asarray(got), want, atol=IMAGE_ATOL, rtol=0)


@pytest.mark.extended
def test_sdxl_refiner_img2img_and_base_to_refiner_match_diffusers(sdxl_folders, jax_sdxl):
    """The refiner as img2img (strength 0.6, aesthetic scores) from given latents and noise, and
    diffusers' ensemble of experts: base to denoising_end=0.7 as latents, refiner from there."""
    from jaxdiff.pipelines import sdxl

    _, _, base, refiner = sdxl_folders
    (bpipe, bparams), (rpipe, rparams) = jax_sdxl
    init, eps = noise((1, 4, 8, 8), seed=3), noise((1, 4, 8, 8), seed=4)
    want = diffusers_images(refiner, prompt="a cat", image=torch.from_numpy(init.transpose(0, 3, 1, 2)),
                            strength=0.6, num_inference_steps=4, guidance_scale=6.0, aesthetic_score=7.0,
                            negative_aesthetic_score=2.0, generator=torch.Generator().manual_seed(4))
    got = sdxl.generate(rpipe, rparams, sdxl.tokenize_prompts(rpipe, "a cat"),
                        sdxl.micro_conditioning(rpipe, 16, 16, aesthetic_score=7.0, negative_aesthetic_score=2.0),
                        jax.random.key(0), 6.0, config=sdxl.XLGenerateConfig(4, 16, 16, strength=0.6),
                        init_latents=init, latents=eps)
    np.testing.assert_allclose(np.asarray(got), want, atol=IMAGE_ATOL, rtol=0)

    lat = noise((1, 4, 8, 8), seed=5)
    with torch.no_grad():
        handoff = base(prompt="a cat", num_inference_steps=5, denoising_end=0.7, output_type="latent",
                       latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)), guidance_scale=5.0).images
    want = diffusers_images(refiner, prompt="a cat", image=handoff, num_inference_steps=5,
                            denoising_start=0.7, guidance_scale=5.0)
    key = jax.random.key(0)
    got_handoff = sdxl.generate(bpipe, bparams, sdxl.tokenize_prompts(bpipe, "a cat"),
                                sdxl.micro_conditioning(bpipe, 16, 16), key, 5.0, latents=lat,
                                config=sdxl.XLGenerateConfig(5, 16, 16, denoising_end=0.7, output="latents"))
    np.testing.assert_allclose(np.asarray(got_handoff), handoff.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    got = sdxl.generate(rpipe, rparams, sdxl.tokenize_prompts(rpipe, "a cat"),
                        sdxl.micro_conditioning(rpipe, 16, 16), key, 5.0, init_latents=got_handoff,
                        config=sdxl.XLGenerateConfig(5, 16, 16, denoising_start=0.7))
    np.testing.assert_allclose(np.asarray(got), want, atol=IMAGE_ATOL, rtol=0)


@pytest.mark.extended
def test_prompts_guidance_sizes_and_aesthetic_scores_do_not_recompile(jax_sdxl):
    """All of them (and img2img's strength) are traced: new values give new images from the
    same compiled program."""
    from jaxdiff.pipelines import sdxl

    (base, bparams), (refiner, rparams) = jax_sdxl
    key, lat = jax.random.key(0), noise((2, 4, 8, 8))

    def run_base(prompt, cond, w):
        return np.asarray(sdxl.generate(base, bparams, prompt, cond, key, w, latents=lat,
                                        config=sdxl.XLGenerateConfig(3, 16, 16)))

    first = run_base(sdxl.tokenize_prompts(base, PROMPTS), sdxl.micro_conditioning(base, 16, 16), 5.0)
    count = sdxl.compiled_programs()
    others = [
        run_base(sdxl.tokenize_prompts(base, ["a dog", "a boat"], ["dark", "blurry"], prompts_2="a painting"),
                 sdxl.micro_conditioning(base, 16, 16), 5.0),
        run_base(sdxl.tokenize_prompts(base, PROMPTS), sdxl.micro_conditioning(
            base, 16, 16, original_size=(1024, 512), crops_coords_top_left=(3, 5), target_size=(8, 8),
            negative_original_size=(32, 32), negative_target_size=(16, 16)), 5.0),
        run_base(sdxl.tokenize_prompts(base, PROMPTS), sdxl.micro_conditioning(base, 16, 16), 9.0),
    ]
    init, eps = noise((1, 4, 8, 8), seed=3), noise((1, 4, 8, 8), seed=4)

    def run_refiner(score, negative_score, w, strength=None):
        cond = sdxl.micro_conditioning(refiner, 16, 16, aesthetic_score=score, negative_aesthetic_score=negative_score)
        return np.asarray(sdxl.generate(refiner, rparams, sdxl.tokenize_prompts(refiner, "a cat"), cond, key, w,
                                        config=sdxl.XLGenerateConfig(4, 16, 16, strength=0.6),
                                        init_latents=init, latents=eps, strength=strength))

    refined = run_refiner(7.0, 2.0, 6.0)
    count_refiner = sdxl.compiled_programs()
    assert count_refiner <= count + 1
    others_refined = [run_refiner(3.0, 9.0, 6.0), run_refiner(7.0, 2.0, 2.0), run_refiner(7.0, 2.0, 6.0, 0.9)]
    assert sdxl.compiled_programs() == count_refiner
    for a, b in [(first, o) for o in others] + [(refined, o) for o in others_refined]:
        assert np.abs(a - b).max() > 1e-3  # each input reaches the images


def test_refiner_flags_are_refused_clearly(fixtures_dir, tmp_path, capsys):
    """--refiner-dir belongs to SDXL folders; --high-noise-frac must be in (0, 1) and needs
    --refiner-dir: one error line each, before anything is loaded."""
    from sample.stable_diffusion import main

    base = ["--model-dir", str(fixtures_dir / "tiny-sd-pt-v1"), "--prompt", "a cat", "--out", str(tmp_path / "o")]
    for extra, message in [(["--refiner-dir", str(tmp_path)], "takes no --refiner-dir; --refiner-dir is for sdxl"),
                           (["--high-noise-frac", "1.5"], "--high-noise-frac must be in [0, 1)"),
                           (["--high-noise-frac", "0.7"], "pass --refiner-dir too")]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.extended
def test_sample_program_runs_base_and_refiner(sdxl_folders, jax_sdxl, tmp_path, capsys):
    """`python -m sample.stable_diffusion --model-dir BASE --refiner-dir REFINER --high-noise-frac F`
    writes what the library's base → refiner handoff makes from the same latents."""
    from PIL import Image

    from jaxdiff.pipelines import sdxl
    from sample.stable_diffusion import main

    base_dir, refiner_dir, _, _ = sdxl_folders
    (base, bparams), (refiner, rparams) = jax_sdxl
    lat = noise((1, 4, 8, 8), seed=5)
    np.save(tmp_path / "lat.npy", lat.transpose(0, 3, 1, 2))
    paths = main(["--model-dir", str(base_dir), "--refiner-dir", str(refiner_dir), "--high-noise-frac", "0.7",
                  "--prompt", "a cat", "--steps", "5", "--guidance-scale", "5", "--dtype", "fp32",
                  "--latents", str(tmp_path / "lat.npy"), "--out", str(tmp_path / "out")])
    assert len(paths) == 1 and "sdxl" in capsys.readouterr().out
    key = jax.random.key(0)
    handoff = sdxl.generate(base, bparams, sdxl.tokenize_prompts(base, "a cat"), sdxl.micro_conditioning(base, 16, 16),
                            key, 5.0, latents=lat,
                            config=sdxl.XLGenerateConfig(5, 16, 16, denoising_end=0.7, output="latents"))
    want = sdxl.generate(refiner, rparams, sdxl.tokenize_prompts(refiner, "a cat"),
                         sdxl.micro_conditioning(refiner, 16, 16), key, 5.0, init_latents=handoff,
                         config=sdxl.XLGenerateConfig(5, 16, 16, denoising_start=0.7))
    got = np.asarray(Image.open(paths[0]), np.float32) / 255
    np.testing.assert_allclose(got, np.asarray(want[0]), atol=1 / 255 + 1e-6)


def test_prompt_rules_follow_diffusers(fixtures_dir):
    """prompt_2 defaults to prompt, negative_prompt_2 to negative_prompt; no negative prompt with
    force_zeros_for_empty_prompt zeroes the unconditional branch (negative_scale 0), an explicit
    "" does not; a refiner has no first tokenizer; over-long prompts are cut with a warning."""
    from jaxdiff.pipelines import sdxl
    from jaxdiff.tokenizer import PromptTruncatedWarning, load_tokenizer

    tok = load_tokenizer(fixtures_dir / "tiny-sd-pt-v1")
    te2 = clip_lib.CLIPTextModelWithProjection(clip_lib.CLIPTextConfig(vocab_size=523, hidden_size=32))
    pipe = sdxl.StableDiffusionXL(None, None, te2, te2, tok, tok, None)
    p = sdxl.tokenize_prompts(pipe, ["a cat", "a dog"])
    assert p.ids.shape == p.ids_2.shape == (2, 77) and float(p.negative_scale) == 0.0
    np.testing.assert_array_equal(p.ids, p.ids_2)
    p = sdxl.tokenize_prompts(pipe, ["a cat", "a dog"], "", prompts_2="a painting")
    assert float(p.negative_scale) == 1.0 and not np.array_equal(p.ids, p.ids_2)
    np.testing.assert_array_equal(p.ids_2[0], p.ids_2[1])
    assert float(sdxl.tokenize_prompts(dataclasses.replace(pipe, force_zeros_for_empty_prompt=False),
                                       "a cat").negative_scale) == 1.0
    refiner = dataclasses.replace(pipe, text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
    r = sdxl.tokenize_prompts(refiner, "a cat", "blurry")
    assert r.ids is None and r.negative_ids is None and r.ids_2.shape == (1, 77)
    assert sdxl.micro_conditioning(refiner, 16, 16, aesthetic_score=7.0).time_ids.tolist() == [16, 16, 0, 0, 7]
    with pytest.warns(PromptTruncatedWarning):
        long = sdxl.tokenize_prompts(pipe, "a cat " * 60)
    assert long.ids[0, -1] == 522 and long.ids_2[0, -1] == 522
    with pytest.raises(JaxdiffError, match="2 negative prompts for 1 prompts"):
        sdxl.tokenize_prompts(pipe, "a cat", ["x", "y"])



@pytest.mark.extended
def test_generate_sharded_over_the_mesh_equals_one_device(jax_sdxl):
    """8 prompts split over the 8 test devices by `jit` (no pmap): the one-device images within
    float tolerance, laid out over the devices; a batch that does not split is one error."""
    from jaxdiff.pipelines import sdxl

    (pipe, params), _ = jax_sdxl
    prompts = [f"a photo of {i}" for i in range(8)]
    cond = sdxl.micro_conditioning(pipe, 16, 16)
    config = sdxl.XLGenerateConfig(2, 16, 16)
    key = jax.random.key(0)
    one = sdxl.generate(pipe, params, sdxl.tokenize_prompts(pipe, prompts), cond, key, 5.0, config=config)
    sharded = sdxl.generate_sharded(pipe, params, sdxl.tokenize_prompts(pipe, prompts), cond, key, 5.0,
                                    config=config)
    assert len(sharded.sharding.device_set) == jax.device_count() == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-5)
    with pytest.raises(JaxdiffError, match="split evenly over the mesh's 8 devices"):
        sdxl.generate_sharded(pipe, params, sdxl.tokenize_prompts(pipe, prompts[:3]), cond, key, 5.0,
                              config=config)
