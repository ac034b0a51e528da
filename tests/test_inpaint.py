"""Inpainting equals diffusers' PyTorch StableDiffusionInpaintPipeline, 9-channel and 4-channel UNets.

Folders: a 9-channel inpainting pipeline built here from the SD1 fixture's components and a new
UNet (in_channels 9), saved by diffusers; and the SD1 fixture itself (a 4-channel text-to-image
folder, which diffusers' inpainting pipeline runs by blending the known region each step).

Same inputs: diffusers gets PIL images (one per prompt) and one torch generator; its draws (VAE posterior samples
of the image and of the masked image, the initial noise) are replayed here in its order and
given to `generate` as latents (noise) and as already-encoded latents (our VAE's posterior mean
and std with diffusers' draws), so everything else — mask processing, masked image, the UNet's
9-channel input, the blend, strength's start — is computed by each side on its own.

Tolerance: images in [0, 1] within 5e-4 absolute (float32), as the other SD pipelines.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nhwc, perturb
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import autoencoder_kl as vae_lib
from jaxdiff.pipelines import inpaint
from jaxdiff.pipelines import registry
from jaxdiff.pipelines import stable_diffusion as sd

ATOL = 5e-4
SIZE = 32  # the fixture's VAE downsamples 2×: latents 16×16
LATENT = (2, 4, 16, 16)
PROMPTS = ["a photo of a red apple", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "low quality"]


def make_inputs(seed=0):
    """A noise image and a mask (white rectangle, a soft edge) as PIL images and as arrays."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[6:22, 10:28] = 255
    mask[5, 10:28] = 140  # ≥ 0.5 after /255: repaint
    mask[22, 10:28] = 100  # < 0.5: keep
    return (Image.fromarray(pixels), Image.fromarray(mask, "L"),
            pixels[None].astype(np.float32) / 255.0, mask[None, :, :, None].astype(np.float32) / 255.0)


def build_inpaint_folder(folder, fixture):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    base = StableDiffusionPipeline.from_pretrained(fixture, safety_checker=None)
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel.from_config(dict(base.unet.config, in_channels=9)))
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                          tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(fixtures_dir, tmp_path_factory):
    sd1 = fixtures_dir / "tiny-sd-pt-v1"
    return {"nine": build_inpaint_folder(tmp_path_factory.mktemp("inpaint9"), sd1), "four": sd1}


@pytest.fixture(scope="module")
def pipelines(folders):
    return {name: inpaint.load_pipeline(folder, dtype=jnp.float32) for name, folder in folders.items()}


def reference(folder):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


def posterior_latents(pipe, params, images01, eps):
    """Our VAE's posterior of (B, H, W, 3) [0, 1] images sampled with the given unit noise
    (NCHW torch draws), scaled: what diffusers' `_encode_vae_image` makes with that draw."""
    post = pipe.vae.apply({"params": params["vae"]}, jnp.asarray(images01) * 2 - 1, method=pipe.vae.encode)
    return vae_lib.scale_latents(pipe.vae.config, post.mean + post.std * nhwc(eps))


def replay(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*LATENT, generator=g) for _ in range(n)]


@pytest.mark.extended
@pytest.mark.parametrize("name,strength", [("nine", 1.0), ("nine", 0.75), ("four", 1.0), ("four", 0.6)])
def test_inpainting_matches_diffusers(folders, pipelines, name, strength):
    pipe, params = pipelines[name]
    image_pil, mask_pil, image, mask = make_inputs()
    steps = 5
    with torch.no_grad():
        want = reference(folders[name])(PROMPTS, image=[image_pil] * 2, mask_image=[mask_pil] * 2, strength=strength,
                                        negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                                        height=SIZE, width=SIZE, output_type="np",
                                        generator=torch.Generator().manual_seed(7)).images
    images, masks = np.repeat(image, 2, 0), np.repeat(mask, 2, 0)
    masked = images * (masks < 0.5) + 0.5 * (masks >= 0.5)
    if name == "nine" and strength == 1.0:  # draws: noise, masked image (the image's latents are unused)
        noise, e_masked, e_image = replay(7, 3)
    else:  # draws: image, noise, masked image
        e_image, noise, e_masked = replay(7, 3)
    image_latents = posterior_latents(pipe, params, images, e_image)
    masked_latents = posterior_latents(pipe, params, masked, e_masked) if name == "nine" else None
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sd.GenerateConfig(num_inference_steps=steps, height=SIZE, width=SIZE)
    got = inpaint.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=images, mask=masks,
                           strength=strength, config=config, latents=nhwc(noise), image_latents=image_latents,
                           masked_image_latents=masked_latents)
    assert got.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.extended
