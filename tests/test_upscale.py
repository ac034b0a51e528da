"""The x4 upscaler equals diffusers' PyTorch StableDiffusionUpscalePipeline, and tiled VAE decoding
equals diffusers' `AutoencoderKL.tiled_decode`.

The folder is built here with diffusers: a 7-channel UNet with `num_class_embeds` (the noise
level) and only-cross-attention blocks, a VAE with three blocks (scale factor 4, scaling_factor
0.08333, 32-pixel tiles), the SD1 fixture's text encoder and tokenizer, a DDPM low_res_scheduler
and a v-prediction DDIM scheduler. diffusers draws the image noise and the latents from one
generator; those draws are replayed here and passed to `generate`.

Tolerances: images in [0, 1] within 5e-4 absolute (float32), as the other SD pipelines; tiled
decoding within 1e-5 of diffusers' (the same per-tile decoder, ~1e-6 round-off).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, nhwc, perturb
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import autoencoder_kl as vae_lib
from jaxdiff.pipelines import stable_diffusion as sd
from jaxdiff.pipelines import upscale

ATOL = 5e-4
LOW = 16  # low-resolution side; the output is 64
PROMPTS = ["a white cat", "a red car"]
NEGATIVE = ["blurry", ""]


def build_upscale_folder(folder, fixture):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                           StableDiffusionUpscalePipeline, UNet2DConditionModel)

    base = StableDiffusionPipeline.from_pretrained(fixture, safety_checker=None)
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, num_class_embeds=1000,
        only_cross_attention=(True, False)))
    vae = perturb(AutoencoderKL(block_out_channels=(32, 32, 64), latent_channels=4, layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                sample_size=32, scaling_factor=0.08333))
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, low_res_scheduler=low_res, scheduler=scheduler,
                                          max_noise_level=350)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(fixtures_dir, tmp_path_factory):
    return build_upscale_folder(tmp_path_factory.mktemp("upscale"), fixtures_dir / "tiny-sd-pt-v1")


@pytest.fixture(scope="module")
def loaded(folder):
    return upscale.load_pipeline(folder, dtype=jnp.float32)


def low_res_images(seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(2, LOW, LOW, 3), dtype=np.uint8)
    return [Image.fromarray(p) for p in pixels], pixels.astype(np.float32) / 255.0


def test_the_folder_loads_with_its_low_res_scheduler_and_vae_factor(loaded):
    pipe, _ = loaded
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.scaling_factor == 0.08333
    assert pipe.unet.config.in_channels == 7 and pipe.latent_channels == 4
    assert pipe.low_res_scheduler.name == "ddpm" and pipe.max_noise_level == 350
    assert vae_lib.tile_sizes(pipe.vae.config) == (8, 32)
    with pytest.raises(JaxdiffError, match="noise level 351 is outside 0..350"):
        upscale.generate(pipe, {}, np.zeros((1, 77), np.int32), np.zeros((1, 77), np.int32), jax.random.key(0),
                         image=np.zeros((1, LOW, LOW, 3), np.float32), noise_level=351)


def test_tiled_decoding_matches_diffusers_tiled_decode(folder, loaded):
    """A 20×28 latent (tiles of 8 every 6: full and edge tiles of 2 and 4) decoded in tiles as
    diffusers' `enable_tiling()` decodes it; latents no larger than a tile decode whole."""
    from diffusers import AutoencoderKL

    pipe, params = loaded
    ref = AutoencoderKL.from_pretrained(folder / "vae")
    ref.enable_tiling()
    z = np.random.default_rng(1).standard_normal((1, 20, 28, 4)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref.decode(nchw(z)).sample)
    got = jax.jit(lambda p, x: vae_lib.decode_tiled(pipe.vae, p, x))(params["vae"], z)
    assert got.shape == (1, 80, 112, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    small = z[:, :8, :8]
    whole = pipe.vae.apply({"params": params["vae"]}, small, method=pipe.vae.decode)
    np.testing.assert_array_equal(vae_lib.decode_tiled(pipe.vae, params["vae"], small), whole)


@pytest.mark.extended
def test_upscaling_matches_diffusers(folder, loaded):
    """The whole pipeline vs diffusers with its VAE tiling on (our default), 4 DDIM steps."""
    from diffusers import StableDiffusionUpscalePipeline

    pipe, params = loaded
    ref = StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.vae.enable_tiling()
    pil, images = low_res_images()
    with torch.no_grad():
        want = ref(PROMPTS, image=pil, num_inference_steps=4, guidance_scale=9.0, noise_level=40,
                   negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(5), output_type="np").images
    g = torch.Generator().manual_seed(5)
    image_noise = torch.randn(2, 3, LOW, LOW, generator=g)
    latents = torch.randn(2, 4, LOW, LOW, generator=g)
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = upscale.UpscaleConfig(num_inference_steps=4)
    got = upscale.generate(pipe, params, ids, neg, jax.random.key(0), 9.0, image=images, noise_level=40,
                           config=config, latents=nhwc(latents), image_noise=nhwc(image_noise))
    assert got.shape == (2, 4 * LOW, 4 * LOW, 3)
    np.testing.assert_allclose(got, want, atol=ATOL)

    # noise level and guidance are traced; pmap over 8 devices equals one device's call
    before = upscale._generate_jit._cache_size()
    other = upscale.generate(pipe, params, ids, neg, jax.random.key(0), 5.0, image=images, noise_level=100,
                             config=config, latents=nhwc(latents), image_noise=nhwc(image_noise))
    assert upscale._generate_jit._cache_size() == before
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3
    ids8, neg8 = np.repeat(ids[:1], 8, 0), np.repeat(neg[:1], 8, 0)
    keys = jax.random.split(jax.random.key(1), 8)
    par = upscale.generate_parallel(pipe, sd.replicate_params(params), ids8, neg8, keys, 9.0,
                                    image=np.repeat(images[:1], 8, 0), noise_level=40, config=config)
    one = upscale.generate(pipe, params, ids8[:1], neg8[:1], keys[3], 9.0, image=images[:1], noise_level=40,
                           config=config)
    np.testing.assert_allclose(par[3:4], one, atol=1e-6)


def test_the_program_needs_the_low_res_image(folder, tmp_path):
    from sample.stable_diffusion import main

    with pytest.raises(JaxdiffError, match=r"StableDiffusionUpscalePipeline \(the x4 upscaler\): it needs --init-image"):
        main.__wrapped__(["--model-dir", str(folder), "--prompt", "x", "--out", str(tmp_path)])
    with pytest.raises(JaxdiffError, match="takes no --strength"):
        main.__wrapped__(["--model-dir", str(folder), "--prompt", "x", "--out", str(tmp_path),
                          "--init-image", str(folder / "model_index.json"), "--strength", "0.5"])


@pytest.mark.extended
def test_the_program_upscales_as_generate_does(folder, loaded, tmp_path):
    from PIL import Image

    from sample.stable_diffusion import main

    pil, images = low_res_images(3)
    pil[0].save(tmp_path / "low.png")
    paths = main(["--model-dir", str(folder), "--prompt", PROMPTS[0], "--init-image", str(tmp_path / "low.png"),
                  "--steps", "2", "--noise-level", "30", "--seed", "4", "--dtype", "fp32", "--devices", "one", "--no-compile-cache",
                  "--out", str(tmp_path / "out")])
    written = np.asarray(Image.open(paths[0]))
    assert written.shape == (4 * LOW, 4 * LOW, 3)
    pipe, params = loaded
    ids, neg = sd.tokenize_prompts(pipe, [PROMPTS[0]], "")
    want = upscale.generate(pipe, params, ids, neg, jax.random.key(4), 9.0, image=images[:1], noise_level=30,
                            config=upscale.UpscaleConfig(num_inference_steps=2))
    assert np.abs(written.astype(int) - np.round(np.asarray(want[0]) * 255)).max() <= 1
