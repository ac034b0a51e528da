"""Depth-to-image equals diffusers' PyTorch StableDiffusionDepth2ImgPipeline, in one program.

A tiny depth-to-image folder is built here with diffusers and saved with `save_pretrained`: a
5-channel UNet, the tiny-SD fixture's VAE, text encoder, tokenizer and PNDM scheduler, the tiny
DPT-hybrid of tests/helpers.py as `depth_estimator/` and a `DPTImageProcessor` (PIL bicubic to
64², mean/std 0.5) as `feature_extractor/`. The VAE's posterior log-variance is pinned to −30 (its
std to 3e-7), so diffusers' encoding (which samples from its generator) and ours (from our key)
agree; the noise added to the image latents is the same tensor on both sides.

Tolerance: images in [0, 1] within 5e-4 absolute (float32), as for the other pipelines.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from helpers import DPT_SIZE, build_tiny_dpt, nhwc, perturb
from PIL import Image

from jaxdiff.errors import JaxdiffError
from jaxdiff.pipelines import depth
from jaxdiff.pipelines import stable_diffusion as sd

ATOL = 5e-4
SIZE = 32  # pixels; latents 16×16 with the fixture's 2× VAE
PROMPTS = ["a photo of a red apple", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "low quality"]
STEPS, STRENGTH = 5, 0.7


def build_depth_folder(folder, fixtures_dir):
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionDepth2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, DPTImageProcessor

    fixture = fixtures_dir / "tiny-sd-pt-v1"
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, in_channels=5, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        use_linear_projection=True))
    vae = AutoencoderKL.from_pretrained(fixture / "vae")
    with torch.no_grad():  # posterior std 3e-7: the VAE's sample is its mean on both sides
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    text_encoder = CLIPTextModel.from_pretrained(fixture / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(fixture / "tokenizer")
    scheduler = PNDMScheduler.from_pretrained(fixture / "scheduler")
    processor = DPTImageProcessor(size={"height": DPT_SIZE, "width": DPT_SIZE}, resample=3,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler, depth_estimator=build_tiny_dpt(),
                                            feature_extractor=processor)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(fixtures_dir, tmp_path_factory):
    return build_depth_folder(tmp_path_factory.mktemp("depth") / "sd-depth", fixtures_dir)


@pytest.fixture(scope="module")
def pipeline(folder):
    import jax.numpy as jnp

    return depth.load_pipeline(folder, dtype=jnp.float32)


@pytest.fixture(scope="module")
def image():
    """A smooth RGB image (so the DPT sees structure), uint8 (1, 32, 32, 3)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x * y) ** 0.5], -1)
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, rgb.shape)
    return (np.clip(rgb + noise, 0, 1) * 255).round().astype(np.uint8)[None]