def test_pmap_on_8_devices_equals_sequential_calls_and_guidance_and_strength_are_traced(pipelines):
    pipe, params = pipelines["nine"]
    _, _, image, mask = make_inputs(1)
    prompts = [f"prompt {i}" for i in range(8)]
    ids, neg = sd.tokenize_prompts(pipe, prompts, "blurry")
    images, masks = np.repeat(image, 8, 0), np.repeat(mask, 8, 0)
    config = sd.GenerateConfig(num_inference_steps=3, height=SIZE, width=SIZE)
    keys = jax.random.split(jax.random.key(3), 8)
    got = inpaint.generate_parallel(pipe, sd.replicate_params(params), ids, neg, keys, 7.5, image=images,
                                    mask=masks, config=config)
    for d in (0, 5):
        want = inpaint.generate(pipe, params, ids[d:d + 1], neg[d:d + 1], keys[d], 7.5, image=images[:1],
                                mask=masks[:1], config=config)
        np.testing.assert_allclose(got[d:d + 1], want, atol=1e-6)
    before = inpaint._generate_jit._cache_size()
    for guidance, strength in ((3.0, 1.0), (7.5, 0.5)):
        other = inpaint.generate(pipe, params, ids[:1], neg[:1], keys[0], guidance, image=images[:1],
                                 mask=masks[:1], strength=strength, config=config)
        assert np.abs(np.asarray(other) - np.asarray(got[:1])).max() > 1e-3
    assert inpaint._generate_jit._cache_size() == before
    with pytest.raises(JaxdiffError, match="leaves no denoising step"):
        inpaint.generate(pipe, params, ids[:1], neg[:1], keys[0], image=images[:1], mask=masks[:1],
                         strength=0.2, config=config)


