"""The Stable Diffusion pipeline equals diffusers' PyTorch StableDiffusionPipeline, in one program.

Two tiny pipelines: SD1-like — the shared fixture `tiny-sd-pt-v1` (PNDM, conv projections), which
latest diffusers loads as published — and SD2-like, built here from configs (linear projections,
per-block heads, upcast attention, gelu text encoder with "!" padding, v-prediction DDIM) and
`save_pretrained`ed into a tmp folder. Both are loaded by `load_pipeline` (the real loader) and
run with the same prompts, negative prompts and initial latents as diffusers.

Tolerance: images in [0, 1] agree to 5e-4 absolute (float32). Guidance 7.5 amplifies the UNet's
~1e-6 round-off differences over the steps; the observed error is 5e-6 (PNDM) to 1e-4.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nhwc, perturb
from jaxdiff.errors import JaxdiffError
from jaxdiff.pipelines import stable_diffusion as sd

ATOL = 5e-4
STEPS = 4
SIZE = 32  # pixels; the tiny VAEs downsample 2×, so latents are 16×16
PROMPTS = ["a photo of a red apple", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "low quality"]
CONFIG = sd.GenerateConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)


def noise(shape_nchw, seed=0) -> torch.Tensor:
    return torch.randn(*shape_nchw, generator=torch.Generator().manual_seed(seed))


def build_sd2_folder(folder, fixtures_dir):
    """An SD2-like pipeline saved by diffusers (and its tokenizer from the SD2 fixture)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True))
    vae = perturb(AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32))
    text_encoder = perturb(CLIPTextModel(CLIPTextConfig(
        vocab_size=523, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", bos_token_id=521,
        eos_token_id=522, pad_token_id=0)))
    tokenizer = CLIPTokenizer.from_pretrained(fixtures_dir / "tiny-sd-flax-v2" / "tokenizer")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(fixtures_dir, tmp_path_factory):
    return {"sd1": fixtures_dir / "tiny-sd-pt-v1",
            "sd2": build_sd2_folder(tmp_path_factory.mktemp("sd2"), fixtures_dir)}


@pytest.fixture(scope="module")
def references(folders):
    from diffusers import StableDiffusionPipeline

    out = {}
    for name, folder in folders.items():
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        out[name] = ref
    return out


@pytest.fixture(scope="module")
def pipelines(folders):
    return {name: sd.load_pipeline(folder, dtype=jnp.float32) for name, folder in folders.items()}


def test_folders_load_with_the_right_components(pipelines):
    pipe1, params1 = pipelines["sd1"]
    assert pipe1.scheduler.name == "pndm" and not pipe1.unet.config.use_linear_projection
    pipe2, _ = pipelines["sd2"]
    assert pipe2.scheduler.name == "ddim" and pipe2.scheduler.prediction_type == "v_prediction"
    assert pipe2.unet.config.use_linear_projection and pipe2.unet.config.upcast_attention
    assert set(params1) == {"unet", "vae", "text_encoder"}
    assert pipe1.vae_scale_factor == 2 and pipe1.default_size == 32
    assert pipe1.vae.dtype == jnp.float32  # force_upcast VAE
    euler = pipe1.with_scheduler("euler").scheduler
    assert euler.name == "euler" and euler.beta_schedule == pipe1.scheduler.beta_schedule == "scaled_linear"