def reference(folder, image, depth_map=None):
    """diffusers' images and the noise its generator added to the image latents."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    ref = StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    torch.randn((1, 4, 16, 16), generator=g)  # the VAE posterior sample comes first
    noise = torch.randn((2, 4, 16, 16), generator=g)
    with torch.no_grad():
        want = ref(PROMPTS, image=Image.fromarray(image[0]), depth_map=depth_map, strength=STRENGTH,
                   num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt=NEGATIVE,
                   generator=torch.Generator().manual_seed(1), output_type="np").images
    return want, nhwc(noise)


def jaxdiff_images(pipeline, image, noise, depth_map=None):
    pipe, params = pipeline
    ids, neg = sd.tokenize_prompts(pipe.sd, PROMPTS, NEGATIVE)
    config = sd.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE, strength=STRENGTH)
    images = np.repeat(image / 255.0, 2, 0).astype(np.float32)
    return np.asarray(depth.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=images,
                                     depth_map=depth_map, config=config, latents=noise))


@pytest.mark.extended
def test_folder_loads_with_its_depth_estimator(pipeline):
    pipe, params = pipeline
    assert pipe.sd.unet.config.in_channels == 5 and pipe.sd.latent_channels == 4
    assert pipe.depth_estimator.config.is_hybrid and pipe.processor.height == DPT_SIZE
    assert set(params) == {"unet", "vae", "text_encoder", "depth_estimator"}


@pytest.mark.extended
def test_estimated_depth_matches_diffusers(folder, pipeline, image):
    """No depth map: the DPT estimates it from the image inside the program."""
    pipe, params = pipeline
    estimate = np.asarray(depth.estimate_depth(pipe, params, image / 255.0))
    assert estimate.max() > estimate.min()  # a depth map with structure, not a constant
    want, noise = reference(folder, image)
    got = jaxdiff_images(pipeline, image, noise)
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.extended
def test_given_depth_map_matches_diffusers(folder, pipeline, image):
    """A (1, 24, 20) map (another size and aspect ratio) for two images: resized with torch's
    bicubic, normalised and repeated as diffusers does."""
    rng = np.random.default_rng(2)
    depth_map = np.cumsum(rng.uniform(0, 1, (1, 24, 20)), axis=1).astype(np.float32) * 40.0
    want, noise = reference(folder, image, torch.from_numpy(depth_map))
    got = jaxdiff_images(pipeline, image, noise, depth_map)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_normalized_depth_matches_diffusers_resize():
    """The map diffusers' prepare_depth_map makes: bicubic to the latents' size, then [-1, 1]."""
    d = (np.random.default_rng(3).uniform(0, 5, (2, 40, 30)) ** 2).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(d)[:, None], size=(16, 12), mode="bicubic",
                                        align_corners=False)
    lo, hi = torch.amin(t, dim=[1, 2, 3], keepdim=True), torch.amax(t, dim=[1, 2, 3], keepdim=True)
    want = nhwc(2.0 * (t - lo) / (hi - lo) - 1.0)
    got = np.asarray(jax.jit(lambda v: depth.normalized_depth(v, (16, 12)))(d))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_depth_map_files_are_read(tmp_path):
    ramp = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    np.save(tmp_path / "d.npy", ramp)
    np.testing.assert_array_equal(depth.load_depth_map(tmp_path / "d.npy"), ramp[None])
    np.save(tmp_path / "d4.npy", np.stack([ramp, ramp[::-1]])[:, None])  # diffusers' (B, 1, H, W)
    assert depth.load_depth_map(tmp_path / "d4.npy").shape == (2, 12, 10)
    Image.fromarray((ramp * 500).astype(np.uint16)).save(tmp_path / "d16.png")
    np.testing.assert_array_equal(depth.load_depth_map(tmp_path / "d16.png"), ramp[None] * 500)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("garbage.npy", "is not a .npy array"),
    ("garbage.png", "neither a .npy array nor an image"),
    ("rgb.png", "is a RGB image; a depth map is one channel"),
    ("constant.npy", "is constant"),
    ("nan.npy", "NaN or infinite"),
    ("shape.npy", "of shape (2, 3, 4, 5)"),
])
def test_bad_depth_map_files_are_one_clear_error(tmp_path, case, message):
    path = tmp_path / case
    if case.startswith("garbage"):
        path.write_bytes(b"not a depth map")
    elif case == "rgb.png":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    elif case == "constant.npy":
        np.save(path, np.full((8, 8), 3.0))
    elif case == "nan.npy":
        np.save(path, np.array([[0.0, np.nan], [1.0, 2.0]]))
    elif case == "shape.npy":
        np.save(path, np.zeros((2, 3, 4, 5)))
    with pytest.raises(JaxdiffError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        depth.load_depth_map(path)
    assert "\n" not in str(e.value) and "--depth-map" in str(e.value)


def test_a_text_to_image_folder_is_refused(fixtures_dir):
    import jax.numpy as jnp

    with pytest.raises(JaxdiffError, match="StableDiffusionPipeline.*not depth-to-image"):
        depth.load_pipeline(fixtures_dir / "tiny-sd-pt-v1", dtype=jnp.float32)


@pytest.mark.extended
def test_sample_program_runs_depth_folders(folder, pipeline, image, tmp_path):
    """`python -m sample.stable_diffusion` on a depth folder with --init-image, a 16-bit PNG
    --depth-map and --latents (NCHW .npy) writes what `generate` makes from the same inputs."""
    from sample.stable_diffusion import main

    Image.fromarray(image[0]).save(tmp_path / "init.png")
    ramp = (np.add.outer(np.arange(24), 2 * np.arange(20)) * 700).astype(np.uint16)  # as the map above
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(4)).numpy()
    np.save(tmp_path / "latents.npy", noise)
    paths = main(["--model-dir", str(folder), "--prompt", PROMPTS[0], "--negative-prompt", "blurry",
                  "--init-image", str(tmp_path / "init.png"), "--depth-map", str(tmp_path / "depth.png"),
                  "--strength", str(STRENGTH), "--steps", str(STEPS), "--latents", str(tmp_path / "latents.npy"),
                  "--dtype", "fp32", "--devices", "one", "--no-compile-cache", "--out", str(tmp_path / "out")])
    written = np.stack([np.asarray(Image.open(p)) for p in paths])
    pipe, params = pipeline
    ids, neg = sd.tokenize_prompts(pipe.sd, [PROMPTS[0]] * 2, "blurry")
    config = sd.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE, strength=STRENGTH)
    want = depth.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=np.repeat(image / 255.0, 2, 0),
                          depth_map=ramp[None].astype(np.float32), config=config, latents=nhwc(noise))
    assert written.shape == (2, SIZE, SIZE, 3)
    assert np.abs(written.astype(int) - np.round(np.asarray(want) * 255)).max() <= 1


@pytest.mark.parametrize("flags, message", [
    ([], "StableDiffusionDepth2ImgPipeline (depth-to-image): it needs --init-image"),
    (["--init-image", "x.png", "--mask-image", "x.png"], "takes no --mask-image"),
])
def test_sample_program_asks_for_what_depth_needs(tmp_path, capsys, flags, message):
    """Checked from model_index.json alone, before anything is loaded: one error line."""
    from sample.stable_diffusion import main

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionDepth2ImgPipeline"}')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    flags = [str(tmp_path / f) if f.endswith(".png") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        main(["--model-dir", str(tmp_path), "--prompt", "a castle", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