def test_the_mask_is_binarised_and_downsampled_as_diffusers_does():
    from diffusers.image_processor import VaeImageProcessor

    _, mask_pil, _, mask = make_inputs()
    want = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True).preprocess(mask_pil, height=SIZE, width=SIZE)
    small = torch.nn.functional.interpolate(want, size=(SIZE // 2, SIZE // 2))
    full, latent = inpaint.prepare_mask(jnp.asarray(mask), 2)
    np.testing.assert_array_equal(full, nhwc(want))
    np.testing.assert_array_equal(latent, nhwc(small))


def test_mask_blur_is_pils_gaussian_blur(tmp_path):
    from PIL import ImageFilter

    image_pil, mask_pil, _, _ = make_inputs()
    image_pil.save(tmp_path / "image.png")
    mask_pil.save(tmp_path / "mask.png")
    request = registry.Request("x", init_image=str(tmp_path / "image.png"), mask_image=str(tmp_path / "mask.png"),
                               mask_blur=2.0)
    image, mask, overlay = inpaint.read_inputs(request, 8)
    assert image.shape == (1, SIZE, SIZE, 3) and mask.shape == (1, SIZE, SIZE, 1) and overlay is None
    want = np.asarray(mask_pil.filter(ImageFilter.GaussianBlur(2.0)), np.float32) / 255.0
    np.testing.assert_array_equal(mask[0, :, :, 0], want)


def test_padding_mask_crop_is_diffusers_crop_fill_and_overlay(tmp_path):
    """--padding-mask-crop: the crop box, the "fill" resize of image and mask to the generation
    size and the overlay of the result on the original are diffusers' VaeImageProcessor's."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(4)
    original = Image.fromarray(rng.integers(0, 256, size=(44, 52, 3), dtype=np.uint8))
    mask = np.zeros((44, 52), np.uint8)
    mask[30:40, 6:14] = 255
    mask_pil = Image.fromarray(mask, "L")
    original.save(tmp_path / "image.png")
    mask_pil.save(tmp_path / "mask.png")
    processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    for pad in (0, 3, 30):
        crop = processor.get_crop_region(mask_pil, 48, 40, pad=pad)
        assert inpaint.crop_region(mask_pil, 48, 40, pad) == crop
        request = registry.Request("x", init_image=str(tmp_path / "image.png"), mask_image=str(tmp_path / "mask.png"),
                                   padding_mask_crop=pad)
        image, got_mask, (_, _, got_crop) = inpaint.read_inputs(request, 8)
        assert got_crop == crop and image.shape == (1, 40, 48, 3)
        want = processor.preprocess(original, height=40, width=48, crops_coords=crop, resize_mode="fill")
        np.testing.assert_allclose(image * 2 - 1, nhwc(want), atol=1e-6)
        want_mask = mask_processor.preprocess(mask_pil, height=40, width=48, crops_coords=crop, resize_mode="fill")
        np.testing.assert_array_equal(inpaint.prepare_mask(jnp.asarray(got_mask), 8)[0], nhwc(want_mask))
        generated = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
        np.testing.assert_array_equal(np.asarray(inpaint.apply_overlay(mask_pil, original, generated, crop)),
                                      np.asarray(processor.apply_overlay(mask_pil, original, generated, crop)))


def test_the_program_asks_for_what_the_folder_needs(fixtures_dir, tmp_path):
    """A missing --mask-image, a mask for a text-to-image folder, or an upscaler flag for an
    inpainting folder: one error line each, before anything is loaded."""
    import json
    import shutil

    from sample.stable_diffusion import main

    folder = tmp_path / "inpaint"
    shutil.copytree(fixtures_dir / "tiny-sd-pt-v1", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionInpaintPipeline")))
    image_pil, mask_pil, _, _ = make_inputs()
    image_pil.save(tmp_path / "image.png")
    mask_pil.save(tmp_path / "mask.png")
    base = ["--prompt", "x", "--out", str(tmp_path / "out"), "--init-image", str(tmp_path / "image.png")]
    cases = [
        ([str(folder)], r"holds a StableDiffusionInpaintPipeline \(inpainting\): it needs --mask-image"),
        ([str(folder), "--mask-image", str(tmp_path / "mask.png"), "--noise-level", "5"],
         "takes no --noise-level"),
        ([str(fixtures_dir / "tiny-sd-pt-v1"), "--mask-image", str(tmp_path / "mask.png")],
         r"StableDiffusionPipeline .*takes no --mask-image.*--pipeline inpaint"),
    ]
    for flags, message in cases:
        with pytest.raises(JaxdiffError, match=message):
            main.__wrapped__(["--model-dir", *flags, *base])
    with pytest.raises(JaxdiffError, match="not a text-to-image pipeline|load it with jaxdiff.pipelines.inpaint"):
        sd.load_pipeline(folder)


@pytest.mark.extended
def test_the_program_inpaints_as_generate_does(folders, pipelines, tmp_path):
    """`python -m sample.stable_diffusion` on the inpainting folder with --init-image, --mask-image
    and --latents writes what `inpaint.generate` makes of the same files."""
    from PIL import Image

    from sample.stable_diffusion import main

    image_pil, mask_pil, image, mask = make_inputs(2)
    image_pil.save(tmp_path / "image.png")
    mask_pil.save(tmp_path / "mask.png")
    latents = replay(3, 1)[0][:1].numpy()
    np.save(tmp_path / "latents.npy", latents)
    paths = main(["--model-dir", str(folders["nine"]), "--prompt", PROMPTS[0], "--init-image",
                  str(tmp_path / "image.png"), "--mask-image", str(tmp_path / "mask.png"), "--latents",
                  str(tmp_path / "latents.npy"), "--steps", "3", "--dtype", "fp32", "--devices", "one",
                  "--no-compile-cache", "--out", str(tmp_path / "out")])
    written = np.asarray(Image.open(paths[0]))
    pipe, params = pipelines["nine"]
    ids, neg = sd.tokenize_prompts(pipe, [PROMPTS[0]], "")
    want = inpaint.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, image=image, mask=mask,
                            config=sd.GenerateConfig(3, SIZE, SIZE), latents=nhwc(latents))
    assert np.abs(written.astype(int) - np.round(np.asarray(want[0]) * 255)).max() <= 1