def test_fp16_variant_folder_loads_every_component(folders, pipelines, tmp_path):
    """A pipeline saved in fp16 with `variant="fp16"` (only `*.fp16.safetensors` files, as an
    fp16 download holds) loads; its weights are the float32 ones rounded to fp16."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(folders["sd2"], torch_dtype=torch.float16).save_pretrained(
        tmp_path, variant="fp16")
    assert (tmp_path / "text_encoder" / "model.fp16.safetensors").is_file()
    assert not (tmp_path / "text_encoder" / "model.safetensors").is_file()
    _, params16 = sd.load_pipeline(tmp_path, variant="fp16", dtype=jnp.float32)
    _, params32 = pipelines["sd2"]
    for got, want in zip(jax.tree.leaves(params16), jax.tree.leaves(params32)):
        np.testing.assert_array_equal(got, np.asarray(want).astype(np.float16).astype(np.float32))


def test_init_image_is_read_resized_and_scaled_to_unit_range(tmp_path):
    from PIL import Image

    from sample.stable_diffusion import load_init_image

    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 45, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    own = load_init_image(str(tmp_path / "init.png"), None, None, 8)  # floor to multiples of 8
    assert own.shape == (1, 32, 40, 3) and 0.0 <= own.min() and own.max() <= 1.0
    exact = load_init_image(str(tmp_path / "init.png"), 37, 45, 1)
    np.testing.assert_allclose(exact[0], pixels / 255.0, atol=1e-7)
    with pytest.raises(JaxdiffError, match="not an image"):
        (tmp_path / "bad.png").write_text("nope")
        load_init_image(str(tmp_path / "bad.png"), None, None, 8)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_prompt_embeddings_match_diffusers(pipelines, references, name):
    pipe, params = pipelines[name]
    ref = references[name]
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    with torch.no_grad():
        want_c, want_u = ref.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    got = jax.jit(lambda p, i: sd.encode_prompt(pipe, p, i))(params, np.concatenate([ids, neg]))
    np.testing.assert_allclose(got, np.concatenate([want_c.numpy(), want_u.numpy()]), atol=1e-5)


# sd2 also checks guidance_rescale (Lin et al. 2023), which v-prediction models use.
@pytest.mark.parametrize("name,guidance_rescale", [("sd1", 0.0), ("sd2", 0.7)])
def test_pipeline_matches_diffusers(pipelines, references, name, guidance_rescale):
    pipe, params = pipelines[name]
    latents = noise((2, 4, 16, 16))
    with torch.no_grad():
        want = references[name](PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(),
                                num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                                width=SIZE, guidance_rescale=guidance_rescale, output_type="np").images
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    got = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=CONFIG,
                      guidance_rescale=guidance_rescale, latents=nhwc(latents))
    assert got.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_img2img_matches_diffusers(pipelines, references):
    """diffusers' img2img with the same init latents (what our VAE encodes the init image to,
    with the key's encode split) and the same noise; strength 0.6 runs the last 60% of the
    schedule."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, params = pipelines["sd1"]
    ref = StableDiffusionImg2ImgPipeline(**references["sd1"].components)
    ref.set_progress_bar_config(disable=True)
    key = jax.random.key(3)
    image = np.random.default_rng(0).uniform(0, 1, size=(2, SIZE, SIZE, 3)).astype(np.float32)
    init_latents = sd.encode_images(pipe, params, image, jax.random.split(key, 3)[1])
    eps = noise((2, 4, 16, 16), seed=1)
    with torch.no_grad():
        want = ref(PROMPTS, image=torch.from_numpy(np.array(init_latents).transpose(0, 3, 1, 2)),
                   strength=0.6, num_inference_steps=5, guidance_scale=7.5, negative_prompt=NEGATIVE,
                   generator=torch.Generator().manual_seed(1), output_type="np").images
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    config = sd.GenerateConfig(num_inference_steps=5, height=SIZE, width=SIZE, strength=0.6)
    got = sd.generate(pipe, params, ids, neg, key, 7.5, config=config, init_image=image, latents=nhwc(eps))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_img2img_strength_is_traced(pipelines):
    """Another strength reuses the img2img program (the earlier steps are skipped, not cut)."""
    pipe, params = pipelines["sd1"]
    image = np.random.default_rng(1).uniform(0, 1, size=(2, SIZE, SIZE, 3)).astype(np.float32)
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    eps = nhwc(noise((2, 4, 16, 16), seed=2))  # as test_img2img_matches_diffusers: its program
    config = sd.GenerateConfig(num_inference_steps=5, height=SIZE, width=SIZE, strength=0.6)
    a = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=config, init_image=image, latents=eps)
    compiled = sd._generate_jit._cache_size()
    b = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=config, init_image=image, latents=eps,
                    strength=0.9)
    assert sd._generate_jit._cache_size() == compiled
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(JaxdiffError, match="leaves no denoising step"):
        sd.generate(pipe, params, ids, neg, jax.random.key(0), config=config, init_image=image, strength=0.1)


def test_flax_msgpack_and_pytorch_fixtures_give_the_same_images(pipelines, fixtures_dir):
    pipe_pt, params_pt = pipelines["sd1"]
    pipe_flax, params_flax = sd.load_pipeline(fixtures_dir / "tiny-sd-flax-v1", dtype=jnp.float32)
    assert pipe_flax.scheduler == pipe_pt.scheduler  # FlaxPNDMScheduler config → the same PNDM
    ids, neg = sd.tokenize_prompts(pipe_flax, PROMPTS, NEGATIVE)
    latents = nhwc(noise((2, 4, 16, 16), seed=2))
    a = sd.generate(pipe_flax, params_flax, ids, neg, jax.random.key(0), 7.5, config=CONFIG, latents=latents)
    b = sd.generate(pipe_pt, params_pt, ids, neg, jax.random.key(0), 7.5, config=CONFIG, latents=latents)
    np.testing.assert_array_equal(a, b)


def test_guidance_scale_prompts_and_keys_are_traced(pipelines):
    """New guidance scales, prompts, negative prompts and keys reuse the compiled program."""
    pipe, params = pipelines["sd1"]
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    latents = nhwc(noise((2, 4, 16, 16), seed=5))
    first = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=CONFIG, latents=latents)
    compiled = sd._generate_jit._cache_size()
    ids2, neg2 = sd.tokenize_prompts(pipe, ["a green pear", "a cat"], ["dark", ""])
    second = sd.generate(pipe, params, ids2, neg2, jax.random.key(1), 3.0, config=CONFIG, latents=latents)
    third = sd.generate(pipe, params, ids, neg, jax.random.key(0), 5.0, config=CONFIG, latents=latents)
    fourth = sd.generate(pipe, params, ids, neg2, jax.random.key(0), 7.5, config=CONFIG, latents=latents)
    assert sd._generate_jit._cache_size() == compiled
    for other in (second, third, fourth):
        assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3


def test_pmap_on_8_devices_equals_8_sequential_calls(pipelines):
    assert jax.local_device_count() == 8, "tests/conftest.py sets 8 host devices"
    pipe, params = pipelines["sd1"]
    prompts = [f"prompt number {i}" for i in range(16)]
    ids, neg = sd.tokenize_prompts(pipe, prompts, "blurry")
    keys = jax.random.split(jax.random.key(42), 8)
    latents = nhwc(noise((16, 4, 16, 16), seed=3))
    got = sd.generate_parallel(pipe, sd.replicate_params(params), ids, neg, keys, 7.5, config=CONFIG,
                               latents=latents)
    assert got.shape == (16, SIZE, SIZE, 3)
    for d in range(8):
        rows = slice(2 * d, 2 * d + 2)
        want = sd.generate(pipe, params, ids[rows], neg[rows], keys[d], 7.5, config=CONFIG,
                           latents=latents[rows])
        np.testing.assert_allclose(got[rows], want, atol=1e-6, err_msg=f"device {d}")


def test_sample_script_writes_pngs_of_the_latents_given(folders, pipelines, tmp_path):
    """`python -m sample.stable_diffusion --latents FILE.npy` (NCHW, as diffusers takes them)
    reproduces `generate` with the same latents."""
    from sample.stable_diffusion import main

    latents = noise((2, 4, 16, 16), seed=4).numpy()
    np.save(tmp_path / "latents.npy", latents)
    paths = main(["--model-dir", str(folders["sd1"]), "--prompt", PROMPTS[0], "--negative-prompt", "blurry",
                  "--steps", str(STEPS), "--latents", str(tmp_path / "latents.npy"), "--dtype", "fp32",
                  "--devices", "one", "--no-compile-cache", "--out", str(tmp_path / "out")])
    assert [p.name for p in paths] == ["000.png", "001.png"]
    from PIL import Image
    written = np.stack([np.asarray(Image.open(p)) for p in paths])
    pipe, params = pipelines["sd1"]
    ids, neg = sd.tokenize_prompts(pipe, [PROMPTS[0]] * 2, "blurry")
    want = sd.generate(pipe, params, ids, neg, jax.random.key(0), 7.5, config=CONFIG,
                       latents=latents.transpose(0, 2, 3, 1))
    assert np.abs(written.astype(int) - np.round(np.asarray(want) * 255)).max() <= 1


def test_missing_component_names_the_folder(tmp_path, fixtures_dir):
    broken = tmp_path / "pipe"
    shutil.copytree(fixtures_dir / "tiny-sd-pt-v1", broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(JaxdiffError, match=rf"{broken} has no vae/ folder"):
        sd.load_pipeline(broken)


def test_sdxl_and_shape_mismatches_are_refused_clearly(tmp_path, fixtures_dir):
    xl = tmp_path / "xl"
    shutil.copytree(fixtures_dir / "tiny-sd-pt-v1", xl)
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(JaxdiffError, match="SDXL"):
        sd.load_pipeline(xl)
    (xl / "model_index.json").write_text(json.dumps(index))
    config = json.loads((xl / "unet" / "config.json").read_text())
    (xl / "unet" / "config.json").write_text(json.dumps(dict(config, layers_per_block=2)))
    with pytest.raises(JaxdiffError, match=r"xl/unet/diffusion_pytorch_model.safetensors.*resnets_1"):
        sd.load_pipeline(xl)


def test_bad_latents_are_refused_clearly(pipelines, tmp_path):
    pipe, params = pipelines["sd1"]
    ids, neg = sd.tokenize_prompts(pipe, PROMPTS, NEGATIVE)
    with pytest.raises(JaxdiffError, match="expected NHWC"):
        sd.generate(pipe, params, ids, neg, jax.random.key(0), config=CONFIG,
                    latents=np.zeros((2, 8, 8, 4), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((4, 16, 16), np.float32))
    with pytest.raises(JaxdiffError, match="NCHW"):
        sd.load_latents(tmp_path / "bad.npy")
